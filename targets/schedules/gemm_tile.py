"""Recognise a matmul block and schedule it as a register-tiled CPU micro-kernel.

Shared by ``dense.py`` (constant weight pre-packed by ``pack_weights.py``) and
``batch_matmul.py`` (both operands computed at run time).

A matmul block, matched on its body and indices (never on names)::

    C[b..., i, j] += A[b..., i, k] * B(b..., k, j)      one reduction iter k, init 0

where ``B(b..., k, j)`` is either row-major ``B[b..., k, j]`` or packed ``B[j // nb, k, j % nb]``.

The schedule::

    for b, jo, io in parallel (fused):             # jo outer: a K×nb panel of B stays in L1
        acc[mi, nb] = 0                            # vector registers
        for ko:  for ki (unrolled):  for ii (unrolled):  for ji (vectorised):
            acc[ii, ji] += A[i, k] * B[k, j]
        out[i, j] = epilogue(acc[ii, ji], ...)     # fused bias / NoNorm / activation / residual

``mi × nb`` accumulators fill half to three quarters of the vector registers (4×16 or 6×16 fp32
with AVX2; see ``tile_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad

from mbcompile.cpu import CPUInfo
from mbcompile.targets.schedules.block_info import is_spatial, top_level_blocks


@dataclass
class Gemm:
    """Roles of one matmul block's iters and operands."""

    block: s_tir.schedule.SBlockRV
    batch: list[s_tir.schedule.LoopRV]
    i: s_tir.schedule.LoopRV
    j: s_tir.schedule.LoopRV
    k: s_tir.schedule.LoopRV
    m: int
    n: int
    k_extent: int
    dtype: str
    packed_block: int | None  # nb when B is packed as [N/nb, K, nb]
    lhs: tirx.Buffer | None = None  # A, the buffer read as A[..., i, k]


def _var(expr) -> tirx.Var | None:
    return expr if isinstance(expr, tirx.Var) else None


def const_int(expr) -> int | None:
    """The value of an integer constant, None for any other expression."""
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def is_packed_index(indices, j: tirx.Var, k: tirx.Var, nb: int) -> bool:
    """``indices`` are ``[j // nb, k, j % nb]``: a weight packed as ``[N/nb, K, nb]``."""
    if len(indices) != 3 or _var(indices[1]) is None or not indices[1].same_as(k):
        return False
    div, mod = indices[0], indices[2]
    return (
        isinstance(div, tirx.FloorDiv)
        and isinstance(mod, tirx.FloorMod)
        and div.a.same_as(j)
        and mod.a.same_as(j)
        and const_int(div.b) == nb
        and const_int(mod.b) == nb
    )


def accumulated_product(body) -> tuple[TensorLoad, TensorLoad] | None:
    """The two loads ``a, b`` when ``body`` is ``C[idx] = C[idx] + a * b``, else None."""
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return None
    acc, prod = body.value.a, body.value.b
    if isinstance(prod, TensorLoad) and isinstance(acc, tirx.Mul):
        acc, prod = prod, acc
    if not (
        isinstance(acc, TensorLoad)
        and acc.source.same_as(body.buffer)
        and all(a.same_as(b) for a, b in zip(acc.indices, body.indices))
        and isinstance(prod, tirx.Mul)
        and isinstance(prod.a, TensorLoad)
        and isinstance(prod.b, TensorLoad)
    ):
        return None
    return prod.a, prod.b


def _uses(indices, var: tirx.Var) -> bool:
    return any(
        v.same_as(var) for index in indices for v in tirx.analysis.undefined_vars(index, [])
    )


