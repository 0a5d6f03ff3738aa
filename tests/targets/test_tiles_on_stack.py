"""A parallel loop's small scratch buffers on the stack (``targets/tiles_on_stack.py``): from
1 KiB to ``STACK_BYTES`` they leave TVM's workspace calls for the stack, with the same numbers;
smaller ones were already there, larger ones stay on the heap."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_dense_dot import ZEN4, _func
from tvm import s_tir, te

from mbcompile.targets import tiles_on_stack, tir_pipeline
from mbcompile.targets.registry import host_target
from mbcompile.targets.schedules.dense_dot import DenseDot

HOST = host_target().tvm_target()
ROWS, WIDTH = 16, 2048


def _tiled(columns: int, parallel: bool = True) -> tvm.IRModule:
    """``O = A · 2 + 1`` where each (parallel) task computes ``A · 2`` of 8 rows × ``columns``
    into a scratch tile, then reads it back: a tile of 32 · ``columns`` bytes."""
    a = te.placeholder((ROWS, WIDTH), "float32", name="A")
    c = te.compute(a.shape, lambda i, j: a[i, j] * 2, name="C")
    o = te.compute(a.shape, lambda i, j: c[i, j] + 1, name="O")
    sch = s_tir.Schedule(te.create_prim_func([a, o]))
    i, j = sch.get_loops(sch.get_sblock("O"))
    io, ii = sch.split(i, [None, 8])
    jo, ji = sch.split(j, [None, columns])
    sch.reorder(io, jo, ii, ji)
    if parallel:
        sch.parallel(io)
    sch.compute_at(sch.get_sblock("C"), jo)
    return sch.mod


def _workspaces(lib) -> int:
    """How many times the kernel loads TVM's workspace allocator to call it."""
    ir = (lib.imports[0] if lib.imports else lib).inspect_source("ll")
    return ir.count("load ptr, ptr @__TVMBackendAllocWorkspace")


@pytest.mark.parametrize("columns, moved", [(16, False), (32, True), (128, True), (1024, False)],
                         ids=["512B-already-stack", "1KiB", "4KiB", "32KiB-heap"])
def test_a_parallel_tasks_tile_from_1_kib_to_the_limit_goes_on_the_stack(columns, moved):
    assert 32 * columns <= tiles_on_stack.STACK_BYTES or not moved
    mod = _tiled(columns)
    built = {p: tvm.tirx.build(mod, target=HOST, pipeline=p)
             for p in ("default", tir_pipeline.PIPELINE)}
    theirs, ours = (_workspaces(built[p]) for p in ("default", tir_pipeline.PIPELINE))
    if moved:
        assert theirs == 1 and ours == 0
    else:
        assert theirs == ours == (32 * columns >= 1024)
    x = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(np.float32)
    for lib in built.values():
        out = tvm.runtime.tensor(np.zeros_like(x))
        lib(tvm.runtime.tensor(x), out)
        np.testing.assert_array_equal(out.numpy(), x * 2 + 1)


def test_a_scratch_buffer_outside_any_parallel_loop_is_left_to_tvm():
    """The same 1 KiB tile in a serial loop: TVM's workspace call stays."""
    lib = tvm.tirx.build(_tiled(32, parallel=False), target=HOST, pipeline=tir_pipeline.PIPELINE)
    assert _workspaces(lib) == 1


def test_the_panel_kernels_accumulators_leave_the_heap():
    """The bf16 panel kernel (compiled for a Zen 4): its 8 × 32 fp32 accumulator panel, 1 KiB,
    is a workspace call per task with TVM's pipeline and none with ours."""
    func, *_ = _func("bf16", ZEN4, 24, 128, 96)
    mod = DenseDot().apply(func, ZEN4, False).mod
    assert "mbc_vdpbf16ps_" in mod.script()
    built = {p: tvm.tirx.build(mod, target=ZEN4, pipeline=p)
             for p in ("default", tir_pipeline.PIPELINE)}
    assert _workspaces(built["default"]) == 1
    assert _workspaces(built[tir_pipeline.PIPELINE]) == 0


def test_a_parallel_body_keeps_at_most_the_limit_on_the_stack_in_all():
    """Two 16 KiB tiles in one task: the first goes on the stack, the second would pass the
    limit and stays a workspace call."""
    a = te.placeholder((ROWS, WIDTH), "float32", name="A")
    c = te.compute(a.shape, lambda i, j: a[i, j] * 2, name="C")
    d = te.compute(a.shape, lambda i, j: a[i, j] * 3, name="D")
    o = te.compute(a.shape, lambda i, j: c[i, j] + d[i, j], name="O")
    sch = s_tir.Schedule(te.create_prim_func([a, o]))
    i, j = sch.get_loops(sch.get_sblock("O"))
    io, ii = sch.split(i, [None, 8])
    jo, ji = sch.split(j, [None, 512])
    sch.reorder(io, jo, ii, ji)
    sch.parallel(io)
    for producer in ("C", "D"):
        sch.compute_at(sch.get_sblock(producer), jo)
    assert 2 * 32 * 512 > tiles_on_stack.STACK_BYTES >= 32 * 512
    built = {p: tvm.tirx.build(sch.mod, target=HOST, pipeline=p)
             for p in ("default", tir_pipeline.PIPELINE)}
    assert _workspaces(built["default"]) == 2
    assert _workspaces(built[tir_pipeline.PIPELINE]) == 1
    x = np.random.default_rng(1).standard_normal((ROWS, WIDTH)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(x))
    built[tir_pipeline.PIPELINE](tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), x * 5, rtol=1e-6)


def test_tuning_builds_a_candidate_as_the_compile_builds_it(tmp_path):
    """MetaSchedule's builder, as tuning makes it, builds with codegen's pipeline in its worker
    process: a candidate with a 2 KiB tile is timed with it on the stack, as the compiled kernel
    runs (TVM's build leaves it a workspace call per task)."""
    import subprocess
    import tarfile

    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    from mbcompile.targets.metaschedule import build_candidate, local_builder, meta_schedule

    assert _workspaces(default_build(_tiled(64), HOST, None)) == 1
    assert _workspaces(build_candidate(_tiled(64), HOST, None)) == 0
    ms = meta_schedule()
    (result,) = local_builder(max_workers=1).build([ms.builder.BuilderInput(_tiled(64), HOST)])
    assert result.error_msg is None
    with tarfile.open(result.artifact_path) as tar:
        tar.extractall(tmp_path, filter="data")
    symbols = subprocess.run(["nm", *map(str, tmp_path.glob("*.o"))], capture_output=True,
                             text=True, check=True).stdout
    assert symbols.strip() and "TVMBackendAllocWorkspace" not in symbols, symbols
