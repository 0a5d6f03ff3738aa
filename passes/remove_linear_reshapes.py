"""Remove the flatten/unflatten reshape pair around a linear: the matmul reads [B, S, K] directly.

The importer writes every ``nn.Linear`` on a (batch, seq, features) tensor as a 2-D matmul
between two reshapes. A matmul by a 2-D weight is row-wise, so it can run on the N-D tensor
itself, its rows in the same order::

    reshape(add(matmul(reshape(x, [B·S, K]), W), b), [B, S, N])
  → add(matmul(x, W), b)                                          # x: [B, S, K]

    reshape(add(matmul(y, W), b), [B, S, N])                      # y: [B·S, K], not a reshape
  → add(matmul(reshape(y, [B, S, K]), W), b)

W is a constant or a constant expression (``permute_dims`` of one, the MaskedLM decoder's
``concat``); the bias add is optional, with either operand order. Every value is kept bit for bit.

Why it matters: in the build pipeline's operator fusion a matmul kernel takes elementwise
consumers only, and an injective reshape between the matmul and the elementwise tail stops it.
With the pair gone, the bias, the activation, the residual add and the residual NoNorm after it
(``residual + y·γ + β``, which ``FoldNoNorm`` leaves) become epilogues of the matmul's kernel
instead of kernels of their own.

It bails (and says why in ``refusals``) when a shape is not static, when the matmul's input or
weight is not 2-D, when the weight is not a constant expression, when the outer reshape does
not restore leading axes of the matmul's rows (target ``[*L, N]`` with ``prod(L)`` rows, at least
3-D), when the bias is not a constant along the last axis, and when the 2-D matmul or the 2-D
biased value has another user (it would still be needed, computed twice).
"""

from __future__ import annotations

import math

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import Graph, call, is_constant_expr, static_shape


class RemoveLinearReshapes(MobileBertPass):
    """``reshape(linear(reshape(x, [B·S, K])), [B, S, N]) → linear(x)``."""

    name = "RemoveLinearReshapes"

    def __init__(self) -> None:
        super().__init__()
        self.x = wildcard()
        self.weight = wildcard()
        self.matmul = is_op("relax.matmul")(self.x, self.weight)
        self.bias = is_const()
        self.biased = is_op("relax.add")(self.matmul, self.bias)  # matches either order
        self.pattern = is_op("relax.reshape")(self.biased | self.matmul, wildcard())
        self.flatten = is_op("relax.reshape")(wildcard(), wildcard())

    def why_not(self, graph: Graph, var: relax.Var, m: dict) -> str | None:
        """Why this reshape pair stays around its linear (None: it goes)."""
        matmul = m[self.matmul]
        x_shape, out_shape = static_shape(m[self.x]), static_shape(var)
        w_shape = static_shape(m[self.weight])
        if x_shape is None or out_shape is None or w_shape is None:
            return "a shape is not static"
        if len(x_shape) != 2 or len(w_shape) != 2:
            return f"the matmul is {list(x_shape)}·{list(w_shape)}, not a 2-D input by a 2-D weight"
        if not is_constant_expr(graph, m[self.weight]):
            return "the matmul's weight is not a constant expression"
        rows, n = x_shape[0], w_shape[1]
        if len(out_shape) < 3 or out_shape[-1] != n or math.prod(out_shape[:-1]) != rows:
            return f"the reshape to {list(out_shape)} does not restore leading axes of the rows"
        biased = m.get(self.biased)
        if biased is not None:
            bias = graph.constant(m[self.bias])
            if bias.ndim > 1 or (bias.size != 1 and bias.shape[-1] != n):
                return f"the bias of shape {bias.shape} is not a vector along the last axis"
            if graph.users(matmul) > 1:
                return "the 2-D matmul has another user besides the bias add"
            inner = biased
        else:
            inner = matmul
        if graph.users(inner) > 1:
            return "the 2-D output of the linear has another user besides the reshape"
        return None

    def rewrite(self, graph: Graph, var: relax.Var, m: dict) -> dict[relax.Var, relax.Expr]:
        """The linear on the N-D input: its leading axes are the reshape's, last axis K."""
        out_shape = static_shape(var)
        matmul = m[self.matmul]
        x, weight = matmul.args  # as written (the matches look through bindings)
        k = static_shape(x)[-1]
        source = x
        flat = graph.match(self.flatten, graph.value(x))
        if flat is not None:  # read through the flatten: reshape(reshape(s, ·), t) = reshape(s, t)
            source = graph.value(x).args[0]
        target = (*out_shape[:-1], k)
        if static_shape(source) != target:
            source = relax.op.reshape(source, target)
        out: relax.Expr = call(matmul, source, weight)
        if self.biased in m:  # the bias add as written, its matmul operand replaced
            biased = m[self.biased]
            args = [out if graph.value(a).same_as(matmul) else a for a in biased.args]
            out = call(biased, *args)
        return {var: out}
