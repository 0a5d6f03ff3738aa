"""The fused attention's two products in bf16, for reduced-precision builds: on Intel AMX's
matrix tiles, or on AVX512_BF16's ``vdpbf16ps`` vectors where there are no tiles (AMD Zen 4).

``FuseAttention``'s kernel (``passes/attention_kernel.py``) computes both products in fp32
FMAs: about 100 GFLOP/s on one core of an AMX Xeon, at 384 tokens a quarter of a bf16 forward
there; on Zen 4 about 58 GFLOP/s, 22% of a bf16 forward at 384 tokens (31 of 142 ms, per
kernel, instrumented). On a target with bf16 dot products and AVX-512, a bf16 or int8 build
swaps it for this kernel, with the same signature, arguments and guarded softmax::

    for b in parallel(heads):                    # once per head: K and V in AMX's B layout
        kb[b, key // 32, d // 2, key % 32, d % 2] = bf16(kt[b, d, key])
        vb[b, key // 2, d, key % 2]               = bf16(v[b, key, d])
    for b, block of 32 query rows in parallel:
        qb = bf16(q[b, rows])                               # 32 × dim
        s  = steps(qb · kb[b])                              # fp32 sums
        m  = max(s + bias)                                  # the bias row: once per block
        e  = exp(s + bias - m);  pb = bf16(e);  sum = Σ widen(pb)       # fp32, in vectors
        out[b, rows] = steps(pb · vb[b]) / sum              # fp32 sums

The steps are ``tile_intrinsics``' (``tdpbf16ps``) on AMX, ``dot_steps``' (``vdpbf16ps``, 8
rows × 32 columns in registers) elsewhere: both read this layout, called directly with a
block stride, the scores step walking the key panels (``bstep`` a panel of ``kb``, ``cstep``
32 score columns), the context step the head-dim panels of ``vb``.

K, head dims and keys are padded with zeros to 32 (a tile row of bf16), the padded keys' scores
with -inf. Rows whose keys are all masked give zeros, as ``FuseAttention``'s kernel does. The
sum is of the rounded probabilities the product uses, so the weights of every row add up to 1.
Each pair of bf16 values is built in one uint32 lane (``_pair``): no interleaving shuffle.

Accuracy: bf16 operands (8 bits of mantissa) with fp32 sums, as OpenVINO's bf16 runs its
attention (on AMX, and with AVX512_BF16's dot products on Zen 4). ``tests/test_precision.py``
holds the encoder's error to OpenVINO's: on AMX, the default encoder's max abs error on the
bench's input at 384 tokens is 2.7e-4 with it (2.6e-4 with fp32 attention; OpenVINO bf16
4.4e-4), int8's stays 1.2e-3 (ONNX Runtime int8 2.1e-3).

Speed, alone (4 heads of 32, 1 thread, warm, on a 2-core AMX Xeon): 0.35 ms against the fp32
kernel's 0.64 at 384 tokens, 42 µs against 72 at 128. The exponentials are most of what is left:
a row's are one LLVM IR loop (``softmax_rows.exp_row_ir``: ``vscalefps`` for the 2^n, two vectors rounded
by one ``vcvtne2ps2bf16``, the sum by one ``vdpbf16ps``), about 10 vector instructions per 16
scores where the TIR loop before it took 17 (384 tokens: 302 → 278 µs, medians, interleaved;
without any exponential the kernel takes 158 µs, without the softmax 127). The max is an IR
loop too (``softmax_rows.max_row_ir``), reading the scores and the block's bias row (one row when the mask
is the same for every query, as ``FoldAttentionMaskRows`` makes it) without writing the biased
scores back; the exponentials add the bias again, and their sum alternates between two
accumulators (Zen 4, 384 tokens, the kernel alone, interleaved medians: 539 → 516 µs against a
pass that wrote the biased scores and one accumulator). On a 2-core Zen 4
with the vector steps: 0.49–0.56 ms against the fp32 kernel's 0.86–0.92 at 384 tokens, 62 µs
against 101 at 128; the steps alone run at 206–233 GFLOP/s, the softmax and packing take the
other 0.15 ms at 384.
"""

