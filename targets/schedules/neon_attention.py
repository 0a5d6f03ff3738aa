"""The fused attention's two products as NEON steps, on AArch64 targets.

``FuseAttention``'s kernel (``passes/attention_kernel.py``) computes both products with TIR
register tiles of 4 query rows × 8 keys (scores) and 4 rows × 16 head dims (context), whose
loads LLVM cannot merge: 1.70 executed instructions per FMLA at 128 tokens, 1.72 at 384 (one
default-width layer, 4 heads of 32, on the emulated device). On a target with FMA by lane the
layout stage swaps it for this kernel, with the same signature, arguments and guarded softmax
(the same range reduction and polynomial as ``guarded_softmax``): 1.50 and 1.48::

    for b, block of 4 query rows in parallel:
        for each 16 keys:   acc = step(q[b, rows, :], kt[b, :, keys])      # K = head dim
                            s[rows, keys] = acc + bias
        softmax(s)                                                          # in place, 1/sum
        for each 16 dims:   acc = step(s[rows, :seq_k], v[b, :, dims])     # K = keys
                            out[b, rows, dims] = acc / sum

Both products are ``neon_steps``' step (4 rows × 16 columns over all of K, 16 B values of
a k per ``ld1``), called directly with B's row stride: ``kt``'s rows for the scores, ``v``'s
for the context. Keys or head dims beyond the last whole 16 take plain TIR loops.

Only where the query rows divide by 4: every default compiled length does (8, 16, ..., 512);
a length given by ``seq_len`` or ``max_seq_len`` that does not keeps ``FuseAttention``'s kernel.
"""

from __future__ import annotations

import functools
import logging
import struct

import numpy as np
import tvm
from tvm.script import tirx as T

from mbcompile import tvmscript
from mbcompile.cpu import cpu_info
from mbcompile.passes.attention_kernel import (
    EXP2_POLY,
    LOG2E,
    NEG_INF,
    RowsLayout,
    fused_attention_shapes,
    with_signature,
)
from mbcompile.targets.schedules import neon_steps
from mbcompile.targets.schedules.llvm_text import join_ir

tvmscript.install()  # this module parses TVMScript: without the slow frame walk

logger = logging.getLogger(__name__)

ROWS = 4  # query rows per block: one step's rows
LANES = 4
COLUMNS = neon_steps.COLUMNS


def fits(seq_q: int) -> bool:
    """Whether the kernel takes an attention with ``seq_q`` query rows."""
    return seq_q % ROWS == 0


def _float(value: float) -> str:
    """An fp32 constant as LLVM IR writes it (the double of the same value, in hex)."""
    bits = struct.unpack("<Q", struct.pack("<d", float(np.float32(value))))[0]
    return f"0x{bits:016X}"


def _splat(value: float) -> str:
    return "<" + ", ".join([f"float {_float(value)}"] * LANES) + ">"


SOFTMAX_UNROLL = 4  # vectors per loop iteration of each pass


def softmax_row_name(vectors: int) -> str:
    return f"mbc_neon_softmax_{vectors}"


