"""The fused attention kernel FuseAttention calls: one TIR PrimFunc per shape, already scheduled.

Each parallel iteration takes a block of query rows (``Tiles.rows``) of one (batch·head), so
every load of K and V serves all of them, and keeps the block's scores in a local buffer:

1. scores ``q·kᵀ + bias``: a register tile of the block's rows × vectors of keys, reduced over
   the head dim (12 independent FMA chains on AVX2);
2. per row: the max by vector-wide partials; ``exp(s - max)`` in base 2 (range reduction and a
   degree-5 polynomial, relative error 2e-7; LLVM's ``expf`` is a scalar libm call); the sum by
   vector-wide partials. A row whose scores are all -inf (every key masked) gives zeros, as HF's
   guarded softmax does;
3. context ``p·V``: a register tile of the block's rows × vectors of head dims, reduced over keys,
   scaled by 1/sum on the way out.

The last block of a head recomputes (and rewrites, identically) the last row when ``seq_q`` is not
a multiple of the rows; keys and head dims that do not fill a vector get a narrower tail. Vector
intermediates live in small buffers, not ``let`` bindings (TVM 0.27's vectorizer got those
wrong inside ``T.vectorized`` loops); LLVM keeps them in registers. They are in "global" scope:
on CPU, TVM 0.27 puts a buffer on the stack only in that scope and under 1 KiB, and lowers any
other to a heap workspace call in every parallel iteration (``local`` buffers cost 15% of this
kernel). The block's scores (rows × keys) are larger and take that call, once per block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from mbcompile import tvmscript
from mbcompile.cpu import DEFAULT_CPU

tvmscript.install()  # the kernel is TVMScript, parsed per shape: without the slow frame walk
# Marks the PrimFunc for the report (a fused attention counts as one matmul).
KIND_ATTR = "mbcompile.kind"
KIND = "attention"
# The kernel's arguments (JSON: ``attention_kernel``'s shape arguments), for a target stage that
# swaps in a kernel of its own with the same signature (``targets/schedules/bf16_attention.py``).
SHAPE_ATTR = "mbcompile.attention_shape"

@dataclass(frozen=True)
class Tiles:
    """The kernel's register tiles: query rows per block, the unrolled groups of the reductions
    over head dims (scores) and keys (context), the vectors of keys and head dims per row."""

    rows: int
    unroll_dim: int
    unroll_keys: int
    key_vectors: int
    dim_vectors: int


# x86 (FMA with a broadcast operand): 6 rows × 2 vectors = 12 accumulators of 16 AVX2 registers.
BROADCAST_TILES = Tiles(rows=6, unroll_dim=8, unroll_keys=4, key_vectors=2, dim_vectors=2)
# AArch64 (FMA by lane, rows staged as vectors): 4 rows, groups of 4 head dims and 8 keys, 4
# vectors of head dims in the context tile (16 accumulators, 8 staged probability vectors).
# With the x86 tiles LLVM kept the 6 rows' staged groups on the stack and moved their lanes
# through general registers. Counted on the emulated device (one layer's kernel, 4 heads of 32):
# 17.7M instructions against 23.4M at 384 tokens, 1.95M against 2.66M at 128, 0.12M against
# 0.18M at 32.
BY_LANE_TILES = Tiles(rows=4, unroll_dim=4, unroll_keys=8, key_vectors=2, dim_vectors=4)

LOG2E = 1.4426950408889634
# 2^f ≈ 1 + f·(c1 + f·(c2 + f·(c3 + f·(c4 + f·c5)))) on |f| <= 1/2, fitted for relative error.
EXP2_POLY = (6.931470037e-01, 2.402224243e-01, 5.550733581e-02, 9.671512991e-03, 1.326472382e-03)
EXP2_C1, EXP2_C2, EXP2_C3, EXP2_C4, EXP2_C5 = (T.float32(c) for c in EXP2_POLY)
NEG_INF = T.float32("-inf")


@T.macro
def _fold(part, width, maximum):
    """part[:width] = max (or sum) of part[:width] and part[width : 2·width]."""
    for ln in T.vectorized(width):
        if maximum:
            part[ln] = T.max(part[ln], part[ln + width])
        else:
            part[ln] = part[ln] + part[ln + width]


@T.macro
def reduce_lanes(part, lanes, maximum):
    """part[0] = the max (or sum) of part[:lanes], ``lanes`` a power of two up to 16, in a tree
    of halves: a chain of ``lanes - 1`` scalar steps (what a loop over the lanes gives) is a
    long dependency per row, next to the softmax's few vector steps per row."""
    if lanes >= 2:
        _fold(part, lanes // 2, maximum)
    if lanes >= 4:
        _fold(part, lanes // 4, maximum)
    if lanes >= 8:
        _fold(part, lanes // 8, maximum)
    if lanes >= 16:
        _fold(part, lanes // 16, maximum)


@T.macro
def guarded_softmax(s, inv, shift, part, t, n, e, rows, padded, lanes):
    """Row by row, in place on ``s[:rows, :padded]``: ``exp(s - max)`` in base 2 (range reduction
    and ``EXP2_POLY``), ``inv[r] = 1 / sum`` (0 for a row whose scores are all -inf: every key
    masked, as HF's guarded softmax gives zeros). ``part``, ``t``, ``n``, ``e``: ``lanes``-wide
    scratch vectors; ``shift``: a scratch row value."""
    for r in range(rows):
        for ln in T.vectorized(lanes):
            part[ln] = s[r, ln]
        for c in range(1, padded // lanes):
            for ln in T.vectorized(lanes):
                part[ln] = T.max(part[ln], s[r, c * lanes + ln])
        reduce_lanes(part, lanes, True)
        # Every key masked: 1/sum becomes 0, and the shift 0 keeps -inf - max from NaN.
        inv[r] = T.Select(part[0] == NEG_INF, T.float32(0), T.float32(1))
        shift[r] = T.Select(part[0] == NEG_INF, T.float32(0), -part[0] * T.float32(LOG2E))
        for ln in T.vectorized(lanes):
            part[ln] = T.float32(0)
        for c in range(padded // lanes):
            # exp(s - max) = 2^t, t = n + f, n integer, |f| <= 1/2; t >= -126 keeps
            # 2^n normal (a masked key gives 1e-38, nothing next to the max's 1).
            for ln in T.vectorized(lanes):
                t[ln] = T.max(
                    s[r, c * lanes + ln] * T.float32(LOG2E) + shift[r], T.float32(-126)
                )
            for ln in T.vectorized(lanes):
                n[ln] = T.nearbyint(t[ln])
            for ln in T.vectorized(lanes):
                t[ln] = t[ln] - n[ln]
            for ln in T.vectorized(lanes):
                e[ln] = (
                    ((((EXP2_C5 * t[ln] + EXP2_C4) * t[ln] + EXP2_C3) * t[ln] + EXP2_C2) * t[ln]
                      + EXP2_C1) * t[ln] + T.float32(1)
                ) * T.reinterpret("float32", T.shift_left(T.Cast("int32", n[ln]) + 127, 23))
            for ln in T.vectorized(lanes):
                s[r, c * lanes + ln] = e[ln]
            for ln in T.vectorized(lanes):
                part[ln] = part[ln] + e[ln]
        reduce_lanes(part, lanes, False)
        inv[r] = inv[r] / part[0]


@dataclass(frozen=True)
class RowsLayout:
    """q as (seq_q, q_width) and v as (seq_k, v_width), one row per token, head ``h`` at columns
    ``offset + h · dim``: the output of the linears (or of a merged linear, whose other columns
    are skipped). The output is (1, seq_q, heads · dim_v)."""

    q_width: int
    q_offset: int
    v_width: int
    v_offset: int


# Parsed once per shape and process (a test suite, a notebook): the same, immutable, PrimFunc.
@functools.lru_cache(maxsize=256)
def attention_kernel(
    bh: int,
    seq_q: int,
    seq_k: int,
    dim: int,
    dim_v: int,
    heads: int,
    bias_shape: tuple[int, ...],
    *,
    lanes: int | None = None,
    rows_layout: RowsLayout | None = None,
    fma_by_lane: bool = False,
) -> tvm.tirx.PrimFunc:
    """``out[bh, i, :] = softmax_guarded(q[bh, i] · kt[bh] + bias[b, h, i]) · v[bh]``.

    q (bh, seq_q, dim); kt (bh, dim, seq_k); v (bh, seq_k, dim_v); bias 4-D, broadcastable to
    (bh / heads, heads, seq_q, seq_k); out (bh, seq_q, dim_v); ``bh = batch · heads``.
    ``lanes``: fp32 lanes per vector, ``cpu_info(target).lanes("float32")`` of the target the
    kernel is for (``mbcompile.cpu``); by default 8, the lanes of :data:`~mbcompile.cpu.DEFAULT_CPU`.
    Any value gives correct code (LLVM splits or pads vectors); the right one keeps the register
    tiles in registers.

    ``fma_by_lane`` (AArch64, ``cpu_info(target).fma_by_lane``): each unrolled group of the
    reductions first loads every row's group of q values (scores) and of probabilities
    (context) with one vector load per row into a small buffer, and the steps multiply by its
    lanes (``fmla v.4s, v.4s, v.s[i]``) instead of loading one scalar per row per step; its
    tiles are ``BY_LANE_TILES``, else ``BROADCAST_TILES``.

    ``rows_layout`` (batch 1 only): q, v and out in the linears' layout instead, one row per
    token with head ``h`` at columns ``offset + h · dim`` (see RowsLayout). The kernel reads and
    writes them through strided views, so no transpose kernel runs before or after it.
    """
    shape = json.dumps({
        "bh": bh, "seq_q": seq_q, "seq_k": seq_k, "dim": dim, "dim_v": dim_v, "heads": heads,
        "bias_shape": list(bias_shape),
        "rows_layout": None if rows_layout is None else dataclasses.asdict(rows_layout),
    })  # fmt: skip
    return _kernel(bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, lanes, rows_layout,
                   fma_by_lane).with_attr(SHAPE_ATTR, shape)


def _kernel(bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, lanes, rows_layout, fma_by_lane):
    b0, h0, i0, j0 = bias_shape
    lanes = lanes or DEFAULT_CPU.lanes("float32")
    if lanes not in (1, 2, 4, 8, 16):
        raise ValueError(f"lanes must be a power of two up to 16, got {lanes}")
    tiles = BY_LANE_TILES if fma_by_lane else BROADCAST_TILES
    rows = min(tiles.rows, seq_q)
    blocks = (seq_q + rows - 1) // rows
    key_tile = tiles.key_vectors * lanes  # keys per scores tile
    dim_tile = min(tiles.dim_vectors * lanes, dim_v)  # head dims per context tile
    padded = (seq_k + lanes - 1) // lanes * lanes  # score columns, padded with -inf
    unroll_dim = min(tiles.unroll_dim, dim)
    unroll_keys = min(tiles.unroll_keys, seq_k)

    # Staged groups (fma_by_lane): whole groups of UNROLL values, one vector load per row.
    stage_dim = fma_by_lane and unroll_dim % 4 == 0 and dim >= unroll_dim
    stage_keys = fma_by_lane and unroll_keys % 4 == 0 and seq_k >= unroll_keys

    @T.macro
    def scores_step(q, kt, acc, b, blk, start, width, d):
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                acc[r, j] = (
                    acc[r, j] + q[b, T.min(blk * rows + r, seq_q - 1), d] * kt[b, d, start + j]
                )

    @T.macro
    def scores_group(q, kt, acc, qs, b, blk, start, width, d0):
        for r in T.unroll(rows):
            for d1 in T.vectorized(unroll_dim):
                qs[r, d1] = q[b, T.min(blk * rows + r, seq_q - 1), d0 * unroll_dim + d1]
        for d1 in T.unroll(unroll_dim):
            for r in T.unroll(rows):
                for j in T.vectorized(width):
                    acc[r, j] = acc[r, j] + qs[r, d1] * kt[b, d0 * unroll_dim + d1, start + j]

    @T.macro
    def scores_tile(q, kt, bias, s, acc, qs, b, blk, start, width):
        """s[:, start : start + width] = q·kt + bias for the block's rows."""
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                acc[r, j] = bias[
                    b // heads % b0, b % heads % h0, T.min(blk * rows + r, seq_q - 1) % i0,
                    (start + j) % j0,
                ]  # fmt: skip
        for d0 in range(dim // unroll_dim):
            if stage_dim:
                scores_group(q, kt, acc, qs, b, blk, start, width, d0)
            else:
                for d1 in T.unroll(unroll_dim):
                    scores_step(q, kt, acc, b, blk, start, width, d0 * unroll_dim + d1)
        if dim % unroll_dim > 0:
            for d1 in T.unroll(dim % unroll_dim):
                scores_step(q, kt, acc, b, blk, start, width, dim // unroll_dim * unroll_dim + d1)
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                s[r, start + j] = acc[r, j]

    @T.macro
    def context_step(v, s, acc, b, start, width, j):
        for r in T.unroll(rows):
            for d in T.vectorized(width):
                acc[r, d] = acc[r, d] + s[r, j] * v[b, j, start + d]

    @T.macro
    def context_group(v, s, acc, ps, b, start, width, j0_):
        for r in T.unroll(rows):
            for j1 in T.vectorized(unroll_keys):
                ps[r, j1] = s[r, j0_ * unroll_keys + j1]
        for j1 in T.unroll(unroll_keys):
            for r in T.unroll(rows):
                for d in T.vectorized(width):
                    acc[r, d] = acc[r, d] + ps[r, j1] * v[b, j0_ * unroll_keys + j1, start + d]

    @T.macro
    def context_tile(v, out, s, inv, acc, ps, b, blk, start, width):
        """out[rows, start : start + width] = (p · v) / sum for the block's rows."""
        for r in T.unroll(rows):
            for d in T.vectorized(width):
                acc[r, d] = T.float32(0)
        for j0_ in range(seq_k // unroll_keys):
            if stage_keys:
                context_group(v, s, acc, ps, b, start, width, j0_)
            else:
                for j1 in T.unroll(unroll_keys):
                    context_step(v, s, acc, b, start, width, j0_ * unroll_keys + j1)
        if seq_k % unroll_keys > 0:
            for j1 in T.unroll(seq_k % unroll_keys):
                context_step(v, s, acc, b, start, width, seq_k // unroll_keys * unroll_keys + j1)
        for r in T.unroll(rows):
            for d in T.vectorized(width):
                out[b, T.min(blk * rows + r, seq_q - 1), start + d] = acc[r, d] * inv[r]

    @T.macro
    def attend(q, kt, v, bias, out):
        for blk in T.parallel(bh * blocks):
            s = T.alloc_buffer((rows, padded), "float32")
            acc = T.alloc_buffer((rows, key_tile), "float32")
            ctx = T.alloc_buffer((rows, dim_tile), "float32")
            shift = T.alloc_buffer((rows,), "float32")
            inv = T.alloc_buffer((rows,), "float32")
            part = T.alloc_buffer((lanes,), "float32")
            t = T.alloc_buffer((lanes,), "float32")
            n = T.alloc_buffer((lanes,), "float32")
            e = T.alloc_buffer((lanes,), "float32")
            qs = T.alloc_buffer((rows, unroll_dim), "float32")
            ps = T.alloc_buffer((rows, unroll_keys), "float32")
            # 1. scores
            for c in range(seq_k // key_tile):
                scores_tile(
                    q, kt, bias, s, acc, qs, blk // blocks, blk % blocks, c * key_tile, key_tile
                )
            if seq_k % key_tile > 0:
                scores_tile(
                    q, kt, bias, s, acc, qs, blk // blocks, blk % blocks,
                    seq_k // key_tile * key_tile, seq_k % key_tile,
                )  # fmt: skip
            if padded > seq_k:
                for r in range(rows):
                    for j in T.vectorized(padded - seq_k):
                        s[r, seq_k + j] = NEG_INF
            # 2. guarded softmax, row by row, in place
            guarded_softmax(s, inv, shift, part, t, n, e, rows, padded, lanes)
            # 3. context
            for c in range(dim_v // dim_tile):
                context_tile(
                    v, out, s, inv, ctx, ps, blk // blocks, blk % blocks, c * dim_tile, dim_tile
                )
            if dim_v % dim_tile > 0:
                context_tile(
                    v, out, s, inv, ctx, ps, blk // blocks, blk % blocks,
                    dim_v // dim_tile * dim_tile, dim_v % dim_tile,
                )  # fmt: skip


    return with_signature(attend, bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, rows_layout)


def fused_attention_shapes(mod: tvm.IRModule):
    """``(global var, arguments)`` of each fused attention kernel in ``mod`` (``SHAPE_ATTR``):
    ``attention_kernel``'s shape arguments, ``rows_layout`` a RowsLayout or None; for a target
    stage that swaps in a kernel of its own with the same signature."""
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None:
            continue
        shape = func.attrs.get(SHAPE_ATTR)
        if shape is None:
            continue
        args = json.loads(str(shape))
        layout = args.pop("rows_layout")
        args["bias_shape"] = tuple(args["bias_shape"])
        args["rows_layout"] = None if layout is None else RowsLayout(**layout)
        yield gvar, args


def with_signature(attend, bh: int, seq_q: int, seq_k: int, dim: int, dim_v: int, heads: int,
                   bias_shape: tuple[int, ...], rows_layout: RowsLayout | None
                   ) -> tvm.tirx.PrimFunc:
    """The PrimFunc of an attention kernel whose body is the macro ``attend(q, kt, v, bias,
    out)``, with ``attention_kernel``'s signature: (q, kt, v, bias, out) in heads' layout, or
    with ``rows_layout`` the linears' rows, seen by ``attend`` through strided views."""

    @T.prim_func(private=True)
    def fused_attention(
        q: T.Buffer((bh, seq_q, dim), "float32"),
        kt: T.Buffer((bh, dim, seq_k), "float32"),
        v: T.Buffer((bh, seq_k, dim_v), "float32"),
        bias: T.Buffer(bias_shape, "float32"),
        out: T.Buffer((bh, seq_q, dim_v), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KIND_ATTR: KIND})
        attend(q, kt, v, bias, out)

    if rows_layout is None:
        return fused_attention
    if bh != heads:
        raise ValueError(f"rows_layout needs batch 1, got {bh // heads}")
    r = rows_layout
    if r.q_offset + heads * dim > r.q_width or r.v_offset + heads * dim_v > r.v_width:
        raise ValueError(f"{r} does not hold {heads} heads of {dim} (q) and {dim_v} (v) columns")

    @T.prim_func(private=True)
    def fused_attention_rows(
        q_rows: T.Buffer((seq_q, r.q_width), "float32"),
        kt: T.Buffer((bh, dim, seq_k), "float32"),
        v_rows: T.Buffer((seq_k, r.v_width), "float32"),
        bias: T.Buffer(bias_shape, "float32"),
        out_rows: T.Buffer((1, seq_q, heads * dim_v), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KIND_ATTR: KIND})
        # (head, token, dim) views of the row layouts: no data moves
        q = T.decl_buffer(
            (bh, seq_q, dim), "float32", data=q_rows.data, strides=[dim, r.q_width, 1],
            elem_offset=r.q_offset,
        )  # fmt: skip
        v = T.decl_buffer(
            (bh, seq_k, dim_v), "float32", data=v_rows.data, strides=[dim_v, r.v_width, 1],
            elem_offset=r.v_offset,
        )  # fmt: skip
        out = T.decl_buffer(
            (bh, seq_q, dim_v), "float32", data=out_rows.data, strides=[dim_v, heads * dim_v, 1]
        )
        attend(q, kt, v, bias, out)

    return fused_attention_rows
