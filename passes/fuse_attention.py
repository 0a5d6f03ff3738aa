"""Fuse scores, mask, guarded softmax and the value product into one attention kernel.

``scaled_dot_product_attention`` is exported as::

    s  = reshape(matmul(q, kt), (B, H, Sq, Sk));   s2 = add(s, bias)
    p  = softmax(s2, axis=-1)
    g  = logical_not(astype(max(astype(logical_not(equal(s2, -inf)), int8), -1), bool))
    o  = matmul(reshape(where(g, full_like(p, 0), p), (B·H, Sq, Sk)), v)

and becomes ``o = call_tir(fused_attention, (q, kt, v, bias))`` (``attention_kernel.py``): one
kernel per layer instead of two batched matmuls, a softmax and six elementwise kernels, and no
(B·H, Sq, Sk) intermediate in memory. Rows whose keys are all masked give zeros, as the guard
does. (Eager attention, exported without the guard, is left alone.)

Bails (``refusals`` says why) unless everything is float32 with static shapes, the bias
broadcasts to (B, H, Sq, Sk), and ``s2``, ``p`` and the guarded probabilities have no other user
(e.g. ``output_attentions`` returning them).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from .attention_kernel import attention_kernel
from .base import Graph, MobileBertPass, static_shape


class FuseAttention(MobileBertPass):
    """``matmul(guarded_softmax(q·kt + bias), v) → call_tir(fused_attention, q, kt, v, bias)``."""

    name = "FuseAttention"

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kt, self.v, self.bias = wildcard(), wildcard(), wildcard(), wildcard()
        self.scores = is_op("relax.matmul")(self.q, self.kt)
        self.biased = is_op("relax.add")(
            is_op("relax.reshape")(self.scores, wildcard()), self.bias
        )
        self.probs = is_op("relax.nn.softmax")(self.biased)
        self.neg_inf = is_const()
        unmasked = is_op("relax.logical_not")(is_op("relax.equal")(self.biased, self.neg_inf))
        any_unmasked = is_op("relax.max")(is_op("relax.astype")(unmasked))
        self.guard = is_op("relax.logical_not")(is_op("relax.astype")(any_unmasked))
        zeros = is_op("relax.full_like")(self.probs, is_const())
        self.guarded = is_op("relax.where")(self.guard, zeros, self.probs)
        # As imported, an identity broadcast_to sits before the reshape (RemoveLayoutNoise
        # drops it); accept both.
        guarded_3d = self.guarded | is_op("relax.broadcast_to")(self.guarded, wildcard())
        self.pattern = is_op("relax.matmul")(is_op("relax.reshape")(guarded_3d, wildcard()), self.v)
        self._kernels: dict[str, tuple[relax.GlobalVar, tvm.tirx.PrimFunc]] = {}

    def __call__(self, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        self._kernels = {}
        self._builder = relax.BlockBuilder(mod)  # gives new kernels typed GlobalVars
        mod, fired = super().__call__(mod)
        for gvar, func in self._kernels.values():
            mod[gvar] = func
        return mod, fired

    def why_not(self, graph: Graph, m: dict) -> str | None:
        # Users inside the pattern: s2 → softmax and equal; p → full_like and where.
        for part, inside in ((self.biased, 2), (self.probs, 2), (self.guarded, 1)):
            if graph.users(m[part]) != inside:
                return "the attention scores or probabilities have another user"
        shapes = {p: static_shape(m[p]) for p in (self.q, self.kt, self.v, self.bias, self.biased)}
        if any(s is None for s in shapes.values()):
            return "shapes are not static"
        q, kt, v, bias, full = (shapes[p] for p in (self.q, self.kt, self.v, self.bias, self.biased))
        if len(q) != 3 or len(kt) != 3 or len(v) != 3 or len(full) != 4 or len(bias) != 4:
            return f"unexpected ranks q{q} kt{kt} v{v} scores{full} bias{bias}"
        batch, heads, _seq_q, seq_k = full
        if q[0] != batch * heads or kt[0] != q[0] or v[0] != q[0] or kt[1] != q[2] or v[1] != seq_k:
            return f"shapes do not form attention: q{q} kt{kt} v{v} scores{full}"
        if any(b not in (1, f) for b, f in zip(bias, full)):
            return f"bias {bias} does not broadcast to the scores {full}"
        dtypes = {str(m[p].ty.dtype) for p in (self.q, self.kt, self.v, self.bias)}
        if dtypes != {"float32"}:
            return f"dtypes {sorted(dtypes)} are not float32"
        neg = graph.constant(m[self.neg_inf])
        if neg is None or neg.size != 1 or float(neg.reshape(())) != float("-inf"):
            return "the guard does not test for -inf"
        return None

    def find_rewrites(self, graph: Graph) -> list[dict[relax.Var, relax.Expr]]:
        rewrites = []
        for var, value in graph.bindings():
            m = graph.match(self.pattern, value)
            if m is None:
                continue
            why = self.why_not(graph, m)
            if why is not None:
                self.refuse(var, why)
                continue
            q, v, bias = static_shape(m[self.q]), static_shape(m[self.v]), static_shape(m[self.bias])
            heads = static_shape(m[self.biased])[1]
            key = f"fused_attention_{q[0]}x{q[1]}x{v[1]}x{q[2]}x{v[2]}_h{heads}_b{'x'.join(map(str, bias))}"
            if key not in self._kernels:
                func = attention_kernel(q[0], q[1], v[1], q[2], v[2], heads, bias)
                self._kernels[key] = (self._builder.add_func(func, key), func)
            gvar = self._kernels[key][0]
            out = relax.TensorType((q[0], q[1], v[2]), "float32")
            rewrites.append(
                {var: relax.call_tir(gvar, [m[self.q], m[self.kt], m[self.v], m[self.bias]], out)}
            )
        return rewrites

