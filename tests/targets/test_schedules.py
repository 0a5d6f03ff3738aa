"""Tests for mbcompile.targets.schedules: each rule against the unscheduled kernel, rules that
must not match, weight packing, and small MobileBERTs through the whole pipeline vs PyTorch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax, te, tirx, topi
from tvm.script import relax as R
from tvm.sym.analyzer import Analyzer
from tvm.target import codegen

import mbcompile.targets
from mbcompile.cpu import cpu_info
from mbcompile.errors import TargetError
from mbcompile.targets.pipeline import (
    build_pipeline,
    layout_passes,
    legalize_passes,
    lower_passes,
)
from mbcompile.targets.schedules import (
    BatchMatmul,
    DensePacked,
    Elementwise,
    PackDenseWeights,
    PrefetchWeightPanels,
    RowReduction,
    ScheduleKernels,
    default_rules,
)
from mbcompile.targets.schedules.block_info import top_level_blocks
from mbcompile.targets.schedules.elementwise import inline_spatial, transpose_axes
from mbcompile.targets.schedules.gemm_tile import register_tile, tile_rows
from mbcompile.targets.schedules.pack_weights import dense_packed, pack_weight, packed_block_width
from mbcompile.targets.schedules.prefetch import _find_site, _prefetches, prefetch_weight_panels

HOST = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
AARCH64 = tvm.target.Target(
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "num-cores": 4}
)
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


# --------------------------------------------------------------------------- helpers


def _random_args(func: tirx.PrimFunc, rng: np.random.Generator) -> list[np.ndarray]:
    args = []
    for param in func.params:
        shape = [int(d) for d in param.shape]
        dtype = str(param.dtype)
        if dtype.startswith("float"):
            args.append(rng.standard_normal(shape).astype(dtype))
        else:  # indices and masks: zero is in range for every gather
            args.append(np.zeros(shape, dtype))
    return args


def _run(func: tirx.PrimFunc, args: list[np.ndarray]) -> np.ndarray:
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    tensors = [tvm.runtime.tensor(a) for a in args]
    ex.mod["main"](*tensors)
    return tensors[-1].numpy()


def assert_rule_schedules_and_preserves(rule, func: tirx.PrimFunc, atol: float = 1e-5) -> None:
    """``rule`` matches ``func`` and the scheduled kernel computes what the original does."""
    sch = rule.apply(func, HOST, False)
    assert sch is not None, f"{type(rule).__name__} did not match"
    scheduled = sch.mod["main"]
    assert not tvm_ffi.structural_equal(scheduled, func)
    args = _random_args(func, np.random.default_rng(0))
    np.testing.assert_allclose(_run(scheduled, args), _run(func, args), atol=atol, rtol=1e-5)


def packed_dense_with_bias(m: int, k: int, n: int, block: int) -> tirx.PrimFunc:
    x = te.placeholder((m, k), name="x")
    wp = te.placeholder((-(-n // block), k, block), name="wp")
    bias = te.placeholder((n,), name="bias")
    y = dense_packed(x, wp, n)
    out = te.compute((m, n), lambda i, j: tvm.te.max(y[i, j] + bias[j], 0.0), name="relu")
    return te.create_prim_func([x, wp, bias, out])


def batch_matmul_scaled(batch: int, m: int, k: int, n: int) -> tirx.PrimFunc:
    a = te.placeholder((batch, m, k), name="a")
    b = te.placeholder((batch, k, n), name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((batch, m, n), lambda q, i, j: te.sum(a[q, i, r] * b[q, r, j], axis=r), name="c")
    out = te.compute((batch, m, n), lambda q, i, j: c[q, i, j] * 0.125, name="scale")
    return te.create_prim_func([a, b, out])


# --------------------------------------------------------------------------- rules vs unscheduled


@pytest.mark.parametrize("m, k, n", [(128, 64, 32), (7, 13, 37), (1, 16, 3)])
def test_packed_dense_with_fused_epilogue_equals_the_unscheduled_kernel(m, k, n):
    assert_rule_schedules_and_preserves(DensePacked(), packed_dense_with_bias(m, k, n, 16))


@pytest.mark.parametrize(
    "rule, m, k, n",
    [("dense", 128, 64, 32), ("dense", 7, 13, 37), ("dense", 16, 6, 8), ("batch", 32, 8, 32),
     ("batch", 7, 5, 7), ("batch", 6, 12, 24)],
)
def test_rows_loaded_as_vectors_for_fma_by_lane_compute_the_same(rule, m, k, n, monkeypatch):
    """AArch64's variant of the tile (A staged one vector per row per k group) is valid code
    on any CPU: forced here on this one, it computes what the unscheduled kernel does."""
    import dataclasses

    from mbcompile.cpu import cpu_info
    from mbcompile.targets.schedules import batch_matmul, dense

    lane = dataclasses.replace(cpu_info(HOST), fma_by_lane=True)
    monkeypatch.setattr(dense, "cpu_info", lambda _target: lane)
    monkeypatch.setattr(batch_matmul, "cpu_info", lambda _target: lane)
    if rule == "dense":
        func, scheduler = packed_dense_with_bias(m, k, n, 16), DensePacked()
    else:
        func, scheduler = batch_matmul_scaled(2, m, k, n), BatchMatmul()
    sch = scheduler.apply(func, HOST, False)
    assert sch is not None
    staged = "x_global" if rule == "dense" else "a_global"  # A's rows, staged
    assert staged in sch.mod["main"].script()
    args = _random_args(func, np.random.default_rng(0))
    np.testing.assert_allclose(_run(sch.mod["main"], args), _run(func, args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, m, k, n", [(4, 32, 8, 32), (2, 7, 5, 7), (1, 6, 12, 24)])
def test_batch_matmul_with_fused_epilogue_equals_the_unscheduled_kernel(batch, m, k, n):
    assert_rule_schedules_and_preserves(BatchMatmul(), batch_matmul_scaled(batch, m, k, n))


def test_untuned_tile_takes_six_rows_on_avx2_when_m_divides_by_six_else_four():
    info = cpu_info(AVX2)
    assert tile_rows(info, "float32", 384) == 6
    assert tile_rows(info, "float32", 128) == 4
    assert tile_rows(info, "float32", 7) == 1
    assert tile_rows(cpu_info(AVX512), "float32", 384) == 12


def test_aarch64_multiplies_by_lane_with_eight_row_tiles_at_most():
    """Its tile also holds the staged A rows: 12 rows would spill the 32 NEON registers."""
    from mbcompile.targets.registry import resolve_target

    info = cpu_info(resolve_target("aarch64").tvm_target())
    assert info.fma_by_lane and info.num_vector_registers == 32
    assert tile_rows(info, "float32", 384) == 8
    assert tile_rows(info, "float32", 128) == 8
    assert not cpu_info(AVX512).fma_by_lane and not cpu_info(AVX2).fma_by_lane


def test_zen4_is_scheduled_with_256_bit_vectors_though_it_has_avx512():
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    assert codegen.target_has_features("avx512f", zen4)
    assert cpu_info(zen4).vector_bits == 256 and cpu_info(zen4).num_vector_registers == 16
    assert cpu_info(AVX512).vector_bits == 512
    assert packed_block_width(zen4, "float32", 512) == 16
    assert packed_block_width(AVX512, "float32", 512) == 32
    assert tile_rows(cpu_info(zen4), "float32", 128) == tile_rows(cpu_info(AVX2), "float32", 128)


def test_zen4_runs_its_dot_products_on_512_bit_vectors():
    """Its bf16 and int8 matmuls: 512-bit steps, panels of two such vectors (``mbcompile.cpu``:
    the row broadcasts share the dot product's pipes). fp32 keeps 256 bits; AVX2 is 256 bits."""
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    assert cpu_info(zen4).dot_lanes() == 16 and cpu_info(zen4).lanes("float32") == 8
    for precision in ("bf16", "int8"):
        assert packed_block_width(zen4, "float32", 512, precision) == 32
        assert packed_block_width(AVX2, "float32", 512, precision) == 16
    assert packed_block_width(zen4, "float32", 12, "bf16") == 16  # a narrow N: one vector's worth
    assert cpu_info(AVX2).dot_lanes() == 8 and cpu_info(AVX512).dot_lanes() == 16


def test_cpu_info_without_an_llvm_target_is_eight_fp32_lanes_and_reads_dicts():
    assert cpu_info(None).lanes("float32") == 8
    assert cpu_info(tvm.target.Target("c")).lanes("float32") == 8
    assert cpu_info({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}) == cpu_info(AVX512)
    with pytest.raises(TargetError, match="Cannot read 'no-such-kind' as a TVM target"):
        cpu_info("no-such-kind")


def test_the_targets_folder_refuses_to_load_under_another_name():
    """``import targets`` from the repository root would load a second target table."""
    init = Path(mbcompile.targets.__file__)
    spec = importlib.util.spec_from_file_location("targets", init)
    with pytest.raises(ImportError, match=r"import mbcompile\.targets, not targets: "):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

def _llvm_source(func: tirx.PrimFunc) -> str:
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    return (ex.mod.imports[0] if ex.mod.imports else ex.mod).inspect_source("ll")


@pytest.mark.parametrize("epilogue", [True, False], ids=["fused-epilogue", "bare"])
def test_register_tile_accumulator_is_on_the_stack_not_a_heap_workspace(epilogue):
    """A "local" CPU buffer becomes a TVMBackendAllocWorkspace call in every parallel iteration
    (TVM 0.27 keeps only "global" ones under 1 KiB on the stack); that cost 10% of the model."""
    if epilogue:
        func = packed_dense_with_bias(128, 128, 512, 16)
    else:
        x = te.placeholder((128, 128), name="x")
        wp = te.placeholder((32, 128, 16), name="wp")
        func = te.create_prim_func([x, wp, dense_packed(x, wp, 512)])
    scheduled = DensePacked().apply(func, HOST, False).mod["main"]
    assert "TVMBackendAllocWorkspace" not in _llvm_source(scheduled)


def test_the_scheduling_passes_return_a_new_module_and_leave_the_callers_as_it_was():
    """A caller that schedules one module two ways (with a tuning database and without) must
    get two modules, not one scheduled twice."""
    func = packed_dense_with_bias(128, 128, 512, 16)
    mod = tvm.IRModule({"main": func})
    scheduled = ScheduleKernels(HOST, [DensePacked()])(mod)
    assert scheduled["main"].attrs["tirx.is_scheduled"]
    tvm.ir.assert_structural_equal(mod["main"], func)
    prefetched = PrefetchWeightPanels()(scheduled)
    assert _prefetch_calls(prefetched["main"]) == 1 and _prefetch_calls(scheduled["main"]) == 0


def _prefetch_calls(func: tirx.PrimFunc) -> int:
    return func.script().count("T.prefetch(")


@pytest.mark.parametrize("m, k, n, batch", [(128, 128, 512, 1), (96, 64, 40, 1), (7, 13, 37, 1), (32, 64, 32, 3)])
def test_prefetch_pass_adds_next_panel_prefetches_and_outputs_stay_bit_identical(m, k, n, batch):
    if batch == 1:
        func = packed_dense_with_bias(m, k, n, 16)
    else:
        x = te.placeholder((batch, m, k), name="x")
        wp = te.placeholder((-(-n // 16), k, 16), name="wp")
        func = te.create_prim_func([x, wp, dense_packed(x, wp, n)])
    scheduled = DensePacked().apply(func, HOST, False).mod["main"].with_attr("tirx.is_scheduled", True)
    assert _prefetch_calls(scheduled) == 0
    mod = PrefetchWeightPanels()(tvm.IRModule({"main": scheduled}))
    with_prefetch = mod["main"]
    assert _prefetch_calls(with_prefetch) == 1  # one loop of them, before the K loop
    assert prefetch_weight_panels(with_prefetch) is None  # a second run adds nothing
    assert "llvm.prefetch" in _llvm_source(with_prefetch)
    args = _random_args(func, np.random.default_rng(0))
    np.testing.assert_array_equal(_run(with_prefetch, args), _run(scheduled, args))


@pytest.mark.parametrize("m", [128, 1], ids=["row-tiles", "one-row"])
@pytest.mark.parametrize("nb", [8, 16, 32], ids=["half-line", "one-line", "two-lines"])
def test_prefetches_cover_every_cache_line_of_the_next_panel_and_stay_inside_the_weight(nb, m):
    """The row tiles of panel jo together prefetch all of panel jo + 1's 64-byte lines, whether
    a K row of the panel is half a line (nb 8), one (16) or two (32, AVX-512). A tile's
    prefetches are unrolled: all of them, or (one row: the whole panel) in groups of 8. On a
    512-bit target, whatever the host: a 256-bit one (AVX2, Zen 4) takes no 32-column panels."""
    k, n = 128, 96
    scheduled = DensePacked().apply(packed_dense_with_bias(m, k, n, nb), AVX512, False)
    site = _find_site(scheduled)
    assert site is not None and site.row_tiles == m // tile_rows(cpu_info(AVX512), "float32", m)
    t = tirx.Var("t", "int64")
    loop = _prefetches(site, t)
    if isinstance(loop.body, tirx.For):  # groups
        inner = loop.body
        assert inner.kind == tirx.ForKind.UNROLLED and int(inner.extent) == 8 and m == 1
        steps = [(g, s) for g in range(int(loop.extent)) for s in range(8)]
        variables, call = (loop.loop_var, inner.loop_var), inner.body
    else:
        assert loop.kind == tirx.ForKind.UNROLLED and int(loop.extent) <= 32
        steps = [(p,) for p in range(int(loop.extent))]
        variables, call = (loop.loop_var,), loop.body
    index = call.value.args[0].args[0].indices  # prefetch(address_of(Wp[panel, row, col]))
    panels = -(-n // nb)
    covered = {}
    for value in range(panels * site.row_tiles):
        for step in steps:
            analyzer = Analyzer()
            analyzer.bind(t, tirx.IntImm("int64", value))
            for var, v in zip(variables, step):
                analyzer.bind(var, tirx.IntImm("int64", v))
            panel, row, col = (int(analyzer.simplify(e)) for e in index)
            assert 0 <= panel < panels and 0 <= row < k and 0 <= col < nb
            line = (row * nb + col) * 4 // 64
            covered.setdefault(value // site.row_tiles, set()).add((panel, line))
    assert sorted(covered) == list(range(panels))
    for jo, lines in covered.items():
        assert {panel for panel, _ in lines} == {min(jo + 1, panels - 1)}
        assert {line for _, line in lines} == set(range(k * nb * 4 // 64))


def test_prefetch_pass_leaves_a_matmul_of_two_runtime_operands_alone():
    scheduled = BatchMatmul().apply(batch_matmul_scaled(2, 32, 16, 32), HOST, False).mod["main"]
    assert prefetch_weight_panels(scheduled) is None


def _sampled_tiles(sch) -> list[list[int]]:
    return [
        [int(v) for v in sch.trace.decisions[inst]]
        for inst in sch.trace.insts
        if inst.kind.name == "SamplePerfectTile"
    ]


@pytest.mark.parametrize("rule, func", [
    (DensePacked(), packed_dense_with_bias(96, 64, 32, 16)),
    (BatchMatmul(), batch_matmul_scaled(2, 48, 16, 32)),
])
def test_tunable_matmul_schedule_samples_rows_and_k_unroll_and_every_sample_is_correct(rule, func):
    args = _random_args(func, np.random.default_rng(0))
    want = _run(func, args)
    seen = set()
    # rows up to 1.5× the default tile: 6 with AVX2's 16 registers, 12 with AVX-512's 32
    max_rows = register_tile(cpu_info(HOST), "float32")[0] * 3 // 2
    for seed in range(1, 9):
        sch = rule.apply(func, HOST, True)
        replay = tvm.s_tir.Schedule(func, seed=seed)
        # what MetaSchedule does with a design space: replay its trace with fresh decisions
        tvm.s_tir.schedule.Trace(sch.trace.insts, {}).apply_to_schedule(replay, False)
        tiles = _sampled_tiles(replay)
        assert len(tiles) == 2, "rows and K unroll are both knobs"
        rows, unroll = tiles[0][-1], tiles[1][-1]
        assert rows <= max_rows and unroll <= 8
        seen.add((rows, unroll))
        np.testing.assert_allclose(_run(replay.mod["main"], args), want, atol=1e-5, rtol=1e-5)
    assert len(seen) > 1, "the knobs were not re-sampled"


def test_masked_softmax_equals_the_unscheduled_kernel():
    x = te.placeholder((1, 2, 16, 16), name="x")
    mask = te.placeholder((1, 1, 1, 16), name="mask")
    scores = te.compute(x.shape, lambda b, h, i, j: x[b, h, i, j] + mask[b, 0, 0, j], name="add")
    out = topi.nn.softmax(scores, axis=-1)
    assert_rule_schedules_and_preserves(RowReduction(), te.create_prim_func([x, mask, out]))


def test_layer_norm_equals_the_unscheduled_kernel():
    x = te.placeholder((2, 7, 24), name="x")
    gamma = te.placeholder((24,), name="gamma")
    beta = te.placeholder((24,), name="beta")
    out = topi.nn.layer_norm(x, gamma, beta, axis=[2], epsilon=1e-12)
    assert_rule_schedules_and_preserves(RowReduction(), te.create_prim_func([x, gamma, beta, out]))


def test_transpose_gather_and_elementwise_chain_equals_the_unscheduled_kernel():
    table = te.placeholder((10, 64), name="table")
    ids = te.placeholder((128,), name="ids", dtype="int32")
    rows = topi.take(table, ids, axis=0)
    heads = topi.transpose(topi.reshape(rows, (128, 4, 16)), (1, 0, 2))
    out = te.compute(heads.shape, lambda h, s, d: heads[h, s, d] * 2.0 + 1.0, name="affine")
    assert_rule_schedules_and_preserves(Elementwise(), te.create_prim_func([table, ids, out]))


def _key_transpose(seq: int, heads: int, dim: int, offset: int) -> tirx.PrimFunc:
    """Kᵀ as attention reads it: (heads, dim, seq) out of the key columns of a linear's rows."""
    rows = te.placeholder((seq, offset + heads * dim), name="rows")
    keys = topi.strided_slice(rows, [0, offset], [seq, offset + heads * dim])
    split = topi.reshape(keys, (seq, heads, dim))
    return te.create_prim_func([rows, topi.transpose(split, (1, 2, 0))])


@pytest.mark.parametrize("seq, heads, dim, offset", [(128, 4, 32, 128), (64, 2, 16, 0), (12, 2, 8, 8)])
def test_a_transposing_copy_is_tiled_and_equals_the_unscheduled_kernel(seq, heads, dim, offset):
    func = _key_transpose(seq, heads, dim, offset)
    sch = Elementwise().apply(func, HOST, False)
    lanes = cpu_info(HOST).lanes("float32")
    (block,) = [b for b in sch.get_child_blocks(sch.get_sblock("root"))]
    kinds = [sch.get(loop).kind for loop in sch.get_loops(block)]
    tiled = dim % lanes == 0 and seq % lanes == 0
    # tiled: (heads, dim / v) parallel, seq / v, dim % v unrolled, seq % v vectorised
    assert (kinds[-2:] == [tirx.ForKind.UNROLLED, tirx.ForKind.VECTORIZED]) == tiled
    assert_rule_schedules_and_preserves(Elementwise(), func)


def test_transpose_axes_finds_the_source_contiguous_axis_and_ignores_plain_copies():
    sch = tvm.s_tir.Schedule(_key_transpose(128, 4, 32, 128))
    blocks = inline_spatial(sch, top_level_blocks(sch))
    assert transpose_axes(sch, blocks[-1]) == (1, 2)  # d (unit stride in the source), t
    x = te.placeholder((8, 16), name="x")
    plain = tvm.s_tir.Schedule(te.create_prim_func([x, te.compute((8, 16), lambda i, j: x[i, j], name="y")]))
    assert transpose_axes(plain, plain.get_sblock("y")) is None
    scaled = tvm.s_tir.Schedule(te.create_prim_func([x, te.compute((16, 8), lambda j, i: x[i, j] * 2.0, name="y")]))
    assert transpose_axes(scaled, scaled.get_sblock("y")) is None  # not a pure copy


# --------------------------------------------------------------------------- rules that bail


def test_matmul_rules_leave_an_elementwise_function_unchanged():
    x = te.placeholder((8, 8), name="x")
    func = te.create_prim_func([x, te.compute((8, 8), lambda i, j: x[i, j] + 1.0, name="y")])
    for rule in (DensePacked(), BatchMatmul(), RowReduction()):
        assert rule.apply(func, HOST, False) is None


def test_batch_matmul_bails_on_a_transposed_right_operand_and_on_a_ragged_wide_n():
    a = te.placeholder((16, 8), name="a")
    bt = te.placeholder((16, 8), name="bt")
    r = te.reduce_axis((0, 8), name="r")
    nt = te.compute((16, 16), lambda i, j: te.sum(a[i, r] * bt[j, r], axis=r), name="nt")
    assert BatchMatmul().apply(te.create_prim_func([a, bt, nt]), HOST, False) is None
    assert BatchMatmul().apply(batch_matmul_scaled(1, 8, 8, 37), AVX2, False) is None


def test_schedule_kernels_leaves_what_no_rule_matches_as_it_was_and_reports_it():
    x = te.placeholder((8, 8), name="x")
    func = te.create_prim_func([x, te.compute((8, 8), lambda i, j: x[i, j] + 1.0, name="y")])
    mod = tvm.IRModule({"add_one": func})
    schedule = ScheduleKernels(HOST, [DensePacked(), BatchMatmul()])
    after = schedule(mod)
    tvm.ir.assert_structural_equal(after["add_one"], func)
    assert schedule.last_report == {"unscheduled": 1, "failed": []}


def test_pack_weight_blocks_columns_and_zero_pads_the_last_panel():
    w = np.arange(6 * 5, dtype="float32").reshape(6, 5)
    packed = pack_weight(w, 4)
    assert packed.shape == (2, 6, 4)
    np.testing.assert_array_equal(packed[1, :, 0], w[:, 4])
    np.testing.assert_array_equal(packed[1, :, 1:], 0)


def test_pack_dense_weights_packs_a_constant_weight_and_not_a_runtime_one():
    w = relax.const(np.ones((16, 24), "float32"))

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((4, 16), "float32"), y: R.Tensor((16, 24), "float32")):
            with R.dataflow():
                a = R.matmul(x, w)
                b = R.matmul(x, y)
                out = R.add(a, b)
                R.output(out)
            return out

    pack = PackDenseWeights(HOST)
    after = pack(Module)
    assert pack.last_count == 1
    calls = after.script()
    assert calls.count("R.matmul") == 1 and "dense_packed" in calls


@pytest.mark.parametrize("by_lane", [False, True], ids=["broadcast", "fma-by-lane"])
def test_a_matmul_on_a_column_slice_reads_the_wider_tensor_in_place_and_is_scheduled(
        by_lane, monkeypatch):
    """With FMA by lane (AArch64's tile, forced here) the inlined slice leaves a direct read of
    the wider tensor, whose rows are staged as vectors as a plain A's are (counted on the
    emulated device: MobileBERT's dense on the merged linear's columns went from 0.55 to 0.19
    loads per FMLA)."""
    import dataclasses

    from mbcompile.cpu import cpu_info
    from mbcompile.targets.schedules import dense

    if by_lane:
        lane = dataclasses.replace(cpu_info(HOST), fma_by_lane=True)
        monkeypatch.setattr(dense, "cpu_info", lambda _target: lane)
    rng = np.random.default_rng(0)
    w_np = rng.standard_normal((16, 24)).astype("float32")
    w = relax.const(w_np)

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(y: R.Tensor((4, 40), "float32")):
            with R.dataflow():
                x = R.strided_slice(y, axes=[1], begin=[8], end=[24], assume_inbound=True)
                out = R.matmul(x, w)
                R.output(out)
            return out

    with HOST:
        mod = tvm.transform.Sequential(layout_passes(HOST) + legalize_passes(HOST))(Module)
        schedule = ScheduleKernels(HOST, default_rules(HOST))
        mod = schedule(mod)
    assert "strided_slice" not in mod["main"].script(), "the slice is a kernel of its own"
    assert schedule.last_report.get("DensePacked") == 1 and "unscheduled" not in schedule.last_report
    kernels = [f.script() for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert any('T.sblock("y_global")' in k for k in kernels) == by_lane, kernels
    ex = tvm.compile(mod, target=HOST, relax_pipeline=tvm.transform.Sequential(lower_passes(HOST)))
    y = rng.standard_normal((4, 40)).astype("float32")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(y)).numpy()
    np.testing.assert_allclose(got, y[:, 8:24] @ w_np, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- whole pipeline

SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "embedding_size": 32,
    "intra_bottleneck_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "true_hidden_size": 32,
    "vocab_size": 100,
}


def _export(model: torch.nn.Module, batch: int, seq: int, vocab: int):
    from tvm.relax.frontend.torch import from_exported_program

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, a, b, c):
            out = self.m(input_ids=a, attention_mask=b, token_type_ids=c, return_dict=True)
            return tuple(out.values())

    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -2:] = 0  # padded tail on the last sequence exercises the masked softmax
    types = torch.zeros(batch, seq, dtype=torch.long)
    wrapped = Wrap(model.eval())
    with torch.no_grad():
        program = torch.export.export(wrapped, (ids, mask, types))
        expected = [t.numpy() for t in wrapped(ids, mask, types)]
    return from_exported_program(program), (ids, mask, types), expected


def _compile_reporting(mod: tvm.IRModule, target: tvm.target.Target):
    schedule = ScheduleKernels(target, default_rules(target))
    prefetch = PrefetchWeightPanels()
    with target:
        mod = tvm.transform.Sequential(layout_passes(target) + legalize_passes(target))(mod)
        mod = prefetch(schedule(mod))
    lower = tvm.transform.Sequential(lower_passes(target))
    ex = tvm.compile(mod, target=target, relax_pipeline=lower)
    return ex, {**schedule.last_report, "prefetching": prefetch.last_count}


@pytest.mark.parametrize(
    "model_cls, overrides, batch, seq",
    [
        (
            "MobileBertForMaskedLM",
            {"normalization_type": "layer_norm", "hidden_act": "gelu"},
            2,
            7,
        ),
        ("MobileBertModel", {}, 1, 13),
        ("MobileBertModel", {}, 1, 37),
    ],
)
def test_small_mobilebert_compiled_with_the_pipeline_equals_pytorch(
    model_cls, overrides, batch, seq
):
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileBertConfig(**SMALL, **overrides)
    model = getattr(transformers, model_cls)(config)
    mod, inputs, expected = _export(model, batch, seq, config.vocab_size)
    ex, report = _compile_reporting(mod, HOST)
    assert report["failed"] == [] and report["DensePacked"] >= 5
    assert report["prefetching"] == report["DensePacked"]  # every packed dense kernel
    # Only attention scores at a ragged seq > 16 (37) are left unscheduled, on purpose.
    assert report.get("unscheduled", 0) == (1 if seq == 37 else 0)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)


def test_one_default_width_layer_at_seq_128_equals_pytorch():
    import transformers

    torch.manual_seed(0)
    model = transformers.MobileBertModel(transformers.MobileBertConfig(num_hidden_layers=1))
    mod, inputs, expected = _export(model, 1, 128, 30522)
    ex = tvm.compile(mod, target=HOST, relax_pipeline=build_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("target", [AARCH64, AVX512], ids=["aarch64-neon", "x86-avx512"])
def test_small_mobilebert_compiles_for_other_targets_with_every_kernel_scheduled(target):
    import transformers

    config = transformers.MobileBertConfig(**SMALL)
    mod, _, _ = _export(transformers.MobileBertModel(config), 1, 7, config.vocab_size)
    _, report = _compile_reporting(mod, target)
    assert report["failed"] == [] and "unscheduled" not in report
    # every register-tiled matmul prefetches; AArch64's take NEON steps instead (no prefetch)
    assert report["prefetching"] == report.get("DensePacked", 0)
    assert report["DenseNeon" if target is AARCH64 else "DensePacked"] > 0


def test_aarch64_unrolls_k_by_eight_and_x86_by_four():
    from mbcompile.targets.registry import resolve_target
    from mbcompile.targets.schedules.gemm_tile import k_unroll

    assert k_unroll(cpu_info(resolve_target("aarch64").tvm_target())) == 8
    assert k_unroll(cpu_info(AVX2)) == k_unroll(cpu_info(AVX512)) == 4