def match_gemm(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> Gemm | None:
    """The matmul roles of ``block``, or None when it is not ``C[.., i, j] += A·B``."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    iters = list(stmt.iter_vars)
    if len(loops) != len(iters) or len(iters) < 3:
        return None
    kinds = [iv.iter_type for iv in iters]
    if kinds[-1] != tirx.IterVar.CommReduce or any(
        kind != tirx.IterVar.DataPar for kind in kinds[:-1]
    ):
        return None
    extents = [const_int(iv.dom.extent) for iv in iters]
    if any(e is None for e in extents) or any(const_int(iv.dom.min) != 0 for iv in iters):
        return None
    # Trivial binding: iter t is bound to loop t.
    realize_loops = [sch.get(loop) for loop in loops]
    if [const_int(loop.extent) for loop in realize_loops] != extents:
        return None
    spatial = [iv.var for iv in iters[:-1]]
    k = iters[-1].var
    i, j = spatial[-2], spatial[-1]

    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or stmt.init is None:
        return None
    if len(body.indices) != len(spatial) or not all(
        a.same_as(b) for a, b in zip(body.indices, spatial)
    ):
        return None
    init = stmt.init
    if not isinstance(init, tirx.BufferStore) or not isinstance(
        init.value, (tirx.FloatImm, tirx.IntImm)
    ):
        return None
    if float(init.value.value) != 0.0:
        return None
    loads = accumulated_product(body)
    if loads is None:
        return None
    dtype = str(body.buffer.dtype)
    if not dtype.startswith("float") or any(str(x.source.dtype) != dtype for x in loads):
        return None

    lhs, rhs = loads
    if _uses(lhs.indices, j):
        lhs, rhs = rhs, lhs
    a_idx, b_idx = list(lhs.indices), list(rhs.indices)
    # A[..., i, k]: k innermost, i next, no j.
    if len(a_idx) < 2 or not a_idx[-1].same_as(k) or not a_idx[-2].same_as(i):
        return None
    if _uses(a_idx[:-2], j) or _uses(a_idx[:-2], k) or _uses(a_idx[:-2], i):
        return None
    packed_block = None
    b_shape = [const_int(d) for d in rhs.source.shape]
    if b_shape and b_shape[-1] is not None and is_packed_index(b_idx, j, k, b_shape[-1]):
        packed_block = b_shape[-1]
    elif len(b_idx) >= 2 and b_idx[-1].same_as(j) and b_idx[-2].same_as(k):
        if _uses(b_idx[:-2], i) or _uses(b_idx[:-2], j) or _uses(b_idx[:-2], k):
            return None
    else:
        return None
    return Gemm(
        block=block,
        batch=list(loops[:-3]),
        i=loops[-3],
        j=loops[-2],
        k=loops[-1],
        m=extents[-3],
        n=extents[-2],
        k_extent=extents[-1],
        dtype=dtype,
        packed_block=packed_block,
        lhs=lhs.source,
    )


def split_at_reduction(sch: s_tir.Schedule) -> tuple[s_tir.schedule.SBlockRV, list, list] | None:
    """The one non-spatial block of a PrimFunc, with the spatial blocks before and after it;
    None unless the function is exactly that."""
    blocks = top_level_blocks(sch)
    if blocks is None:
        return None
    reductions = [n for n, block in enumerate(blocks) if not is_spatial(sch, block)]
    if len(reductions) != 1:
        return None
    at = reductions[0]
    return blocks[at], blocks[:at], blocks[at + 1 :]


def find_gemm(sch: s_tir.Schedule) -> tuple[Gemm, list, list] | None:
    """The one matmul block of a PrimFunc, with the spatial blocks before and after it.

    None unless the function is exactly: spatial blocks, one matmul, spatial blocks.
    """
    split = split_at_reduction(sch)
    gemm = None if split is None else match_gemm(sch, split[0])
    return None if gemm is None else (gemm, split[1], split[2])


def register_tile(info: CPUInfo, dtype: str) -> tuple[int, int]:
    """(rows, columns) of the accumulator tile: half the vector registers."""
    lanes = info.lanes(dtype)
    rows = 8 if info.num_vector_registers >= 32 else 4
    return rows, 2 * lanes


def tile_rows(info: CPUInfo, dtype: str, m: int) -> int:
    """Rows of the untuned register tile for an M-row matmul.

    1.5× the default rows (6 with AVX2's 16 registers: 12 accumulators, 2 B vectors and one
    broadcast) where M divides by it, else the largest power-of-two fraction of the default.
    Measured on Zen 3, 1 thread, packed weights: 384×512·512×128 reaches 92 GFLOP/s with 6 rows
    against 86 with 4; 384×128·128×512 82 against 75.

    Not with FMA by lane (AArch64): its tile also holds the rows' staged A vectors, and 12 rows
    (24 accumulators, 12 A vectors, 2 B vectors) spill the 32 registers: counted on the emulated
    device at seq 384, 0.40 loads per FMLA against 0.19 with 8 rows.
    """
    rows, _ = register_tile(info, dtype)
    wide = most_rows(info, dtype)
    return wide if m % wide == 0 else largest_divisor(m, rows)


def k_unroll(info: CPUInfo) -> int:
    """K steps per iteration of the untuned tile's K loop: 4, or 8 with FMA by lane.

    AArch64 stages each row's 8 k values as two vectors, loaded just before their k steps; the
    loop's pointer increments, compare and branch are then paid once per 128 FMLA instead of
    64. Counted on the emulated device (one default-width layer, 128 and 384 tokens): 1.23-1.27
    instructions per FMLA in the dense kernels against 1.26-1.30, loads unchanged at 0.19.
    """
    return 8 if info.fma_by_lane else 4


def most_rows(info: CPUInfo, dtype: str) -> int:
    """The most rows a register tile may take (``tile_rows``; the tuning space's bound)."""
    rows, _ = register_tile(info, dtype)
    return rows if info.fma_by_lane else rows * 3 // 2


def largest_divisor(n: int, preferred: int, floor: int = 1) -> int | None:
    """The largest of preferred, preferred/2, ... ≥ floor that divides n."""
    size = preferred
    while size >= floor:
        if n % size == 0:
            return size
        size //= 2
    return None


def schedule_gemm(
    sch: s_tir.Schedule,
    gemm: Gemm,
    consumers: list,
    info: CPUInfo,
    tile_n: int,
    tunable: bool = False,
) -> None:
    """Tile ``gemm`` into registers and fuse its (already single) epilogue block into the tile.

    ``consumers`` is [] (the matmul writes the output) or [epilogue]. Raises ScheduleError
    when a primitive refuses; the rules then leave the function unscheduled.

    Untuned, the tile has ``tile_rows`` rows and K is unrolled by ``k_unroll``. ``tunable``
    makes both knobs of the trace (``sample_perfect_tile``: rows up to 1.5× the default, which lets a
    6-row tile fill the 16 AVX2 registers where M divides by 6; K unroll up to 8), for
    MetaSchedule to sample and mutate (``targets/tuning.py``).
    """
    rows, _ = register_tile(info, gemm.dtype)
    lanes = info.lanes(gemm.dtype)
    if tunable:
        tile_m = sch.sample_perfect_tile(gemm.i, n=2, max_innermost_factor=most_rows(info, gemm.dtype))
        unroll_k = sch.sample_perfect_tile(gemm.k, n=2, max_innermost_factor=8)
        io, ii = sch.split(gemm.i, tile_m)
        ko, ki = sch.split(gemm.k, unroll_k)
    else:
        io, ii = sch.split(gemm.i, [None, tile_rows(info, gemm.dtype, gemm.m)])
        ko, ki = sch.split(gemm.k, [None, largest_divisor(gemm.k_extent, k_unroll(info))])
    jo, ji = sch.split(gemm.j, [None, tile_n])
    sch.reorder(*gemm.batch, jo, io, ko, ki, ii, ji)
    outer = sch.fuse(*gemm.batch, jo, io)
    sch.parallel(outer)

    # The accumulator tile is a "global" buffer: on CPU, TVM 0.27 keeps only those (under 1 KiB)
    # on the stack. A "local" one becomes a heap workspace call in every parallel iteration,
    # which cost 10% of the whole model.
    if consumers:
        (epilogue,) = consumers
        sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
        sch.set_scope(gemm.block, 0, "global")
        writer = epilogue
    else:
        writer = sch.cache_write(gemm.block, 0, "global")
        sch.reverse_compute_at(writer, outer, preserve_unit_loops=True)
    vectorize_tile(sch, writer, lanes)

    if info.fma_by_lane:
        _load_rows_as_vectors(sch, gemm, ko, info)

    sch.unroll(ki)
    sch.unroll(ii)
    sch.vectorize(ji)
    sch.decompose_reduction(gemm.block, ko)


def _load_rows_as_vectors(sch: s_tir.Schedule, gemm: Gemm, ko, info: CPUInfo) -> None:
    """Stage the tile's ``A[i, ko·u : ko·u + u]`` (u: the K unroll) in a small buffer, one
    vector load per row, so that the k steps multiply by its lanes (AArch64's FMA by element)
    instead of loading each A value with a scalar load: 8 loads per 4 k steps for an 8-row
    tile instead of 32. An inlined producer that only selects A's elements (a column slice of
    a wider tensor) leaves a direct read of that tensor, which is staged instead; any other
    inlined producer leaves A computed in place, not staged."""
    lhs = gemm.lhs
    if lhs is not None and not any(r.source.same_as(lhs) for r in sch.get(gemm.block).reads):
        lhs = _read_as_rows(sch, gemm)
    if lhs is not None:
        stage_rows(sch, gemm.block, lhs, ko)


def _read_as_rows(sch: s_tir.Schedule, gemm: Gemm) -> tirx.Buffer | None:
    """The buffer the matmul reads as ``X[..., i, k + c]`` (c constant) for its A operand after
    its producers were inlined, or None when A is computed in place."""
    block = sch.get(gemm.block)
    loads = accumulated_product(block.body)
    if loads is None:
        return None
    i, k = block.iter_vars[-3].var, block.iter_vars[-1].var
    for load in loads:
        idx = list(load.indices)
        if len(idx) < 2 or not idx[-2].same_as(i) or _uses(idx[:-2], k) or _uses(idx[:-2], i):
            continue
        last = idx[-1]
        offset = last.b if isinstance(last, tirx.Add) and last.a.same_as(k) else None
        if last.same_as(k) or (offset is not None and const_int(offset) is not None):
            return load.source
    return None


def stage_rows(sch: s_tir.Schedule, block, lhs: tirx.Buffer, ko) -> None:
    """``block``'s reads of ``lhs`` within one ``ko`` iteration, staged per row in a small
    buffer filled with one vector load per row (``_load_rows_as_vectors``). Nothing when
    ``block`` does not read ``lhs`` directly."""
    reads = [r.source for r in sch.get(block).reads]
    index = next((n for n, b in enumerate(reads) if b.same_as(lhs)), None)
    if index is None:
        return
    staged = sch.cache_read(block, index, "global")
    sch.compute_at(staged, ko, preserve_unit_loops=True)
    loops = sch.get_loops(staged)
    rows, ks = loops[-2], loops[-1]
    if const_int(sch.get(ks).extent) in (2, 4, 8, 16):
        sch.vectorize(ks)
    sch.unroll(rows)


def vectorize_tile(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Vectorise the innermost loop of a tile's writer and unroll the ones above it."""
    loops = sch.get_loops(block)
    inner = loops[-1]
    extent = const_int(sch.get(inner).extent)
    if extent is not None and extent > 1:
        if extent % lanes == 0 or extent < lanes:
            sch.vectorize(inner)
        else:
            _, vec = sch.split(inner, [None, lanes])
            sch.vectorize(vec)
    for loop in loops[1:-1]:
        if const_int(sch.get(loop).extent) not in (None, 1):
            sch.unroll(loop)


def inline_around(sch: s_tir.Schedule, producers: list, consumers: list) -> list:
    """Inline spatial producers into the matmul and all but the last consumer into the last.

    Returns the remaining epilogue ([] or [block]). Raises ScheduleError if one refuses.
    """
    for block in producers:
        sch.compute_inline(block)
    for block in consumers[:-1]:
        sch.compute_inline(block)
    return consumers[-1:]
