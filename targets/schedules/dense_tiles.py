"""Schedule rule for the reduced-precision matmuls of ``pack_bf16.py`` and ``pack_int8.py`` on
matrix tiles (Intel AMX: ``tile_intrinsics.py``), where the target has them.

Matches what ``DenseDot`` matches (``dense_dot.match_dot``), and schedules::

    for b, io, jo in parallel (fused):            # rows outer: a thread keeps its own rows
        acc[rows, nb] = tiles(A[i0 : i0 + rows, :], Wp[jo])     # one step: all of K in tiles
        out[i, j] = epilogue(acc[ii, ji])         # vectorised, as DenseDot's

Rows outer: the threads split the rows, so each reads the activation rows it wrote in the
kernel before (still in its core's L2) and writes the rows the next kernel gives it again; each
reads every weight panel (the next one prefetched by the step). With the panels outer, as this
rule was first written (one panel kept in L1/L2), the threads split the columns, every kernel
read half its input from the other core's cache, and 2 threads ran no faster than 1. Measured
on a 2-core AMX Xeon, the default encoder in bf16, medians of interleaved calls: 384 tokens
28.5 → 16.7 ms on 2 threads (31.6 → 29.5 on 1), 128 tokens 9.8 → 6.1 ms on 2 threads (9.4 →
9.2 on 1); the FFN's first matmul (384×128·128×512) 70 → 33 µs on 2 threads.

A block of 32 rows is 2 × 2 accumulator tiles, the most the 8 tile registers hold with their A
and B tiles. ``rows`` is 64 where M divides by it (two blocks per step, the tiles configured
once: measured on a 2-core AMX Xeon, 1 thread, 384×512·512×128 in bf16, 46 µs against 59 with
one block per step; 128-row steps were no faster, and slower where K is 128), else 32, else the
largest divisor of M up to 32 that is at least 8, or M itself when M is 8 to 32 (fewer rows are
left to ``DenseDot``). ``nb`` is 32 or 16 (a narrow N). There is nothing to tune: the rule
gives the same schedule with or without knobs, and tuning skips these kernels
(``targets/tuning.py``).

Bails (returns None, and ``DenseDot`` takes the function) on a target without tiles for the
kind, on K not padded to a tile row (``tile_intrinsics.k_multiple``), on M with no fitting
divisor, or when a schedule primitive refuses.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from mbcompile.cpu import cpu_info
from mbcompile.targets.schedules import tile_intrinsics
from mbcompile.targets.schedules.dense_dot import match_dot
from mbcompile.targets.schedules.gemm_tile import const_int, inline_around, vectorize_tile

logger = logging.getLogger(__name__)

FEWEST_ROWS = 8  # below this a block wastes most of each tile multiply


def block_rows(m: int) -> int | None:
    """Rows per step for an M-row matmul (see the module doc), or None."""
    if m < FEWEST_ROWS:
        return None
    if m <= tile_intrinsics.BLOCK_ROWS:
        return m
    for rows in range(tile_intrinsics.MOST_ROWS, 0, -tile_intrinsics.BLOCK_ROWS):
        if m % rows == 0:
            return rows
    for rows in range(tile_intrinsics.BLOCK_ROWS, FEWEST_ROWS - 1, -1):
        if m % rows == 0:
            return rows
    return None


def handles(func, target: Target) -> bool:
    """Whether this rule schedules ``func`` for ``target`` (tuning leaves such kernels out)."""
    return DenseTiles().apply(func, target, False) is not None


class DenseTiles(ScheduleRule):
    """bf16 or int8 matmul as one matrix-tile step per output block, epilogue fused after it."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        info = cpu_info(target)
        if not info.tile_kinds:
            return None
        sch = s_tir.Schedule(func)
        found = match_dot(sch)
        if found is None:
            return None
        block, producers, consumers, nb, kind, _ = found
        if kind not in info.tile_kinds:
            return None
        *_, i, _, k = sch.get_loops(block)
        m, k_extent = const_int(sch.get(i).extent), const_int(sch.get(k).extent)
        rows = block_rows(m)
        if rows is None or not tile_intrinsics.fits(kind, rows, nb, k_extent):
            return None
        try:
            epilogue = inline_around(sch, producers, consumers)
            _schedule(sch, block, epilogue, kind, rows, nb, k_extent, info.lanes("float32"))
        except s_tir.ScheduleError as err:
            logger.warning("DenseTiles: matched but could not schedule: %s", err)
            return None
        return sch


def _schedule(sch: s_tir.Schedule, block, consumers: list, kind: str, rows: int, nb: int,
              k_extent: int, lanes: int) -> None:
    *batch, i, j, k = sch.get_loops(block)
    panels = const_int(sch.get(j).extent) // nb
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, nb])
    sch.reorder(*batch, io, jo, ii, ji, k)
    outer = sch.fuse(*batch, io, jo)
    sch.parallel(outer)
    if consumers:
        (epilogue,) = consumers
        sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
        sch.set_scope(block, 0, "global")
        writer = epilogue
    else:
        writer = sch.cache_write(block, 0, "global")
        sch.reverse_compute_at(writer, outer, preserve_unit_loops=True)
    vectorize_tile(sch, writer, lanes)
    zeroing = sch.decompose_reduction(block, ii)
    sch.tensorize(sch.get_loops(zeroing)[-2], tile_intrinsics.zeroing(kind, rows, nb))
    sch.tensorize(ii, tile_intrinsics.intrinsic(kind, rows, nb, k_extent, panels))
    sch.annotate(outer, "pragma_import_llvm", tile_intrinsics.llvm_ir(kind, rows, nb))
