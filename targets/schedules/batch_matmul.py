"""Schedule rule for a matmul of two run-time operands (attention's batched products).

Matches ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` (row-major B, any number of batch
axes, possibly none) with any spatial epilogue, and schedules it with the register tile of
``gemm_tile.py``; the tile width is all of N when N fits two vectors, else the largest of 2, 1
vectors dividing N. Bails (returns None) on a wider N that no vector length divides (e.g.
attention scores at seq 100: a predicated tile, rows in parallel and a row reduction all
measured slower there than the unscheduled loop, 1 thread: 199, 627, 342 vs 99 µs), on a
packed weight (``dense.py``), or when a primitive refuses the epilogue.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from mbcompile.cpu import cpu_info
from mbcompile.targets.schedules.gemm_tile import (
    find_gemm,
    inline_around,
    largest_divisor,
    register_tile,
    schedule_gemm,
)

logger = logging.getLogger(__name__)


class BatchMatmul(ScheduleRule):
    """Register-tiled matmul whose right operand is row-major ``[.., K, N]``."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        found = find_gemm(sch)
        if found is None or found[0].packed_block is not None:
            return None
        gemm, producers, consumers = found
        info = cpu_info(target)
        lanes = info.lanes(gemm.dtype)
        _, preferred = register_tile(info, gemm.dtype)
        tile_n = gemm.n if gemm.n <= preferred else largest_divisor(gemm.n, preferred, lanes)
        if tile_n is None:
            return None
        try:
            epilogue = inline_around(sch, producers, consumers)
            schedule_gemm(sch, gemm, epilogue, info, tile_n=tile_n, tunable=tunable)
        except s_tir.ScheduleError as err:
            logger.warning("BatchMatmul: matched but could not schedule: %s", err)
            return None
        return sch
