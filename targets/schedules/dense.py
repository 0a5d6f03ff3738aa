"""Schedule rule for a matmul by a pre-packed constant weight (see ``pack_weights.py``).

Matches the block ``C[.., i, j] += A[.., i, k] * Wp[j // nb, k, j % nb]`` with any spatial
epilogue after it (bias, NoNorm, activation, residual add, the crop of padded columns), and
schedules it with the register tile of ``gemm_tile.py``: ``nb`` is the packed panel width, so
every tile reads one contiguous ``K × nb`` panel. Bails (returns None) on any other PrimFunc,
or when a schedule primitive refuses the fused epilogue.
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
    register_tile,
    schedule_gemm,
)

logger = logging.getLogger(__name__)


class DensePacked(ScheduleRule):
    """Register-tiled matmul by a packed constant weight, epilogue fused into the tile."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        found = find_gemm(sch)
        if found is None or found[0].packed_block is None:
            return None
        gemm, producers, consumers = found
        try:
            epilogue = inline_around(sch, producers, consumers)
            info = cpu_info(target)
            # a 16-column NEON panel (``dense_neon``) in tiles of the register tile's width
            tile_n = min(gemm.packed_block, register_tile(info, gemm.dtype)[1])
            schedule_gemm(sch, gemm, epilogue, info, tile_n=tile_n, tunable=tunable)
        except s_tir.ScheduleError as err:
            logger.warning("DensePacked: matched but could not schedule: %s", err)
            return None
        return sch
