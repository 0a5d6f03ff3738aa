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

Every rewrite moves no data and keeps the values bit for bit.

It bails (and says why in ``refusals``) when a shape is not static, and it does not compose a
chain whose intermediate has another user unless the chain cancels outright: composing would
keep the intermediate alive and add a second op reading the same input, saving nothing.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from .base import Graph, MobileBertPass, call, shape_values, static_shape


def _axes(permute: relax.Call, ndim: int) -> tuple[int, ...]:
    axes = permute.attrs.axes
    if axes is None:
        return tuple(reversed(range(ndim)))
    return tuple(int(a) % ndim for a in axes)


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
        self.pattern = self.reshape | self.permute | self.broadcast

    def find_rewrites(self, graph: Graph) -> list[dict[relax.Var, relax.Expr]]:
        rewrites = []
        changed: set[relax.Var] = set()
        for var, value in graph.bindings():
            m = graph.match(self.pattern, value)
            if m is None:
                continue
            inner = m.get(self.inner_reshape, m.get(self.inner_permute))
            if inner is not None and graph.var_of(inner) in changed:
                continue  # its inner op goes this round; look again at the next
            new: list[relax.Expr] = []
            why = self.why_not(graph, var, m, new)
            if why is not None:
                self.refuse(var, why)
            elif new:
                rewrites.append({var: new[0]})
                changed.add(var)
        return rewrites

    def why_not(self, graph: Graph, var: relax.Var, m: dict, new: list) -> str | None:
        """Why this layout op stays (None: it goes, or it is simply needed); puts the
        replacement in ``new``."""
        x = m[self.x]
        in_shape, out_shape = static_shape(x), static_shape(var)
        if in_shape is None or out_shape is None:
            return "a shape is not static"
        if in_shape == out_shape and self._is_identity_on(m, in_shape):
            new.append(x)
            return None
        if self.inner_reshape in m:
            target = shape_values(m[self.reshape].args[1])
            if target is None or any(dim <= 0 for dim in target):
                return "the reshape's target is not a list of positive sizes"
            if graph.users(m[self.inner_reshape]) > 1:
                return "the inner reshape has another user"
            new.append(call(m[self.reshape], x, m[self.reshape].args[1]))
        elif self.inner_permute in m:
            if graph.users(m[self.inner_permute]) > 1:
                return "the inner permute_dims has another user"
            p = _axes(m[self.inner_permute], len(in_shape))
            q = _axes(m[self.permute], len(in_shape))
            composed = [p[i] for i in q]
            new.append(relax.op.permute_dims(x, composed))
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