from __future__ import annotations

import functools
import logging

import tvm
from tvm.script import tirx as T

from mbcompile import tvmscript
from mbcompile.cpu import cpu_info
from mbcompile.passes.attention_kernel import (
    LOG2E,
    RowsLayout,
    fused_attention_shapes,
    with_signature,
)
from mbcompile.targets.schedules import dot_steps, tile_intrinsics
from mbcompile.targets.schedules.llvm_text import join_ir
from mbcompile.targets.schedules.pack_bf16 import round_bf16
from mbcompile.targets.schedules.softmax_rows import (
    exp_row_ir,
    exp_row_name,
    max_row_ir,
    max_row_name,
)

tvmscript.install()  # this module parses TVMScript: without the slow frame walk

logger = logging.getLogger(__name__)

TILE_K = 32  # bf16 values per tile row: keys and head dims are padded to this
STEPS = ("tiles", "vectors")  # the products on AMX tiles, or on vdpbf16ps vectors
ROWS = tile_intrinsics.BLOCK_ROWS  # query rows per block: 2 row tiles


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def _bits(value):
    """fp32 → bf16 bits (nearest even) in the low half of a uint32."""
    return T.Cast("uint32", round_bf16(value))


def _pair(low, high):
    """Two fp32 values as one uint32 of two bf16: the k pair of AMX's B layout."""
    return T.bitwise_or(_bits(low), T.shift_left(_bits(high), T.uint32(16)))


