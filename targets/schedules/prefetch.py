"""Prefetch the next packed weight panel while the register tiles of the current one run.

Inside the model the weights come cold from memory: 100 MB of MobileBERT weights do not fit
the L3, so every matmul reads its panels from DRAM, and a panel's first tile stalls on it.
The hardware prefetcher restarts at every 4 KiB page of a panel. Measured on Zen 3
(128×128·128×512, 2 threads, weights flushed before each call): 95.7 → 90.5 µs, against
87.9 warm.

A dense kernel as ``gemm_tile.py`` schedules it (tuned or not)::

    for t in parallel(batch · ⌈N/nb⌉ · M/mi):         # t → (b, jo, io)
        acc = 0
        for ko, ki, ii, ji:  acc[ii, ji] += A[i, k] * Wp[jo, k, ji]
        out[...] = epilogue(acc)

gains, before its ``ko`` loop, a share of the next panel ``jo + 1``: the ``M/mi`` row tiles of
panel ``jo`` each prefetch ``1 / (M/mi)`` of its 64-byte cache lines, so the whole next panel is
requested while this one is in use (``e`` counts elements of the flat ``K × nb`` panel)::

    for p in unrolled(lines_per_tile):                 # in unrolled groups of 8 when long
        e = min((io · lines_per_tile + p) · 64 / sizeof(elem), K · nb - 1)   # min if needed
        prefetch(&Wp[min(jo + 1, ⌈N/nb⌉ - 1), e / nb, e % nb])

A prefetch reads nothing the kernel computes with: outputs are bit for bit those without it.
Functions of any other shape are left as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

from mbcompile.targets.schedules.gemm_tile import accumulated_product, const_int, is_packed_index

logger = logging.getLogger(__name__)

CACHE_LINE_BYTES = 64
# A tile's prefetches are unrolled (each a prefetch instruction with its offset): all of them up
# to FULL_UNROLL, else in groups of GROUP. A rolled loop paid a pointer increment, a compare and
# a branch per prefetch: counted on the emulated device, the fill-mask build's vocabulary
# projection (one row, each tile prefetching a whole 16 KiB panel) executed 3.9M instructions
# of prefetch loop against 7.6M of its own.
FULL_UNROLL = 32
GROUP = 8


@dataclass
class _Site:
    outer: s_tir.schedule.LoopRV  # the fused parallel loop
    k_loop: tirx.For  # the statement the prefetch goes before
    weight: tirx.Buffer  # packed [⌈N/nb⌉, K, nb]
    row_tiles: int  # M / mi: parallel iterations per panel


def _find_site(sch: s_tir.Schedule) -> _Site | None:
    """The packed matmul update block of a scheduled dense kernel, or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if kinds.count(tirx.IterVar.CommReduce) != 1 or kinds[-1] != tirx.IterVar.CommReduce:
            continue
        loads = accumulated_product(stmt.body)
        if loads is None:
            continue
        j, k = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
        weight = None
        for load in loads:
            shape = [const_int(d) for d in load.source.shape]
            if len(shape) == 3 and None not in shape and is_packed_index(load.indices, j, k, shape[2]):
                weight = load.source
        if weight is None:
            continue
        loops = sch.get_loops(block)
        if len(loops) != 5:  # fused parallel loop, ko, ki, ii, ji
            return None
        outer, ko, ki, ii, ji = (sch.get(loop) for loop in loops)
        n_outer, k_extent, nb = (int(d) for d in weight.shape)
        extents = [const_int(loop.extent) for loop in (outer, ko, ki, ii, ji)]
        if None in extents or outer.kind != tirx.ForKind.PARALLEL:
            return None
        t, kos, kis, mi, jis = extents
        m = const_int(stmt.iter_vars[-3].dom.extent)
        if jis != nb or kos * kis != k_extent or m is None or m % mi or t % (n_outer * (m // mi)):
            return None
        return _Site(loops[0], ko, weight, m // mi)
    return None


def _prefetches(site: _Site, t: tirx.Var) -> tirx.Stmt:
    """The loop of prefetches parallel iteration ``t`` issues: its share of the next panel's
    cache lines, line ``L`` at element ``L · line / elem`` of the ``K × nb`` panel."""
    n_outer, k_extent, nb = (int(d) for d in site.weight.shape)
    elem_bytes = tvm.DataType(str(site.weight.dtype)).bits // 8
    per_line = max(1, CACHE_LINE_BYTES // elem_bytes)  # elements
    lines = -(-k_extent * nb // per_line)
    per_tile = -(-lines // site.row_tiles)
    dtype = str(t.ty.dtype)
    c = lambda v: tirx.IntImm(dtype, v)  # noqa: E731
    jo = tirx.floormod(tirx.floordiv(t, c(site.row_tiles)), c(n_outer))
    io = tirx.floormod(t, c(site.row_tiles))
    if per_tile > FULL_UNROLL:  # whole groups of GROUP prefetches
        per_tile = -(-per_tile // GROUP) * GROUP
    clamp = (site.row_tiles * per_tile - 1) * per_line > k_extent * nb - 1  # last tile runs over
    panel = tirx.min(jo + c(1), c(n_outer - 1))

    def prefetch(p: tirx.PrimExpr) -> tirx.Stmt:
        element = (io * c(per_tile) + p) * c(per_line)
        if clamp:
            element = tirx.min(element, c(k_extent * nb - 1))
        index = [panel, tirx.floordiv(element, c(nb)), tirx.floormod(element, c(nb))]
        address = tirx.address_of(tirx.BufferLoad(site.weight, index))
        return tirx.Evaluate(tirx.call_intrin(
            "void", "tirx.prefetch", address, tirx.IntImm("int32", 0), tirx.IntImm("int32", 3),
            tirx.IntImm("int32", 1),
        ))

    p = tirx.Var("p", dtype)
    if per_tile <= FULL_UNROLL:
        return tirx.For(p, c(0), c(per_tile), tirx.ForKind.UNROLLED, prefetch(p))
    step = tirx.Var("ps", dtype)
    return tirx.For(p, c(0), c(per_tile // GROUP), tirx.ForKind.SERIAL,
                    tirx.For(step, c(0), c(GROUP), tirx.ForKind.UNROLLED,
                             prefetch(p * c(GROUP) + step)))


def _is_prefetch_loop(stmt: tirx.Stmt) -> bool:
    body = stmt.body if isinstance(stmt, tirx.For) else None
    if isinstance(body, tirx.For):  # groups of prefetches
        body = body.body
    return (
        isinstance(body, tirx.Evaluate)
        and isinstance(body.value, tvm.ir.expr.Call)
        and body.value.op.same_as(tvm.ir.Op.get("tirx.prefetch"))
    )


def prefetch_weight_panels(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with next-panel prefetches, or None when it is not a packed dense kernel or
    already prefetches."""
    try:
        sch = s_tir.Schedule(func)
        site = _find_site(sch)
    except s_tir.ScheduleError:
        return None
    if site is None:
        return None
    outer = sch.get(site.outer)
    body = outer.body
    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    at = next((n for n, s in enumerate(stmts) if s.same_as(site.k_loop)), None)
    if at is None or (at > 0 and _is_prefetch_loop(stmts[at - 1])):
        return None  # not our loop nest, or prefetching already
    stmts.insert(at, _prefetches(site, outer.loop_var))
    new_outer = tirx.For(
        outer.loop_var, outer.min, outer.extent, outer.kind, tirx.SeqStmt(stmts),
        outer.thread_binding, outer.annotations,
    )
    sch.state.replace(sch.get_sref(site.outer), new_outer)
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="PrefetchWeightPanels")
class PrefetchWeightPanels:
    """Add next-panel prefetches to every scheduled packed dense kernel (see module doc).

    ``last_count`` holds how many kernels the last run changed.
    """

    def __init__(self) -> None:
        self.last_count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and func.attrs.get("tirx.is_scheduled", False):
                new = prefetch_weight_panels(func)
                if new is not None:
                    updates[gvar] = new
        if updates:
            mod = mod.clone()  # a pass returns a new module: the caller's keeps its functions
            for gvar, func in updates.items():
                mod[gvar] = func
        self.last_count = len(updates)
        logger.info("PrefetchWeightPanels: %d kernels", len(updates))
        return mod
