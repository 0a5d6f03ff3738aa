"""Schedule rule for row reductions and what is fused around them (softmax, masked softmax,
layer norm, max/sum over the last axes).

    for rows:  m = max_k x;  e = exp(x - m);  s = sum_k e;  y = e / s
        →   for rows in parallel:  every block computed at the row, spatial loops vectorised

Inlines spatial blocks that feed exactly one consumer (never a shared producer such as
softmax's ``exp``: it would be computed twice), fuses the leading spatial axes that every
block shares into one parallel loop, computes every other block at that loop, vectorises the
innermost spatial loops, and reduces a last axis that is a multiple of a vector length in
vector-wide partials (rfactor) before the last few lanes. Bails (returns None) on a matmul
block (see ``batch_matmul.py``), and unless there is a reduction block, every block is a plain
reduction or spatial, and all blocks share at least one leading spatial axis.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from mbcompile.cpu import cpu_info
from mbcompile.targets.schedules.block_info import is_reduction, is_spatial, top_level_blocks
from mbcompile.targets.schedules.elementwise import vectorize_inner
from mbcompile.targets.schedules.gemm_tile import match_gemm


def _leading_spatial(sch: s_tir.Schedule, block) -> int:
    count = 0
    for iv in sch.get(block).iter_vars:
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        count += 1
    return count


def _inline_single_use(sch: s_tir.Schedule, blocks: list) -> list:
    remaining = list(blocks)
    for block in blocks[:-1]:
        if not is_spatial(sch, block) or len(sch.get_consumers(block)) != 1:
            continue
        try:
            sch.compute_inline(block)
        except s_tir.ScheduleError:
            continue
        remaining.remove(block)
    return remaining


def _rfactor_by_lanes(sch: s_tir.Schedule, block, info) -> s_tir.schedule.SBlockRV | None:
    """Split a last-axis reduction into vector-wide partials (``x_rf[.., v]``, vectorisable)
    and a final reduction over the v lanes. None when the axis is not a multiple of a vector."""
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds.count(tirx.IterVar.CommReduce) != 1:
        return None
    loops = sch.get_loops(block)
    extent = sch.get(loops[-1]).extent
    lanes = info.lanes(str(stmt.writes[0].source.dtype))
    if not isinstance(extent, tirx.IntImm) or int(extent.value) % lanes or extent.value <= lanes:
        return None
    _, lane = sch.split(loops[-1], [None, lanes])
    partial = sch.rfactor(lane, factor_axis=len(kinds) - 1)
    # rfactor puts the lane iter first; move it innermost (after the remaining reduction) so
    # compute_at regenerates the loops as (..., k_outer, lane) and the lane loop vectorises.
    n = len(sch.get(partial).iter_vars)
    sch.reorder_block_iter_var(partial, [*range(1, n), 0])
    return partial


def _compute_dtype(dtype: str) -> str:
    return "float32" if tvm.DataType(dtype).bits < 32 else dtype


class RowReduction(ScheduleRule):
    """One parallel loop over rows; the reductions and their neighbours computed per row."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = top_level_blocks(sch)
        if not blocks:
            return None
        reductions = [b for b in blocks if is_reduction(sch, b)]
        if not reductions or any(
            not (b in reductions or is_spatial(sch, b)) for b in blocks
        ):
            return None
        if any(len(sch.get_loops(b)) != len(sch.get(b).iter_vars) for b in blocks):
            return None
        if any(match_gemm(sch, b) is not None for b in reductions):
            return None  # a matmul BatchMatmul declined runs faster unscheduled than per row
        lead = min(_leading_spatial(sch, b) for b in reductions)
        if lead == 0:
            return None
        info = cpu_info(target)
        try:
            blocks = _inline_single_use(sch, blocks)
            partials = [_rfactor_by_lanes(sch, b, info) for b in blocks if b in reductions]
            partials = [sch.get(p) for p in partials if p is not None]
            blocks = top_level_blocks(sch)
            last = blocks[-1]
            loops = sch.get_loops(last)
            if len(loops) < lead:
                return None
            rows = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
            sch.parallel(rows)
            for block in reversed(blocks[:-1]):
                sch.compute_at(block, rows, preserve_unit_loops=True)
            for block in blocks:
                inner = sch.get_loops(block)[1:]
                if not inner:
                    continue
                # a narrow output (int8's quantized rows) is computed in fp32: vectors of those
                lanes = info.lanes(_compute_dtype(str(sch.get(block).writes[0].source.dtype)))
                if any(sch.get(block).same_as(p) for p in partials):
                    sch.vectorize(inner[-1])
                    sch.decompose_reduction(block, inner[-2])
                elif is_spatial(sch, block):
                    vectorize_inner(sch, inner[-1], lanes)
        except s_tir.ScheduleError:
            return None
        return sch
