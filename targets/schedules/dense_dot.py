"""Schedule rule for the reduced-precision matmuls of ``pack_bf16.py`` and ``pack_int8.py``,
on dot-product instructions (``dot_intrinsics.py``).

Matches the block ``C[.., i, j] += a(A[.., i, k]) · b(Wp[j // nb, k // d, j % nb, k % d])``,
where either ``a``, ``b`` widen bf16 bits to fp32 (``d`` = 2, fp32 ``C``: ``vdpbf16ps``,
``bfdot``) or cast bytes to int32 (``d`` = 4, int32 ``C``: uint8 by int8 on ``vpdpbusd`` or
``vpmaddubsw``, int8 by int8 on ``sdot`` or ``smull``), with any spatial epilogue after it
(int8's dequantization, bias, NoNorm, activation, residual), and schedules::

    for b, io, jo in parallel (fused):           # rows outer: a thread keeps its own rows
        acc[rows, nb] = 0                         # in registers
        for ko:  for kk (unrolled):  for ii (unrolled):  for jt (unrolled):
            acc[ii, jt·L : jt·L + L] += dot(A[i, d·k : d·k + d], Wp[jo, k, jt·L : jt·L + L, :])
        out[i, j] = epilogue(acc[ii, ji])

``L`` is the 32-bit lanes of the dot product's vector (``CPUInfo.dot_lanes``: 16 on AVX-512,
Zen 4 included, 8 on AVX2, 4 on AArch64) and ``nb`` two vectors (four on AArch64, whose panels
are 16 columns for the NEON steps: ``pack_weights``; counted on the emulated device at 128
tokens, bf16's largest kernel went from 16.5M to 13.2M instructions with them). Zen 4 splits
512-bit operations in two, and its fp32 tiles are 256-bit, but each step broadcasts a row's
activations into a vector and there that broadcast takes a slot of the dot product's pipes:
512-bit steps need half the broadcasts per multiply-add (``mbcompile.cpu``). Measured on a
2-core Zen 4, the default encoder at 128 tokens, 1 thread, medians of interleaved calls: bf16
43.4 → 32.8 ms, int8 24.5 → 21.8 (256-bit tiles of 4 rows; 8 rows of 256 bits gave 40.4 and
23.9). The accumulator tile stays under 1 KiB, the size TVM 0.27 keeps on the stack (a heap
tile keeps LLVM from holding it in registers across the steps): 4 rows of 32, or 6 where M
divides by 6; on Zen 4 the tile may use AVX-512's 32 vector registers
(``CPUInfo.dot_registers``).

Rows outer, as in ``dense_tiles.py``: the threads split the rows, and each reads the rows it
wrote in the kernel before from its own core's cache. With the panels outer (one K × nb panel
kept in L1, as this rule was first written), every kernel read half its input from the other
core, and on Zen 4 the int8 encoder ran no faster on 2 threads than on 1. Measured there, 128
tokens, 2 threads: bf16 19.4 → 18.1 ms, int8 21.2 → 13.7 (1 thread: 34.4 → 32.5, 23.3 →
22.4). On AArch64 each row's activations for a ``ko`` step are loaded as one vector
(``gemm_tile.stage_rows``) and the steps multiply by its lanes (the indexed ``sdot``).

bf16 on 512-bit ``vdpbf16ps`` and int8 on 512-bit ``vpdpbusd``, with K a multiple of 128
(every matmul of the default architecture), take another form, ``_schedule_panels``: a
parallel task is a block of 8 rows × a chunk of columns; per 32-column panel of it,
``panel_intrinsics``' steps (8 rows × 32 columns × 128 k values, the sums in registers) fill
the panel's 8 × 32 accumulator buffer (on the stack), then the epilogue runs over the panel.
The stack tile capped the rows at 7 (4 at 128 tokens, where M does not divide by 6); alone on
a Zen 5 core the steps run 8 × 2 at 447 GFLOP/s against 318 for 4 × 2.

Bails (returns None) on any other PrimFunc, on a CPU without the instruction, or when a
schedule primitive refuses.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.ir.expr import Call, TensorLoad
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from mbcompile.cpu import cpu_info
from mbcompile.targets.schedules import dot_intrinsics, panel_intrinsics
from mbcompile.targets.schedules.gemm_tile import (
    const_int,
    inline_around,
    largest_divisor,
    split_at_reduction,
    stage_rows,
    vectorize_tile,
)
from mbcompile.targets.schedules.prefetch_epilogue import prefetch_epilogue

logger = logging.getLogger(__name__)

TILE_BYTES = 1024  # TVM 0.27 keeps an allocation on the stack when it is smaller than this


def _bf16_load(expr) -> TensorLoad | None:
    """The load ``x`` of ``reinterpret<float32>(u32(x) << 16)``, else None."""
    if not (isinstance(expr, Call) and expr.op.name == "tirx.reinterpret"):
        return None
    shift = expr.args[0]
    if isinstance(shift, tirx.LShift):
        cast, amount = shift.a, shift.b
    elif isinstance(shift, Call) and shift.op.name == "tirx.shift_left":
        cast, amount = shift.args
    else:
        return None
    if const_int(amount) != 16 or not isinstance(cast, tirx.Cast):
        return None
    load = cast.value
    return load if isinstance(load, TensorLoad) and str(load.source.dtype) == "uint16" else None


def _int8_load(expr, dtype: str) -> TensorLoad | None:
    """The load ``x`` of ``int32(x)`` with ``x`` of ``dtype``, else None."""
    if not (isinstance(expr, tirx.Cast) and str(expr.ty) == "int32"):
        return None
    load = expr.value
    return load if isinstance(load, TensorLoad) and str(load.source.dtype) == dtype else None


def _operands(product, acc_dtype: str) -> tuple[str, TensorLoad, TensorLoad] | None:
    """(kind, activation load, weight load) of a reduced-precision product, else None."""
    if acc_dtype == "float32":
        a, b = _bf16_load(product.a), _bf16_load(product.b)
        return None if a is None or b is None else ("bf16", a, b)
    if acc_dtype == "int32":
        b = _int8_load(product.b, "int8")
        for kind, a_dtype in (("u8s8", "uint8"), ("s8s8", "int8")):
            a = _int8_load(product.a, a_dtype)
            if a is not None and b is not None:
                return kind, a, b
    return None


def _is_packed(indices, j, k, nb: int, d: int) -> bool:
    """``indices`` are ``[j // nb, k // d, j % nb, k % d]``."""
    if len(indices) != 4:
        return False
    forms = [(tirx.FloorDiv, j, nb), (tirx.FloorDiv, k, d), (tirx.FloorMod, j, nb), (tirx.FloorMod, k, d)]
    return all(
        isinstance(index, kind) and index.a.same_as(var) and const_int(index.b) == value
        for index, (kind, var, value) in zip(indices, forms)
    )


def match_dot(sch: s_tir.Schedule):
    """(block, producers, consumers, nb, kind, activation buffer) of a reduced-precision dense
    PrimFunc, or None."""
    split = split_at_reduction(sch)
    if split is None:
        return None
    block, producers, consumers = split
    stmt = sch.get(block)
    iters = list(stmt.iter_vars)
    if len(iters) < 3 or len(sch.get_loops(block)) != len(iters):
        return None
    if iters[-1].iter_type != tirx.IterVar.CommReduce or any(
        iv.iter_type != tirx.IterVar.DataPar for iv in iters[:-1]
    ):
        return None
    if any(const_int(iv.dom.extent) is None or const_int(iv.dom.min) != 0 for iv in iters):
        return None
    body = stmt.body
    if not (isinstance(body, tirx.BufferStore) and isinstance(body.value, tirx.Add)):
        return None
    product = body.value.b
    operands = _operands(product, str(body.buffer.dtype)) if isinstance(product, tirx.Mul) else None
    if operands is None:
        return None
    kind, a, b = operands
    i, j, k = iters[-3].var, iters[-2].var, iters[-1].var
    if len(a.indices) < 2 or not a.indices[-1].same_as(k) or not a.indices[-2].same_as(i):
        return None
    nb = const_int(b.source.shape[2]) if len(b.source.shape) == 4 else None
    if nb is None or not _is_packed(list(b.indices), j, k, nb, dot_intrinsics.depth(kind)):
        return None
    return block, producers, consumers, nb, kind, a.source


def tile_rows(m: int, nb: int, info) -> int:
    """Rows of the untuned tile: 6 where M divides by 6 and the tile fits (``most_rows``), else
    a power of two up to 4 that divides M (see the module doc)."""
    limit = most_rows(info, nb)
    if limit >= 6 and m % 6 == 0:
        return 6
    return largest_divisor(m, min(4, limit))


def _matched(func, target: Target):
    """(schedule, ``match_dot``'s tuple, CPU info, instruction) where this rule applies to
    ``func`` on ``target``, else None."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    found = match_dot(sch)
    if found is None:
        return None
    nb, kind = found[3], found[4]
    info = cpu_info(target)
    lanes = info.dot_lanes()
    instruction = info.bf16_dot if kind == "bf16" else info.int8_dot
    native = bool(instruction) and dot_intrinsics.kind_of(instruction) == kind
    if not native or nb % lanes or not dot_intrinsics.available(instruction, lanes):
        return None
    return sch, found, info, instruction


def on_panels(func, target: Target) -> bool:
    """Whether this rule puts ``func`` on panel steps for ``target``: one schedule, with nothing
    to tune (``targets/schedules/fixed.py``)."""
    matched = _matched(func, target)
    if matched is None:
        return False
    sch, (block, _, _, nb, _, _), info, instruction = matched
    return takes_panels(sch, block, nb, instruction, info.dot_lanes())


class DenseDot(ScheduleRule):
    """Register-tiled bf16 or int8 matmul on dot-product steps, epilogue fused into the tile."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        matched = _matched(func, target)
        if matched is None:
            return None
        sch, (block, producers, consumers, nb, _, activations), info, instruction = matched
        try:
            epilogue = inline_around(sch, producers, consumers)
            # AArch64: a row's bytes in one vector, the steps by its lanes, as the fp32 tiles do
            stage = activations if info.fma_by_lane else None
            if takes_panels(sch, block, nb, instruction, info.dot_lanes()):
                _schedule_panels(sch, block, epilogue, instruction, info.num_cores)
            else:
                _schedule(sch, block, epilogue, nb, info, instruction, tunable, stage)
        except s_tir.ScheduleError as err:
            logger.warning("DenseDot: matched but could not schedule: %s", err)
            return None
        return sch


def most_rows(info, nb: int) -> int:
    """The most rows a tile may take: under ``TILE_BYTES``, and with its accumulators, one A
    broadcast and the panel's vectors within three quarters of the vector registers."""
    vectors = nb // info.dot_lanes()
    registers = (info.dot_registers() * 3 // 4 - vectors - 1) // vectors
    return max(1, min((TILE_BYTES - 1) // (4 * nb), registers))


def _schedule(sch: s_tir.Schedule, block, consumers: list, nb: int, info, instruction: str,
              tunable: bool, stage=None) -> None:
    """The loops of the module doc. ``tunable``: the tile's rows (up to ``most_rows``) and the
    K unroll (up to 8 steps) become MetaSchedule knobs (``sample_perfect_tile``), as in
    ``gemm_tile.schedule_gemm``. ``stage``: the activation buffer, its rows staged per ``ko``
    (``gemm_tile.stage_rows``)."""
    lanes = info.dot_lanes()
    depth = dot_intrinsics.depth(dot_intrinsics.kind_of(instruction))
    *batch, i, j, k = sch.get_loops(block)
    m = const_int(sch.get(i).extent)
    steps = const_int(sch.get(k).extent) // depth
    jo, jt, ji = sch.split(j, [None, nb // lanes, lanes])
    ko, ki = sch.split(k, [None, depth])
    if tunable:
        io, ii = sch.split(i, sch.sample_perfect_tile(i, n=2, max_innermost_factor=most_rows(info, nb)))
        ko, kk = sch.split(ko, sch.sample_perfect_tile(ko, n=2, max_innermost_factor=8))
    else:
        io, ii = sch.split(i, [None, tile_rows(m, nb, info)])
        ko, kk = sch.split(ko, [None, largest_divisor(steps, 4)])
    sch.reorder(*batch, io, jo, ko, kk, ii, jt, ji, ki)
    outer = sch.fuse(*batch, io, jo)
    sch.parallel(outer)
    if consumers:
        (epilogue,) = consumers
        sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
        sch.set_scope(block, 0, "global")  # on the stack: see gemm_tile.schedule_gemm
        writer = epilogue
    else:
        writer = sch.cache_write(block, 0, "global")
        sch.reverse_compute_at(writer, outer, preserve_unit_loops=True)
    vectorize_tile(sch, writer, lanes)
    if stage is not None:
        stage_rows(sch, block, stage, ko)
    sch.decompose_reduction(block, ko)
    sch.tensorize(ji, dot_intrinsics.intrinsic_name(instruction, lanes))
    sch.unroll(kk)
    sch.unroll(ii)
    sch.unroll(jt)
    dot_intrinsics.prepare_loop(sch, outer, instruction, lanes)


# Row blocks × column chunks a panel kernel splits into at least (or twice the target's
# cores, where it says), so that short inputs still give every thread work (a row block of 8
# tokens alone is one task).
MIN_TASKS = 8
# A panel's K chunks are unrolled up to this many: the first step then starts from the zeros
# just stored (LLVM forwards them) instead of loading them back.
MAX_UNROLLED_CHUNKS = 8


def takes_panels(sch: s_tir.Schedule, block, nb: int, instruction: str, lanes: int) -> bool:
    """Whether the matmul runs on ``panel_intrinsics``' steps: 512-bit ``vdpbf16ps`` (bf16) or
    ``vpdpbusd`` (int8) with 32-column panels, K a multiple of the step's 128 and M even (a row
    block of one row is the old kernel's case)."""
    *_, i, _, k = sch.get_loops(block)
    m, k = const_int(sch.get(i).extent), const_int(sch.get(k).extent)
    return (instruction in panel_intrinsics.INSTRUCTIONS and lanes == 16
            and nb == panel_intrinsics.COLUMNS
            and k is not None and k % panel_intrinsics.CHUNK == 0 and _panel_rows(m) is not None)


def _panel_rows(m: int | None) -> int | None:
    """The rows of a panel kernel's row block: 8, 4 or 2, the largest that divides M."""
    return None if m is None else largest_divisor(m, max(panel_intrinsics.ROWS), floor=2)


def _column_chunks(panels: int, row_blocks: int, cores: int) -> int:
    """The fewest column chunks (a divisor of ``panels``) giving ``MIN_TASKS`` tasks, or two
    per core of a target with more than 4."""
    wanted = max(MIN_TASKS, 2 * cores)
    for chunks in range(1, panels + 1):
        if panels % chunks == 0 and row_blocks * chunks >= wanted:
            return chunks
    return panels


def _schedule_panels(sch: s_tir.Schedule, block, consumers: list, instruction: str,
                     cores: int = 0) -> None:
    """Panel steps (``panel_intrinsics``)::

        for b, io, jc in parallel (fused):          # a block of rows × a chunk of columns
            for jo in panels of the chunk:                # acc: 8 × 32, on the stack
                prefetch(epilogue's lines)           # prefetch_epilogue.py
                acc[:, panel] = 0                    # the steps hold the sums in registers
                for kb in K / 128 (unrolled):
                    acc[:, panel] += step(A[rows, kb·128 :], Wp[jo, kb·64 :])
                out[rows, panel] = epilogue(acc[:, panel])

    A row block is 8 rows where M divides by 8 (else 4 or 2), tuned or not: the tensorized
    step is a different intrinsic for each row count, named in the trace, so a tuning search
    that changed a sampled row count would replay into a mismatch. Measured alone on a Zen 5
    (K 512): 8 rows 430 GFLOP/s, 16 (two groups of 8 over one panel) 371.

    The epilogue runs per panel, right after its steps, where the out-of-order core overlaps it
    with the next panel's dot products, and the zeros of a panel's accumulators are stored just
    before its first step, which LLVM then starts from registers (the stores stay; TVM's
    lowering shrinks the buffer to the panel's 8 × 32, which ``tiles_on_stack`` puts on the
    stack). The panel first prefetches the epilogue's lines of the output and of a residual
    (``prefetch_epilogue``). Alone on one Zen 5 core, interleaved minimums, a bias epilogue:
    384 × 128 → 512 400 → 454 GFLOP/s (against the epilogue after the whole block and the
    zeros loaded back), 384 × 512 → 384 454 → 472, 128 × 512 → 128 460 → 481."""
    *batch, i, j, k = sch.get_loops(block)
    m, n = const_int(sch.get(i).extent), const_int(sch.get(j).extent)
    rows = _panel_rows(m)
    io, ii = sch.split(i, [None, rows])
    batches = 1
    for loop in batch:
        batches *= const_int(sch.get(loop).extent) or 1
    panels = n // panel_intrinsics.COLUMNS
    chunks = _column_chunks(panels, batches * (m // rows), cores)
    jc, jo, jp = sch.split(j, [chunks, None, panel_intrinsics.COLUMNS])
    kb, kc = sch.split(k, [None, panel_intrinsics.CHUNK])
    sch.reorder(*batch, io, jc, jo, kb, ii, jp, kc)
    outer = sch.fuse(*batch, io, jc)
    sch.parallel(outer)
    writer = consumers[0] if consumers else sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(writer, jo, preserve_unit_loops=True)
    if consumers:
        sch.set_scope(block, 0, "global")
    _, vector = sch.split(sch.get_loops(writer)[-1], [None, 16])
    sch.vectorize(vector)
    init = sch.decompose_reduction(block, kb)
    _, vector = sch.split(sch.get_loops(init)[-1], [None, 16])
    sch.vectorize(vector)
    for loop in sch.get_loops(init)[-3:-1]:  # the zeros' rows and vectors: 16 stores
        sch.unroll(loop)
    if const_int(sch.get(kb).extent) <= MAX_UNROLLED_CHUNKS:
        sch.unroll(kb)
    sch.tensorize(ii, panel_intrinsics.intrinsic_name(rows, instruction))
    sch.annotate(outer, "pragma_import_llvm", panel_intrinsics.llvm_ir(rows, instruction))
    prefetch_epilogue(sch, jo, writer)
