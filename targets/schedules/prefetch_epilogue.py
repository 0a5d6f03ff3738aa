"""A panel kernel (``dense_dot._schedule_panels``) asks for its epilogue's rows of the output and
of any full-size fp32 operand (a residual) at the start of each panel, so they arrive while the
panel's dot-product steps run::

    for task in parallel:                             for task in parallel:
        for jo in panels:                                 for jo in panels:
                                                              prefetch(&res[row r, panel jo, line l])   # each r, l
                                                              prefetchw(&out[row r, panel jo, line l])
            acc[:, :] = 0                                     acc[:, :] = 0
            acc += steps(A[rows], Wp[jo])                     acc += steps(A[rows], Wp[jo])
            out[rows, panel] = epilogue(acc, res[rows, panel], ...)     (unchanged)

The output bottleneck of a MobileBERT layer (128 → 512, adding the layer's input and its NoNorm)
reads a 384 × 512 residual written a whole layer before, out of L2 by then, and writes a new
384 × 512 buffer whose lines are not in cache either: its 8 × 32 epilogue waited on both. A
prefetch per 64-byte line (8 rows × 2 lines × 2 buffers: 32 per panel against the panel's 1,024
``vdpbf16ps`` at K 128) overlaps them with the steps. Measured on a 2-core Zen 4, the default
encoder at 384 tokens, 1 thread, per kernel instrumented, medians of interleaved forwards: bf16's
output bottleneck 8.59 → 7.17 ms per forward, its Q/K projection 3.47 → 3.25, the forward
105.0 → 101.1 ms; int8's output bottleneck 4.66 → 4.01, the forward 79.8 → 78.1. Prefetching
the next panel's lines instead gained nothing (8.78 ms), the reads alone 7.49, the writes alone
8.25.

A prefetch reads nothing the kernel computes with: outputs are bit for bit those without it.
Operands that are vectors (bias, NoNorm's γ and β) stay in L1 and are left alone; so are the
kernel's own scratch buffers (the accumulators) and outputs of another dtype.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad
from tvm.sym.analyzer import Analyzer

from mbcompile.targets.schedules.gemm_tile import const_int

LINE_BYTES = 64


def _loads(expr) -> list[TensorLoad]:
    """The tensor loads in ``expr``."""
    if isinstance(expr, TensorLoad):
        return [expr]
    found = []
    for name in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, name, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found += _loads(child)
    for arg in getattr(expr, "args", None) or []:
        found += _loads(arg)
    return found


def _substitute(expr, values: dict):
    analyzer = Analyzer()
    for var, value in values.items():
        analyzer.bind(var, value)
    return analyzer.simplify(expr)


def _lines(sch: s_tir.Schedule, panel: tirx.For, writer) -> list[tirx.Stmt]:
    """The prefetches of the writer block's full-size fp32 operands and output, one per row and
    cache line of the panel, or [] when the writer is not a perfect loop nest of fp32 vectors."""
    loops = [sch.get(loop) for loop in sch.get_loops(writer)]
    at = next((n for n, loop in enumerate(loops) if loop.same_as(panel)), None)
    store = sch.get(writer).body
    if at is None or not isinstance(store, tirx.BufferStore) or str(store.buffer.dtype) != "float32":
        return []
    inner = loops[at + 1:]
    lanes = LINE_BYTES // 4
    if not inner or const_int(inner[-1].extent) != lanes or any(const_int(loop.extent) is None for loop in inner):
        return []
    shape = [const_int(d) for d in store.buffer.shape]
    scratch = list(sch.get(sch.get_sblock("root")).alloc_buffers)
    operands = [(load.source, load.indices, 0) for load in _loads(store.value)
                if [const_int(d) for d in load.source.shape] == shape
                and str(load.source.dtype) == "float32"
                and not any(load.source.same_as(buffer) for buffer in scratch)]
    operands.append((store.buffer, store.indices, 1))  # 1: for writing
    bound = _realize_values(sch, writer)
    if bound is None:
        return []
    values = dict(zip((iv.var for iv in sch.get(writer).iter_vars), bound))
    combos = [[]]
    for loop in inner[:-1]:
        combos = [combo + [n] for combo in combos for n in range(const_int(loop.extent))]
    prefetches = []
    for combo in combos:
        at_line = {loop.loop_var: tirx.IntImm(str(loop.loop_var.ty.dtype), n)
                   for loop, n in zip(inner, combo + [0])}
        block_at = {var: _substitute(value, at_line) for var, value in values.items()}
        for buffer, indices, write in operands:
            address = tirx.address_of(tirx.BufferLoad(
                buffer, [_substitute(index, block_at) for index in indices]))
            prefetches.append(tirx.Evaluate(tirx.call_intrin(
                "void", "tirx.prefetch", address, tirx.IntImm("int32", write),
                tirx.IntImm("int32", 3), tirx.IntImm("int32", 1))))
    return prefetches


def _realize_values(sch: s_tir.Schedule, block) -> list | None:
    """The iter values binding ``block``'s variables to its loops (None if not found)."""
    found = []

    def visit(stmt):
        if isinstance(stmt, s_tir.SBlockRealize) and stmt.block.same_as(sch.get(block)):
            found.append(list(stmt.iter_values))
        elif isinstance(stmt, tirx.For):
            visit(stmt.body)
        elif isinstance(stmt, tirx.SeqStmt):
            for part in stmt.seq:
                visit(part)

    loop = sch.get_loops(block)[0]
    visit(sch.get(loop))
    return found[0] if found else None


def prefetch_epilogue(sch: s_tir.Schedule, panel_loop, writer) -> int:
    """Put the prefetches of the module doc first in ``panel_loop``'s body; how many."""
    panel = sch.get(panel_loop)
    prefetches = _lines(sch, panel, writer)
    if not prefetches:
        return 0
    parts = list(panel.body.seq) if isinstance(panel.body, tirx.SeqStmt) else [panel.body]
    sch.state.replace(sch.get_sref(panel_loop), tirx.For(
        panel.loop_var, panel.min, panel.extent, panel.kind, tirx.SeqStmt(prefetches + parts),
        panel.thread_binding, panel.annotations))
    return len(prefetches)
