"""Fuse scores, mask, guarded softmax and the value product into one attention kernel.

``scaled_dot_product_attention`` is exported as::

    s  = reshape(matmul(q, kt), (B, H, Sq, Sk));   s2 = add(s, bias)
    p  = softmax(s2, axis=-1)
    g  = logical_not(astype(max(astype(logical_not(equal(s2, -inf)), int8), -1), bool))
    o  = matmul(reshape(where(g, full_like(p, 0), p), (B·H, Sq, Sk)), v)

(an ONNX export guards with ``g = isnan(p)``, ``where(g, 0, p)``: the same zeros for rows whose
keys are all masked, whose softmax is NaN), and becomes
``o = call_tir(fused_attention, (q, kt, v, bias))`` (``attention_kernel.py``): one
kernel per layer instead of two batched matmuls, a softmax and six elementwise kernels, and no
(B·H, Sq, Sk) intermediate in memory. Rows whose keys are all masked give zeros, as the guard
does. (Eager attention, exported without the guard, is left alone.)

At batch 1 the head split of q and v and the head merge of the output are absorbed too::

    q = reshape(permute_dims(reshape(x_q, (1, S, H, D)), [0, 2, 1, 3]), (H, S, D))
    x_q = strided_slice(y, axes=[-1], begin=[c], end=[c + H·D])       (optional)
    out = reshape(permute_dims(reshape(o, (1, H, S, Dv)), [0, 2, 1, 3]), (1, S, H·Dv))
  → out = call_tir(fused_attention_rows, (y, kt, x_v, bias))

The kernel reads q and v in the linears' row layout (a merged linear's output, at the column
offset of the slice) and writes the output rows the attention output linear reads, through
strided views: three transpose kernels per layer fewer, and the values are the same.

The kernel's register tiles are sized for the CPU given as ``FuseAttention(target=...)``
(``mbcompile.cpu.cpu_info``: 8 fp32 lanes on AVX2, 16 on AVX-512, 4 on NEON; 8 without a target),
never for the ambient ``tvm.target.Target.current``.

Bails (``refusals`` says why) unless everything is float32 with static shapes, the bias
broadcasts to (B, H, Sq, Sk), and ``s2``, ``p`` and the guarded probabilities have no other user
(e.g. ``output_attentions`` returning them).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from mbcompile.cpu import TargetLike, cpu_info
from mbcompile.passes.attention_kernel import RowsLayout, attention_kernel
from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import Graph, column_slice, is_call, static_shape


class FuseAttention(MobileBertPass):
    """``matmul(guarded_softmax(q·kt + bias), v) → call_tir(fused_attention, q, kt, v, bias)``."""

    name = "FuseAttention"
    takes_target = True

    def __init__(self, target: TargetLike | None = None) -> None:
        """``target``: the CPU the kernel's register tiles are sized for (``mbcompile.cpu``);
        None sizes them for 8 fp32 lanes, which any CPU runs correctly."""
        super().__init__()
        self.target = target
        self.lanes = cpu_info(target).lanes("float32")
        self.fma_by_lane = cpu_info(target).fma_by_lane
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
        self.zero = is_const()
        self.nan_guarded = is_op("relax.where")(
            is_op("relax.isnan")(self.probs), self.zero, self.probs
        )
        # As imported, an identity broadcast_to sits before the reshape (RemoveLayoutNoise
        # drops it); accept both.
        guarded = self.guarded | self.nan_guarded
        guarded_3d = guarded | is_op("relax.broadcast_to")(guarded, wildcard())
        self.pattern = is_op("relax.matmul")(is_op("relax.reshape")(guarded_3d, wildcard()), self.v)
        self._kernels: dict[str, tuple[relax.GlobalVar, tvm.tirx.PrimFunc]] = {}

    def __call__(self, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        self._kernels = {}
        self._builder = relax.BlockBuilder(mod)  # gives new kernels typed GlobalVars
        mod, fired = super().__call__(mod)
        for gvar, func in self._kernels.values():
            mod[gvar] = func
        return mod, fired

    def __repr__(self) -> str:
        return f"{self.name}()" if self.target is None else f"{self.name}(target={self.target!r})"

    def why_not(self, graph: Graph, var: relax.Var, m: dict) -> str | None:
        # Users inside the pattern: s2 → softmax and equal; p → full_like and where (isnan
        # and where).
        nan_guard = self.nan_guarded in m
        guarded = self.nan_guarded if nan_guard else self.guarded
        for part, inside in ((self.biased, 1 if nan_guard else 2), (self.probs, 2), (guarded, 1)):
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
        if nan_guard:
            zero = graph.constant(m[self.zero])
            if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
                return "the NaN guard does not put zeros"
            return None
        neg = graph.constant(m[self.neg_inf])
        if neg is None or neg.size != 1 or float(neg.reshape(())) != float("-inf"):
            return "the guard does not test for -inf"
        return None

    def rewrite(self, graph: Graph, var: relax.Var, m: dict) -> dict[relax.Var, relax.Expr]:
        q, v, bias = static_shape(m[self.q]), static_shape(m[self.v]), static_shape(m[self.bias])
        heads = static_shape(m[self.biased])[1]
        key = f"fused_attention_{q[0]}x{q[1]}x{v[1]}x{q[2]}x{v[2]}_h{heads}_b{'x'.join(map(str, bias))}"
        rows = self._rows_layout(graph, var, m, heads) if q[0] == heads else None
        if rows is None:
            args, layout, replaced = [m[self.q], m[self.kt], m[self.v], m[self.bias]], None, var
            out = relax.TensorType((q[0], q[1], v[2]), "float32")
        else:
            layout, q_rows, v_rows, replaced = rows
            args = [q_rows, m[self.kt], v_rows, m[self.bias]]
            out = relax.TensorType((1, q[1], heads * v[2]), "float32")
            key += f"_rows_q{layout.q_width}o{layout.q_offset}_v{layout.v_width}o{layout.v_offset}"
        if key not in self._kernels:
            func = attention_kernel(
                q[0], q[1], v[1], q[2], v[2], heads, bias, lanes=self.lanes, rows_layout=layout,
                fma_by_lane=self.fma_by_lane,
            )
            self._kernels[key] = (self._builder.add_func(func, key), func)
        return {replaced: relax.call_tir(self._kernels[key][0], args, out)}

    def _rows_layout(self, graph: Graph, var: relax.Var, m: dict, heads: int):
        """(RowsLayout, q rows, v rows, the var of the merged output) when q and v come from
        head splits of token rows and the output goes only into a head merge; else None."""
        q_src = self._head_split_source(graph, m[self.q], heads)
        v_src = self._head_split_source(graph, m[self.v], heads)
        merged = self._head_merge(graph, var, heads)
        if q_src is None or v_src is None or merged is None:
            return None
        (q_rows, q_off), (v_rows, v_off) = q_src, v_src
        layout = RowsLayout(static_shape(q_rows)[-1], q_off, static_shape(v_rows)[-1], v_off)
        return layout, q_rows, v_rows, merged

    def _head_split_source(self, graph: Graph, x: relax.Expr, heads: int):
        """(rows (S, W), column offset) if ``x`` (H, S, D) is
        ``reshape(permute_dims(reshape(rows[:, offset : offset + H·D], (1, S, H, D)), [0, 2, 1, 3]))``."""
        shape = static_shape(x)
        outer = graph.value(x)
        if shape is None or len(shape) != 3 or not is_call(outer, "relax.reshape"):
            return None
        _, seq, dim = shape
        permute = graph.value(outer.args[0])
        if not is_call(permute, "relax.permute_dims") or _axes(permute) != [0, 2, 1, 3]:
            return None
        inner = graph.value(permute.args[0])
        if not is_call(inner, "relax.reshape") or static_shape(inner) != (1, seq, heads, dim):
            return None
        rows = inner.args[0]
        if static_shape(rows) not in ((seq, heads * dim), (1, seq, heads * dim)):
            return None
        offset = 0
        sliced = column_slice(graph.value(rows))
        if sliced is not None:
            rows, offset = sliced
        rows_shape = static_shape(rows)
        if rows_shape is None or len(rows_shape) not in (2, 3) or rows_shape[-2] != seq:
            return None
        if len(rows_shape) == 3:
            if rows_shape[0] != 1:
                return None
            rows = relax.op.reshape(rows, (seq, rows_shape[-1]))  # a view
        return rows, offset

    def _head_merge(self, graph: Graph, var: relax.Var, heads: int) -> relax.Var | None:
        """The var of ``reshape(permute_dims(reshape(var, (1, H, S, Dv)), [0, 2, 1, 3]),
        (1, S, H·Dv))`` when that chain is the only user of ``var``, else None."""
        _, seq, dim_v = static_shape(var)
        chain = []
        current = var
        for _ in range(3):
            users = graph.consumers(current)
            if len(users) != 1 or graph.users(current) != 1:
                return None
            current = users[0]
            chain.append(graph.value(current))
        first, permute, last = chain
        if not (
            is_call(first, "relax.reshape")
            and static_shape(first) == (1, heads, seq, dim_v)
            and is_call(permute, "relax.permute_dims")
            and _axes(permute) == [0, 2, 1, 3]
            and is_call(last, "relax.reshape")
            and static_shape(last) == (1, seq, heads * dim_v)
        ):
            return None
        return current


def _axes(permute: relax.Call) -> list[int] | None:
    axes = permute.attrs.axes
    return None if axes is None else [int(a) for a in axes]

