"""Small structural questions about the blocks of a PrimFunc, shared by the schedule rules."""

from __future__ import annotations

from tvm import s_tir, tirx


def top_level_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV] | None:
    """The blocks directly under the root block, in program order.

    None when a block is nested in another (an already scheduled or opaque function).
    """
    try:
        root = sch.get_sblock("root")
    except s_tir.ScheduleError:
        return None
    blocks = list(sch.get_child_blocks(root))
    for block in blocks:
        if sch.get_child_blocks(block):
            return None
    return blocks


def is_spatial(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Every iter of ``block`` is data-parallel (elementwise, broadcast, gather, reshape)."""
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """``block`` has data-parallel iters followed by commutative-reduction iters, and an init."""
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if stmt.init is None or tirx.IterVar.CommReduce not in kinds:
        return False
    first = kinds.index(tirx.IterVar.CommReduce)
    return all(k == tirx.IterVar.DataPar for k in kinds[:first]) and all(
        k == tirx.IterVar.CommReduce for k in kinds[first:]
    )