@functools.lru_cache(maxsize=256)  # as attention_kernel: the same shapes, the same PrimFunc
def bf16_attention_kernel(
    bh: int,
    seq_q: int,
    seq_k: int,
    dim: int,
    dim_v: int,
    heads: int,
    bias_shape: tuple[int, ...],
    rows_layout: RowsLayout | None = None,
    steps: str = "tiles",
) -> tvm.tirx.PrimFunc:
    """The module doc's kernel, with ``attention_kernel``'s signature for the same arguments;
    ``steps`` (:data:`STEPS`): its products on AMX tiles or on ``vdpbf16ps`` vectors."""
    if steps not in STEPS:
        raise ValueError(f"steps must be one of {STEPS}, got {steps!r}")
    b0, h0, i0, j0 = bias_shape
    rows = min(ROWS, seq_q)
    blocks = -(-seq_q // rows)
    keys = _ceil(seq_k, TILE_K)
    dim_p = _ceil(dim, TILE_K)
    dim_vp = _ceil(dim_v, TILE_K)
    panels_k, panels_v = keys // TILE_K, dim_vp // TILE_K
    rows0, rows1 = min(rows, tile_intrinsics.TILE_ROWS), max(rows - tile_intrinsics.TILE_ROWS, 0)
    tiles = steps == "tiles"
    if tiles:
        step = tile_intrinsics.function_name("bf16", rows, TILE_K)
        step_ir = tile_intrinsics.llvm_ir("bf16", rows, TILE_K)
    else:
        step = dot_steps.function_name(rows)
        step_ir = dot_steps.llvm_ir(rows)
    exp_row, max_row = exp_row_name(keys), max_row_name(keys)
    ir = join_ir(step_ir, max_row_ir(keys), exp_row_ir(keys))
    neg_inf = T.float32("-inf")
    kb_head = keys * dim_p // 2  # uint32 pairs of one head's K
    vb_head = keys * dim_vp // 2
    panel_bytes = TILE_K * 4  # one row of a B panel: 32 columns of uint32 pairs

    @T.macro
    def fill_bias_row(brow, bias, b, row):
        for k in T.vectorized(keys):
            brow[k] = T.if_then_else(
                k < seq_k,
                bias[b // heads % b0, b % heads % h0, row % i0, T.min(k, seq_k - 1) % j0],
                neg_inf,
            )

    @T.macro
    def attend(q, kt, v, bias, out):
        kb = T.alloc_buffer((bh, panels_k, dim_p // 2, TILE_K), "uint32")
        vb = T.alloc_buffer((bh, keys // 2, dim_vp), "uint32")
        for b in T.parallel(bh):
            for p, d2 in T.grid(panels_k, dim_p // 2):
                for j in T.vectorized(TILE_K):
                    kb[b, p, d2, j] = T.if_then_else(
                        p * TILE_K + j < seq_k and 2 * d2 < dim,
                        _pair(kt[b, T.min(2 * d2, dim - 1), T.min(p * TILE_K + j, seq_k - 1)],
                              T.if_then_else(2 * d2 + 1 < dim,
                                             kt[b, T.min(2 * d2 + 1, dim - 1),
                                                T.min(p * TILE_K + j, seq_k - 1)],
                                             T.float32(0))),
                        T.uint32(0),
                    )  # fmt: skip
            for k2 in range(keys // 2):
                for d in T.vectorized(dim_vp):
                    vb[b, k2, d] = T.if_then_else(
                        2 * k2 < seq_k and d < dim_v,
                        _pair(v[b, T.min(2 * k2, seq_k - 1), T.min(d, dim_v - 1)],
                              T.if_then_else(2 * k2 + 1 < seq_k,
                                             v[b, T.min(2 * k2 + 1, seq_k - 1), T.min(d, dim_v - 1)],
                                             T.float32(0))),
                        T.uint32(0),
                    )  # fmt: skip
        for blk in T.parallel(bh * blocks, annotations={"pragma_import_llvm": ir}):
            qb = T.alloc_buffer((rows, dim_p), "uint16")
            s = T.alloc_buffer((rows, keys), "float32")
            pb = T.alloc_buffer((rows, keys), "uint16")
            ctx = T.alloc_buffer((rows, dim_vp), "float32")
            inv = T.alloc_buffer((rows,), "float32")
            shift = T.alloc_buffer((rows,), "float32")
            brow = T.alloc_buffer((keys,), "float32")
            top = T.alloc_buffer((1,), "float32")
            b = blk // blocks
            row0 = T.min(blk % blocks * rows, seq_q - rows)
            for r in range(rows):
                for d in T.vectorized(dim_p):
                    qb[r, d] = T.if_then_else(
                        d < dim, round_bf16(q[b, row0 + r, T.min(d, dim - 1)]), T.uint16(0)
                    )
            # the first row's bias here: the buffer then lives across the scores step, where
            # TVM would otherwise give it the storage of qb (uint16), which its pointer refuses
            fill_bias_row(brow, bias, b, row0)
            # scores: one step per 32 keys (the query tiles loaded once per step on AMX)
            if tiles:
                T.evaluate(T.call_extern(
                    "int32", step,
                    s.access_ptr("w"), T.int64(keys * 4), qb.access_ptr("r"), T.int64(dim_p * 2),
                    kb.access_ptr("r", offset=b * kb_head), T.int64(panel_bytes),
                    T.int64(dim_p // TILE_K), rows0, rows1, T.int64(panels_k),
                    kb.access_ptr("r", offset=b * kb_head), 0,
                    T.int64(0), T.int64(dim_p // 2 * panel_bytes), T.int64(TILE_K * 4),
                ))  # fmt: skip
            else:
                T.evaluate(T.call_extern(
                    "int32", step,
                    qb.access_ptr("r"), T.int64(dim_p * 2),
                    kb.access_ptr("r", offset=b * kb_head), T.int64(panel_bytes),
                    s.access_ptr("w"), T.int64(keys * 4),
                    T.int64(dim_p // 2), T.int64(panels_k),
                    T.int64(dim_p // 2 * panel_bytes), T.int64(TILE_K * 4),
                ))  # fmt: skip
            # guarded softmax, row by row: max of the biased scores, exp in base 2, sum. The
            # bias row (-inf past the keys) is built once per block when it is the same for
            # every query (FoldAttentionMaskRows gives that), else per row.
            for r in range(rows):
                if i0 > 1 and r > 0:
                    fill_bias_row(brow, bias, b, row0 + r)
                top[0] = T.call_extern(
                    "float32", max_row, s.access_ptr("r", offset=r * keys), brow.access_ptr("r")
                )
                inv[r] = T.Select(top[0] == neg_inf, T.float32(0), T.float32(1))
                shift[r] = T.Select(top[0] == neg_inf, T.float32(0), -top[0] * T.float32(LOG2E))
                # exp(s + bias - max) rounded to bf16 into pb, and the sum of what was rounded
                inv[r] = inv[r] / T.call_extern(
                    "float32", exp_row, s.access_ptr("r", offset=r * keys), brow.access_ptr("r"),
                    pb.access_ptr("w", offset=r * keys), shift[r],
                )  # fmt: skip
            # context: one step per 32 head dims, over all keys
            if tiles:
                T.evaluate(T.call_extern(
                    "int32", step,
                    ctx.access_ptr("w"), T.int64(dim_vp * 4), pb.access_ptr("r"), T.int64(keys * 2),
                    vb.access_ptr("r", offset=b * vb_head), T.int64(dim_vp * 4),
                    T.int64(keys // TILE_K), rows0, rows1, T.int64(panels_v),
                    vb.access_ptr("r", offset=b * vb_head), 0,
                    T.int64(0), T.int64(panel_bytes), T.int64(TILE_K * 4),
                ))  # fmt: skip
            else:
                T.evaluate(T.call_extern(
                    "int32", step,
                    pb.access_ptr("r"), T.int64(keys * 2),
                    vb.access_ptr("r", offset=b * vb_head), T.int64(dim_vp * 4),
                    ctx.access_ptr("w"), T.int64(dim_vp * 4),
                    T.int64(keys // 2), T.int64(panels_v),
                    T.int64(panel_bytes), T.int64(TILE_K * 4),
                ))  # fmt: skip
            for r in range(rows):
                for d in T.vectorized(dim_v):
                    out[b, row0 + r, d] = ctx[r, d] * inv[r]

    return with_signature(attend, bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, rows_layout)


def bf16_attention_steps(target: tvm.target.Target, precision: str) -> str | None:
    """The steps a ``precision`` build for ``target`` runs this kernel on: "tiles" (AMX bf16
    tiles), "vectors" (AVX512_BF16 without them), or None, keeping ``FuseAttention``'s fp32
    kernel: an fp32 build, or a CPU without AVX-512's bf16 dot product (which the softmax's
    rounding uses too: ``vcvtne2ps2bf16``, ``vdpbf16ps``)."""
    info = cpu_info(target)
    if precision not in ("bf16", "int8") or info.bf16_dot != "vdpbf16ps":
        return None
    return "tiles" if "bf16" in info.tile_kinds else "vectors"


@tvm.transform.module_pass(opt_level=0, name="Bf16Attention")
class Bf16Attention:
    """Swap every fused attention kernel (``FuseAttention``) for this module's, on the steps
    ``bf16_attention_steps`` gives. ``last_count`` holds how many kernels the last run swapped."""

    def __init__(self, target: tvm.target.Target, precision: str = "fp32"):
        self.target = target
        self.precision = precision
        self.last_count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.last_count = 0
        steps = bf16_attention_steps(self.target, self.precision)
        if steps is None:
            return mod
        mod = mod.clone()  # a pass returns a new module: the caller's keeps its functions
        for gvar, args in fused_attention_shapes(mod):
            mod[gvar] = bf16_attention_kernel(**args, steps=steps)
            self.last_count += 1
        logger.info("Bf16Attention: %d attention kernels in bf16 on %s", self.last_count, steps)
        return mod