def softmax_row_ir(vectors: int) -> str:
    """``float @mbc_neon_softmax_<n>(ptr s)``: ``guarded_softmax`` of one row of ``n`` vectors
    of scores, in place (``exp(s - max)``, the same range reduction and polynomial), returning
    ``1 / sum`` (0 when every score is -inf).

    In LLVM IR, for its constants: in the TIR loop, LLVM rematerialised each of the 8 inside the
    exponential's loop (a mov, a movk and a dup), as the kernel's steps wanted every register:
    44 instructions per 4 scores instead of 21. Here each passes through an empty asm once per
    row, which cannot be rematerialised, so they stay in registers for the row."""
    v4 = f"<{LANES} x float>"
    consts = {"log2e": LOG2E, "low": -126.0, "one": 1.0,
              **{f"c{i + 1}": c for i, c in enumerate(EXP2_POLY)}}
    head = [f'  %{name} = call {v4} asm "", "=w,0"({v4} {_splat(value)})'
            for name, value in consts.items()]
    main, rest = divmod(vectors, SOFTMAX_UNROLL)

    def max_body(i: str, m: str, count: int, tag: str) -> tuple[list[str], str]:
        lines = []
        for u in range(count):
            lines += [f"  %mo{tag}{u} = add i64 {i}, {u * LANES}",
                      f"  %mp{tag}{u} = getelementptr float, ptr %s, i64 %mo{tag}{u}",
                      f"  %mx{tag}{u} = load {v4}, ptr %mp{tag}{u}, align 4",
                      f"  %mm{tag}{u} = call {v4} @llvm.maxnum.v4f32({v4} {m}, {v4} %mx{tag}{u})"]
            m = f"%mm{tag}{u}"
        return lines, m

    def exp_body(i: str, total: str, count: int, tag: str) -> tuple[list[str], str]:
        lines = []
        for u in range(count):
            x = f"{tag}{u}"
            lines += [
                f"  %eo{x} = add i64 {i}, {u * LANES}",
                f"  %ep{x} = getelementptr float, ptr %s, i64 %eo{x}",
                f"  %ex{x} = load {v4}, ptr %ep{x}, align 4",
                f"  %et0{x} = call {v4} @llvm.fma.v4f32({v4} %ex{x}, {v4} %log2e, {v4} %shiftv)",
                f"  %et{x} = call {v4} @llvm.maxnum.v4f32({v4} %et0{x}, {v4} %low)",
                f"  %en{x} = call {v4} @llvm.roundeven.v4f32({v4} %et{x})",
                f"  %ef{x} = fsub {v4} %et{x}, %en{x}",
                f"  %ep5{x} = call {v4} @llvm.fma.v4f32({v4} %c5, {v4} %ef{x}, {v4} %c4)",
                f"  %ep4{x} = call {v4} @llvm.fma.v4f32({v4} %ep5{x}, {v4} %ef{x}, {v4} %c3)",
                f"  %ep3{x} = call {v4} @llvm.fma.v4f32({v4} %ep4{x}, {v4} %ef{x}, {v4} %c2)",
                f"  %ep2{x} = call {v4} @llvm.fma.v4f32({v4} %ep3{x}, {v4} %ef{x}, {v4} %c1)",
                f"  %ep1{x} = call {v4} @llvm.fma.v4f32({v4} %ep2{x}, {v4} %ef{x}, {v4} %one)",
                f"  %ei{x} = fptosi {v4} %en{x} to <{LANES} x i32>",
                f"  %eb{x} = shl <{LANES} x i32> %ei{x}, <{', '.join(['i32 23'] * LANES)}>",
                f"  %eone{x} = bitcast {v4} %one to <{LANES} x i32>",
                f"  %es{x} = add <{LANES} x i32> %eb{x}, %eone{x}",
                f"  %esc{x} = bitcast <{LANES} x i32> %es{x} to {v4}",
                f"  %ee{x} = fmul {v4} %ep1{x}, %esc{x}",
                f"  store {v4} %ee{x}, ptr %ep{x}, align 4",
                f"  %esum{x} = fadd {v4} {total}, %ee{x}",
            ]
            total = f"%esum{x}"
        return lines, total

    neg_inf = _splat(float("-inf"))
    blocks = []
    if main:
        body, m = max_body("%mi", "%mphi", SOFTMAX_UNROLL, "l")
        blocks += ["  br label %maxloop", "maxloop:",
                   "  %mi = phi i64 [0, %entry], [%mnext, %maxloop]",
                   f"  %mphi = phi {v4} [{neg_inf}, %entry], [{m}, %maxloop]", *body,
                   f"  %mnext = add i64 %mi, {SOFTMAX_UNROLL * LANES}",
                   f"  %mmore = icmp ult i64 %mnext, {main * SOFTMAX_UNROLL * LANES}",
                   "  br i1 %mmore, label %maxloop, label %maxtail", "maxtail:"]
        m_in = m
    else:
        m_in = neg_inf
    body, m = max_body(str(main * SOFTMAX_UNROLL * LANES), m_in, rest, "t")
    blocks += body
    blocks += [f"  %max = call float @llvm.vector.reduce.fmax.v4f32({v4} {m})",
               "  %masked = fcmp oeq float %max, 0xFFF0000000000000",
               f"  %negmax = fmul float %max, {_float(-LOG2E)}",
               "  %shift = select i1 %masked, float 0.0, float %negmax",
               f"  %shift1 = insertelement {v4} poison, float %shift, i64 0",
               f"  %shiftv = shufflevector {v4} %shift1, {v4} poison, <{LANES} x i32> zeroinitializer"]
    if main:
        body, total = exp_body("%xi", "%xphi", SOFTMAX_UNROLL, "l")
        blocks += ["  br label %exploop", "exploop:",
                   "  %xi = phi i64 [0, %maxdone], [%xnext, %exploop]",
                   f"  %xphi = phi {v4} [zeroinitializer, %maxdone], [{total}, %exploop]",
                   *body,
                   f"  %xnext = add i64 %xi, {SOFTMAX_UNROLL * LANES}",
                   f"  %xmore = icmp ult i64 %xnext, {main * SOFTMAX_UNROLL * LANES}",
                   "  br i1 %xmore, label %exploop, label %exptail", "exptail:"]
        t_in = total
    else:
        t_in = "zeroinitializer"
    body, total = exp_body(str(main * SOFTMAX_UNROLL * LANES), t_in, rest, "t")
    blocks += body
    blocks += [f"  %sum = call reassoc float @llvm.vector.reduce.fadd.v4f32(float -0.0, {v4} {total})",
               "  %inv = fdiv float 1.0, %sum",
               "  %result = select i1 %masked, float 0.0, float %inv",
               "  ret float %result"]
    # the max's reduction and shift sit in their own block, the exponential's loop's entry
    at = blocks.index(f"  %max = call float @llvm.vector.reduce.fmax.v4f32({v4} {m})")
    blocks[at:at] = ["  br label %maxdone", "maxdone:"]
    nl = "\n"
    return f"""
declare {v4} @llvm.fma.v4f32({v4}, {v4}, {v4})
declare {v4} @llvm.maxnum.v4f32({v4}, {v4})
declare {v4} @llvm.roundeven.v4f32({v4})
declare float @llvm.vector.reduce.fmax.v4f32({v4})
declare float @llvm.vector.reduce.fadd.v4f32(float, {v4})

define internal float @{softmax_row_name(vectors)}(ptr noalias %s) alwaysinline {{
entry:
{nl.join(head)}
{nl.join(blocks)}
}}
"""


