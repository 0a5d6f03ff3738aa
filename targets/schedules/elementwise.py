"""Schedule rule for PrimFuncs made only of spatial blocks (elementwise, broadcast, reshape,
transpose, gather, concat, pad).

    for a, b, c:  T[a, b, c] = f(...)      →   for (a, b, c/v) in parallel:  vectorised c % v

Inlines every block it can into its consumer, then gives each remaining block one parallel
loop over all but the innermost axis, and vectorises the innermost axis when its extent is a
multiple of the vector length. Small kernels stay on one thread (a parallel launch costs
more than they do). Bails (returns None) when a block is not spatial or blocks are nested.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .block_info import is_spatial, top_level_blocks
from .target_info import cpu_info

# Below this many elements per loop nest, one thread beats a parallel launch.
MIN_PARALLEL_ELEMENTS = 16384


def inline_spatial(sch: s_tir.Schedule, blocks: list) -> list:
    """compute_inline every block that allows it (never the last); returns the rest in order."""
    remaining = list(blocks)
    changed = True
    while changed:
        changed = False
        for block in remaining[:-1]:
            if not is_spatial(sch, block):
                continue
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
            remaining.remove(block)
            changed = True
            break
    return remaining


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def vectorize_inner(sch: s_tir.Schedule, loop, lanes: int):
    """Split off and vectorise ``lanes`` iterations of ``loop``; returns the outer part."""
    extent = _extent(sch, loop)
    if extent is None or extent < 2:
        return loop
    if extent <= lanes:
        sch.vectorize(loop)
        return None
    if extent % lanes:
        return loop
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return outer


def schedule_loop_nest(sch: s_tir.Schedule, block, lanes: int, parallel: bool) -> None:
    """Parallel over the outer loops of ``block``'s nest, vectorised innermost loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    rest = vectorize_inner(sch, loops[-1], lanes)
    outer_loops = list(loops[:-1]) + ([rest] if rest is not None else [])
    if not outer_loops:
        return
    fused = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
    if parallel:
        sch.parallel(fused)


class Elementwise(ScheduleRule):
    """Inline, then parallel + vectorised loop nests for all-spatial PrimFuncs."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = top_level_blocks(sch)
        if not blocks or not all(is_spatial(sch, block) for block in blocks):
            return None
        info = cpu_info(target)
        try:
            for block in inline_spatial(sch, blocks):
                stmt = sch.get(block)
                if not stmt.writes:
                    continue
                dtype = str(stmt.writes[0].source.dtype)
                elements = 1
                for iv in stmt.iter_vars:
                    extent = iv.dom.extent
                    elements *= int(extent.value) if isinstance(extent, tirx.IntImm) else 1 << 20
                schedule_loop_nest(
                    sch, block, info.lanes(dtype), parallel=elements >= MIN_PARALLEL_ELEMENTS
                )
        except s_tir.ScheduleError:
            return None
        return sch
