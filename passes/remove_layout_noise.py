"""Remove reshapes, permutes and broadcasts that cancel or do nothing.

The importer writes every torch view as its own op, so the graph carries chains such as the
attention context's three permutes (``[2, 0, 1, 3]``, ``[1, 2, 0, 3]``, ``[0, 2, 1, 3]``, of
which the first two cancel), a reshape per linear input and output, and ``broadcast_to`` to the
shape a tensor already has before each batched matmul. Rewrites, repeated until none applies::

    reshape(x, shape(x))                   → x
    reshape(reshape(x, s1), s2)            → reshape(x, s2)         (→ x if s2 = shape(x))
    permute_dims(x, identity)              → x
    permute_dims(permute_dims(x, p), q)    → permute_dims(x, p∘q)   (→ x if p∘q = identity)
    broadcast_to(x, shape(x))              → x
    matmul(x, broadcast_to(W, (B, K, N)))  → matmul(x, W)           (W of shape (K, N))

The last is how torch.export writes a linear whose input is a batched, non-contiguous view (the
attention output's linear at batch > 1, or with the choices of a multiple-choice model): the
weight copied once per batch row into a batched matmul. Relax's matmul broadcasts a 2-D right
operand itself, and the linear is then one the other passes recognise.

Every rewrite keeps the values bit for bit; none adds a copy.

It bails (and says why in ``refusals``) when a shape is not static, and it does not compose a
chain whose intermediate has another user unless the chain cancels outright: composing would
keep the intermediate alive and add a second op reading the same input, saving nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import Graph, call, shape_values, static_shape


def _axes(permute: relax.Call, ndim: int) -> tuple[int, ...]:
    axes = permute.attrs.axes
    if axes is None:
        return tuple(reversed(range(ndim)))
    return tuple(int(a) % ndim for a in axes)


@dataclass
class _LayoutOp:
    """A matched layout op and, once ``why_not`` accepts it, what replaces it (None: it is
    needed as it is)."""

    found: dict
    new: relax.Expr | None = None


class RemoveLayoutNoise(MobileBertPass):
    """Cancelling permute/reshape chains and identity broadcasts disappear."""

    name = "RemoveLayoutNoise"

    def __init__(self) -> None:
        super().__init__()
        self.x = wildcard()
        self.inner_reshape = is_op("relax.reshape")(self.x, wildcard())
        self.reshape = is_op("relax.reshape")(self.inner_reshape | self.x, wildcard())
        self.inner_permute = is_op("relax.permute_dims")(self.x)
        self.permute = is_op("relax.permute_dims")(self.inner_permute | self.x)
        self.broadcast = is_op("relax.broadcast_to")(self.x, wildcard())
        self.left, self.weight = wildcard(), wildcard()
        self.broadcast_weight = is_op("relax.broadcast_to")(self.weight, wildcard())
        self.batched = is_op("relax.matmul")(self.left, self.broadcast_weight)
        self.pattern = self.reshape | self.permute | self.broadcast | self.batched
        self._changed: set[relax.Var] = set()  # bindings rewritten in the current round

    def find_rewrites(self, graph: Graph) -> list[dict[relax.Var, relax.Expr]]:
        self._changed = set()
        return super().find_rewrites(graph)

    def match(self, graph: Graph, var: relax.Var, value: relax.Expr) -> _LayoutOp | None:
        found = super().match(graph, var, value)
        if found is None:
            return None
        inner = found.get(self.inner_reshape, found.get(self.inner_permute))
        if inner is not None and graph.var_of(inner) in self._changed:
            return None  # its inner op goes this round; look again at the next
        return _LayoutOp(found)

    def why_not(self, graph: Graph, var: relax.Var, match: _LayoutOp) -> str | None:
        """Why this layout op stays (None: it goes, or it is simply needed); puts the
        replacement in ``match.new``."""
        m = match.found
        if self.batched in m:
            return self._unbroadcast(m, match)
        x = m[self.x]
        in_shape, out_shape = static_shape(x), static_shape(var)
        if in_shape is None or out_shape is None:
            return "a shape is not static"
        if in_shape == out_shape and self._is_identity_on(m, in_shape):
            match.new = x
            return None
        if self.inner_reshape in m:
            target = shape_values(m[self.reshape].args[1])
            if target is None or any(dim <= 0 for dim in target):
                return "the reshape's target is not a list of positive sizes"
            if graph.users(m[self.inner_reshape]) > 1:
                return "the inner reshape has another user"
            match.new = call(m[self.reshape], x, m[self.reshape].args[1])
        elif self.inner_permute in m:
            if graph.users(m[self.inner_permute]) > 1:
                return "the inner permute_dims has another user"
            p = _axes(m[self.inner_permute], len(in_shape))
            q = _axes(m[self.permute], len(in_shape))
            composed = [p[i] for i in q]
            match.new = relax.op.permute_dims(x, composed)
        return None

    def rewrite(
        self, graph: Graph, var: relax.Var, match: _LayoutOp
    ) -> dict[relax.Var, relax.Expr]:
        if match.new is None:
            return {}
        self._changed.add(var)
        return {var: match.new}

    def _unbroadcast(self, m: dict, match: _LayoutOp) -> str | None:
        left, weight = static_shape(m[self.left]), static_shape(m[self.weight])
        broadcast = static_shape(m[self.broadcast_weight])
        if left is None or weight is None or broadcast is None:
            return "a shape is not static"
        if len(weight) != 2 or len(left) < 3 or broadcast != left[:-2] + weight:
            return f"the broadcast {weight} → {broadcast} is not of a 2-D operand over {left}'s batch"
        match.new = call(m[self.batched], m[self.left], m[self.weight])
        return None

    def _is_identity_on(self, m: dict, shape: tuple[int, ...]) -> bool:
        """Whether the matched op returns its input ``x`` unchanged (shapes already equal)."""
        if self.reshape in m or self.broadcast in m:
            target = m[self.reshape].args[1] if self.reshape in m else m[self.broadcast].args[1]
            return shape_values(target) == shape
        ndim = len(shape)
        axes = _axes(m[self.permute], ndim)
        if self.inner_permute in m:
            axes = tuple(_axes(m[self.inner_permute], ndim)[i] for i in axes)
        return axes == tuple(range(ndim))
