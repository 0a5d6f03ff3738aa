"""Fold the attention's constant scale into the query and key weights and biases.

``scaled_dot_product_attention`` is exported as ``Q·s`` and ``Kᵀ·s`` (``s = d_head^-1/4``) on the
way into the batched matmul. Q and Kᵀ come from the query and key linears through reshapes and
permutes only, which commute with a scalar, so ``s`` folds into those linears::

    multiply(permute_dims(reshape(add(b, matmul(x, permute_dims(W))))), s)
  → permute_dims(reshape(add(b·s, matmul(x, permute_dims(W·s)))))

The same holds for any scalar multiply behind a linear and a chain of reshapes and permutes;
attention is where MobileBERT has them. Folding is done in float64 and cast back.

It bails (and says why in ``refusals``) unless ``s`` is a finite scalar constant of the tensor's
dtype; when the chain meets anything but ``reshape``/``permute_dims`` before a linear with
constant weights (e.g. the merged QK matmul's split: run this pass before
``MergeSharedInputLinears``); and when any intermediate on the chain has another user, since that
user still needs the unscaled value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import Graph, call, dtype_of
from mbcompile.passes.linear import LinearPattern


@dataclass
class _Scaled:
    """A matched ``x · s`` and, once ``why_not`` accepts it, the layout calls from ``x`` back to
    the linear, the linear's root last."""

    found: dict
    chain: list[relax.Call] = field(default_factory=list)


class FoldAttentionScale(MobileBertPass):
    """``layout(linear(x, W, b)) · s → layout(linear(x, W·s, b·s))`` for a scalar constant s."""

    name = "FoldAttentionScale"

    def __init__(self) -> None:
        super().__init__()
        self.x = wildcard()
        self.scale = is_const()
        self.pattern = is_op("relax.multiply")(self.x, self.scale)
        self.layout = is_op("relax.reshape")(wildcard(), wildcard()) | is_op(
            "relax.permute_dims"
        )(wildcard())
        self.linear = LinearPattern()

    def match(self, graph: Graph, var: relax.Var, value: relax.Expr) -> _Scaled | None:
        found = super().match(graph, var, value)
        return None if found is None else _Scaled(found)

    def why_not(self, graph: Graph, var: relax.Var, match: _Scaled) -> str | None:
        """Why this multiply cannot fold (None: it can); fills ``match.chain`` as it walks it."""
        m, chain = match.found, match.chain
        x = m[self.x]
        scale = graph.constant(m[self.scale])
        if scale.size != 1:
            return f"the constant of shape {scale.shape} is not a scalar"
        if str(scale.dtype) != dtype_of(x):
            return f"the scale is {scale.dtype}, the tensor is {dtype_of(x)}"
        if not np.isfinite(scale).all():
            return "the scale is not finite"
        expr = x
        while True:
            if graph.users(expr) > 1:
                return f"the intermediate {graph.name(expr)} has another user"
            value = graph.value(expr)
            linear = self.linear.match(graph, value)
            if linear is not None:
                if str(linear.weight.dtype) != dtype_of(x):
                    return f"the linear's weight is {linear.weight.dtype}"
                for inner in linear.intermediates:
                    if graph.users(inner) > 1:
                        return "the matmul inside the linear has another user"
                chain.append(value)
                return None
            if graph.match(self.layout, value) is None:
                return "the scaled tensor does not come from a linear through reshapes/permutes"
            chain.append(value)
            expr = value.args[0]

    def rewrite(self, graph: Graph, var: relax.Var, match: _Scaled) -> dict[relax.Var, relax.Expr]:
        chain = match.chain
        scale = np.float64(graph.constant(match.found[self.scale]).reshape(()))
        linear = self.linear.match(graph, graph.value(chain[-1]))
        bias = None if linear.bias is None else linear.bias.astype(np.float64) * scale
        new = linear.rebuild(linear.kernel.astype(np.float64) * scale, bias)
        for layout in reversed(chain[:-1]):
            new = call(layout, new, *layout.args[1:])
        return {var: new}