@functools.lru_cache(maxsize=256)
def neon_attention_kernel(bh: int, seq_q: int, seq_k: int, dim: int, dim_v: int, heads: int,
                          bias_shape: tuple[int, ...], rows_layout: RowsLayout | None = None
                          ) -> tvm.tirx.PrimFunc:
    """``attention_kernel``'s computation and signature with NEON steps (the module doc);
    ``seq_q`` a multiple of 4 (``fits``)."""
    if not fits(seq_q):
        raise ValueError(f"the NEON attention takes query rows in 4s, got {seq_q}")
    b0, h0, i0, j0 = bias_shape
    rows, lanes = ROWS, LANES
    blocks = seq_q // rows
    padded = -(-seq_k // lanes) * lanes
    key_steps, key_rest = divmod(seq_k, COLUMNS)
    dim_steps, dim_rest = divmod(dim_v, COLUMNS)
    key_end, dim_end = key_steps * COLUMNS, dim_steps * COLUMNS
    # element strides of the head, token and feature axes of q and v
    if rows_layout is None:
        q_strides, v_strides = (seq_q * dim, dim), (seq_k * dim_v, dim_v)
    else:
        q_strides, v_strides = (dim, rows_layout.q_width), (dim_v, rows_layout.v_width)
    # The products, each a row of steps (one call per block): B is kt[b, :, keys] (rows seq_k
    # apart) for the scores, v[b, :, dims] (rows a token apart) for the context. The bias is
    # added by the scores' steps where it has a value per key (rows of it: one for all query
    # rows, or one per row), else by a loop here.
    bias_in_steps = j0 == seq_k and i0 in (1, seq_q)
    bias_stride = (0 if i0 == 1 else seq_k * 4) if bias_in_steps else None
    # A 4 k at a time: the kernel keeps a few values in registers across the steps
    scores_step = neon_steps.Step(rows, dim, seq_k * 4, a_depth=LANES)
    context_step = neon_steps.Step(rows, seq_k, v_strides[1] * 4, a_depth=LANES)
    scores = neon_steps.row_function_name(scores_step, key_steps, bias_stride)
    context = neon_steps.row_function_name(context_step, dim_steps)
    ir = []
    if key_steps:
        ir += [neon_steps.llvm_ir(scores_step),
               neon_steps.row_llvm_ir(scores_step, key_steps, bias_stride)]
    if dim_steps:  # (the same step as the scores' when dim, keys and dims are all 16)
        ir += [neon_steps.llvm_ir(context_step),
               neon_steps.row_llvm_ir(context_step, dim_steps)]
    ir.append(softmax_row_ir(padded // lanes))
    softmax = softmax_row_name(padded // lanes)
    imports = {"pragma_import_llvm": join_ir(*ir)}

    def bias_row(b, row0):
        """The offset of the bias row the block's first query row adds (called as the script
        is parsed: ``b``, ``row0`` are its expressions)."""
        return ((b // heads % b0 * h0 + b % heads % h0) * i0 + row0 % i0) * j0

    @T.macro
    def attend(q, kt, v, bias, out):
        for blk in T.parallel(bh * blocks, annotations=imports):
            s = T.alloc_buffer((rows, padded), "float32")
            ctx = T.alloc_buffer((rows, max(dim_end, 1)), "float32")
            acc = T.alloc_buffer((rows, COLUMNS), "float32")
            inv = T.alloc_buffer((rows,), "float32")
            b = blk // blocks
            row0 = blk % blocks * rows
            # 1. scores, 16 keys a step
            if key_steps > 0:
                T.evaluate(T.call_extern(
                    "int32", scores, s.access_ptr("w"), T.int32(padded),
                    q.access_ptr("r", offset=b * q_strides[0] + row0 * q_strides[1]),
                    T.int32(q_strides[1]),
                    kt.access_ptr("r", offset=b * dim * seq_k),
                    bias.access_ptr("r", offset=bias_row(b, row0)),
                ))  # fmt: skip
                if not bias_in_steps:
                    for r in range(rows):
                        for j in T.vectorized(key_end):
                            s[r, j] = s[r, j] + bias[
                                b // heads % b0, b % heads % h0, (row0 + r) % i0, j % j0
                            ]
            if key_rest > 0:
                for r in range(rows):
                    for j in T.vectorized(key_rest):
                        s[r, key_end + j] = bias[
                            b // heads % b0, b % heads % h0, (row0 + r) % i0, (key_end + j) % j0
                        ]
                    for d in range(dim):
                        for j in T.vectorized(key_rest):
                            s[r, key_end + j] = (
                                s[r, key_end + j] + q[b, row0 + r, d] * kt[b, d, key_end + j]
                            )
            if padded > seq_k:
                for r in range(rows):
                    for j in T.vectorized(padded - seq_k):
                        s[r, seq_k + j] = NEG_INF
            # 2. guarded softmax, row by row, in place
            for r in range(rows):
                inv[r] = T.call_extern("float32", softmax, s.access_ptr("rw", offset=r * padded))
            # 3. context, 16 head dims a step
            if dim_steps > 0:
                T.evaluate(T.call_extern(
                    "int32", context, ctx.access_ptr("w"), T.int32(max(dim_end, 1)),
                    s.access_ptr("r"), T.int32(padded),
                    v.access_ptr("r", offset=b * v_strides[0]), s.access_ptr("r"),
                ))  # fmt: skip
                for r in range(rows):
                    for d in T.vectorized(dim_end):
                        out[b, row0 + r, d] = ctx[r, d] * inv[r]
            if dim_rest > 0:
                for r in range(rows):
                    for d in T.vectorized(dim_rest):
                        acc[r, d] = T.float32(0)
                    for j in range(seq_k):
                        for d in T.vectorized(dim_rest):
                            acc[r, d] = acc[r, d] + s[r, j] * v[b, j, dim_end + d]
                    for d in T.vectorized(dim_rest):
                        out[b, row0 + r, dim_end + d] = acc[r, d] * inv[r]

    return with_signature(attend, bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, rows_layout)


def neon_attention_applies(target: tvm.target.Target) -> bool:
    """Whether builds for ``target`` take this kernel: AArch64 (FMA by lane), any precision
    (the attention is fp32 in every one)."""
    return cpu_info(target).fma_by_lane


@tvm.transform.module_pass(opt_level=0, name="NeonAttention")
class NeonAttention:
    """Swap every fused attention kernel (``FuseAttention``) that ``fits`` for this module's,
    where ``neon_attention_applies``. ``last_count`` holds how many kernels the last run
    swapped."""

    def __init__(self, target: tvm.target.Target):
        self.target = target
        self.last_count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.last_count = 0
        if not neon_attention_applies(self.target):
            return mod
        mod = mod.clone()  # a pass returns a new module: the caller's keeps its functions
        for gvar, args in fused_attention_shapes(mod):
            if fits(args["seq_q"]):
                mod[gvar] = neon_attention_kernel(**args)
                self.last_count += 1
        logger.info("NeonAttention: %d attention kernels as NEON steps", self.last_count)
        return mod
