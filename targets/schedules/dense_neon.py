"""Schedule rule for the fp32 matmuls by a packed weight (``pack_weights.py``) on AArch64: one
NEON step (``neon_steps.py``, as ``neon_intrinsics.py``'s tensor intrinsic) per ``rows × 16``
output block.

Matches what ``DensePacked`` matches, with 16-column panels (what ``pack_weights`` makes on
targets with FMA by lane), and schedules::

    for b, jo, io in parallel (fused):            # jo outer: one K × 16 panel stays in L1
        acc[rows, 16] = step(A[i0 : i0 + rows, :], Wp[jo])     # all of K in registers
        out[i, j] = epilogue(acc[ii, ji])         # vectorised, as DensePacked's

``rows`` is 4 where M divides by 4, else 2, else 1 (a matrix-vector product: the fill-mask
rows, the pooler). There is nothing to tune: tuning leaves these kernels out
(``targets/tuning.py``), as the matrix-tile ones.

Counted on the emulated device (qemu ``-cpu cortex-a76``, the default encoder, 2 layers): see
the README's ARM table.

Bails (returns None, and ``DensePacked`` takes the function) on a target without FMA by lane,
on panels of another width, when A is not read as plain rows (an inlined producer that
computes it), or when a schedule primitive refuses.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from mbcompile.cpu import cpu_info
from mbcompile.targets.schedules import neon_intrinsics, neon_steps
from mbcompile.targets.schedules.gemm_tile import find_gemm, inline_around, vectorize_tile

logger = logging.getLogger(__name__)


def handles(func, target: Target) -> bool:
    """Whether this rule schedules ``func`` for ``target`` (tuning leaves such kernels out)."""
    return DenseNeon().apply(func, target, False) is not None


class DenseNeon(ScheduleRule):
    """fp32 matmul by a 16-column packed weight as NEON steps, epilogue fused after them."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        info = cpu_info(target)
        if not info.fma_by_lane:
            return None
        sch = s_tir.Schedule(func)
        found = find_gemm(sch)
        if found is None:
            return None
        gemm, producers, consumers = found
        if gemm.packed_block != neon_steps.COLUMNS or gemm.dtype != "float32":
            return None
        rows = neon_intrinsics.block_rows(gemm.m)
        try:
            epilogue = inline_around(sch, producers, consumers)
            _schedule(sch, gemm.block, epilogue, rows, gemm.k_extent, info.lanes("float32"))
        except (s_tir.ScheduleError, ValueError, RuntimeError) as err:  # FFI errors are builtins
            logger.warning("DenseNeon: matched but could not schedule: %s", err)
            return None
        return sch


def _schedule(sch: s_tir.Schedule, block, consumers: list, rows: int, k_extent: int,
              lanes: int) -> None:
    *batch, i, j, k = sch.get_loops(block)
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, neon_steps.COLUMNS])
    sch.reorder(*batch, jo, io, ii, ji, k)
    outer = sch.fuse(*batch, jo, io)
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
    # one row: the block binds no row loop, the step's nest starts at the columns
    depth = 2 if rows > 1 else 1
    sch.tensorize(sch.get_loops(zeroing)[-depth], neon_intrinsics.zeroing(rows))
    sch.tensorize(ii if rows > 1 else ji, neon_intrinsics.intrinsic(rows, k_extent))
    sch.annotate(outer, "pragma_import_llvm", neon_steps.llvm_ir(neon_steps.Step(rows, k_extent)))
