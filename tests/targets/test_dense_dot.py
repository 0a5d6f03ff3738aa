"""The reduced-precision matmul kernels (``pack_bf16``, ``pack_int8``, ``DenseDot``): their
numbers against numpy on the same rounded operands, and the instructions they compile to, for
512-bit targets (Zen 4's included: its fp32 kernels are 256-bit, its dot products not), AVX2
and AArch64 (compiled here, run where the host has the feature)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te

from mbcompile.cpu import cpu_info
from mbcompile.targets.registry import host_features, host_target, resolve_target
from mbcompile.targets.schedules import DenseDot
from mbcompile.targets.schedules.pack_bf16 import (
    bf16_bits,
    bf16_values,
    dense_bf16,
    pack_weight_bf16,
    to_bf16,
)
from mbcompile.targets.schedules.pack_int8 import (
    dense_int8,
    pack_weight_int8,
    quantize_rows,
    quantize_weight,
    row_scales,
    weight_qmax,
    zero_point,
)
from mbcompile.targets.schedules.pack_weights import packed_block_width

HOST = host_target().tvm_target()
SAPPHIRE = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"})
ZEN4 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
DOTPROD = resolve_target("aarch64-dotprod").tvm_target()
ZEN3 = resolve_target("x86-64-zen3").tvm_target()
SKYLAKE = resolve_target("x86-64-avx512").tvm_target()
NEON = resolve_target("aarch64").tvm_target()
ARMV9 = resolve_target("aarch64-armv9").tvm_target()


def _instruction(kind: str, target) -> str:
    info = cpu_info(target)
    return info.bf16_dot if kind == "bf16" else info.int8_dot


def _int8_activations(x: np.ndarray, zero: int = 128, qmax: int = 127):
    """(``q + zero``: uint8 for a non-zero point, int8 for 0; per-row scales) as ``pack_int8``
    rounds a row to ``qmax`` steps each way."""
    sx = (np.maximum(np.abs(x).max(axis=1), 1e-30) / qmax).astype(np.float32)
    q = np.clip(np.rint(x * (1 / sx[:, None])), -qmax, qmax)
    return (q + zero).astype(np.uint8 if zero else np.int8), sx


def _func(kind: str, target, m: int, k: int, n: int, seed: int = 0):
    """(unscheduled kernel, numpy inputs, the expected output, its shape) of one x · W."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    block = packed_block_width(target, "float32", n, kind)
    if kind == "bf16":
        xb, wp = np.zeros((m, k + k % 2), np.uint16), pack_weight_bf16(w, block)
        xb[:, :k] = bf16_bits(x)
        tensors = [te.placeholder(a.shape, str(a.dtype)) for a in (xb, wp)]
        out = dense_bf16(*tensors, n=n)
        inputs = [xb, wp]
        expected = bf16_values(bf16_bits(x)).astype(np.float64) @ bf16_values(bf16_bits(w))
    else:
        instruction = cpu_info(target).int8_dot
        q, sw = quantize_weight(w, weight_qmax(instruction))
        zero = zero_point(instruction)
        xq, sx = _int8_activations(x, zero)
        xq = np.pad(xq, ((0, 0), (0, -k % 4)), constant_values=zero)
        inputs = [xq, sx, pack_weight_int8(q, block), sw]
        inputs += [q.astype(np.int32).sum(axis=0)] if zero else []
        tensors = [te.placeholder(a.shape, str(a.dtype)) for a in inputs]
        out = dense_int8(*tensors[:4], n=n, cw=tensors[4] if zero else None, zero=zero)
        expected = ((xq[:, :k].astype(np.float64) - zero) * sx[:, None]) @ (q * sw.astype(np.float64))
    return te.create_prim_func([*tensors, out]), inputs, expected, out.shape


def _kernel(kind: str, target, m: int, k: int, n: int, seed: int = 0, tunable: bool = False):
    """(scheduled kernel, numpy inputs, the expected output, its shape) of one x · W, its
    activations rounded by numpy as the run-time kernels round them (their own kernels)."""
    func, inputs, expected, shape = _func(kind, target, m, k, n, seed)
    return DenseDot().apply(func, target, tunable), inputs, expected, shape


def test_the_run_time_rounding_kernels_round_as_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 37)).astype(np.float32) * rng.uniform(0.01, 100, (6, 1)).astype(np.float32)
    x[2] = 0  # a row of zeros: scale TINY, not a division by zero
    xt = te.placeholder(x.shape, "float32")
    funcs = [to_bf16(xt, 37), quantize_rows(xt, 37), row_scales(xt, 37), quantize_rows(xt, 37, zero=0)]
    lib = tvm.tirx.build(te.create_prim_func([xt, *funcs]), target=HOST)
    outs = [tvm.runtime.tensor(np.zeros([int(d) for d in f.shape], str(f.dtype))) for f in funcs]
    lib(tvm.runtime.tensor(x), *outs)
    xb, xq, sx, signed = (o.numpy() for o in outs)
    np.testing.assert_array_equal(xb[:, :37], bf16_bits(x))
    assert xb.shape[1] == 38 and not xb[:, 37].any()  # padded to an even width with zeros
    want_q, want_s = _int8_activations(x)
    np.testing.assert_allclose(sx, want_s, rtol=1e-6)
    assert np.abs(xq[:, :37].astype(int) - want_q).max() <= 1  # a tie may round either way
    assert xq.shape[1] == 40 and (xq[:, 37:] == 128).all()  # padded with the zero point
    assert (xq[2] == 128).all()
    np.testing.assert_array_equal(signed.astype(int), xq.astype(int) - 128)  # sdot's: no offset
    q7, _ = quantize_weight(x.T, 63)  # vpmaddubsw's weights: 7 bits
    assert np.abs(q7).max() == 63


@pytest.mark.parametrize(
    "kind, target",
    [("bf16", SAPPHIRE), ("int8", SAPPHIRE), ("bf16", ZEN4), ("int8", ZEN4), ("int8", DOTPROD),
     ("int8", ZEN3), ("int8", SKYLAKE), ("int8", NEON), ("bf16", ARMV9)],
    ids=["bf16-512-bit", "int8-512-bit", "bf16-zen4-512-bit", "int8-zen4-512-bit", "int8-aarch64",
         "int8-zen3-avx2", "int8-avx512-without-vnni", "int8-aarch64-neon", "bf16-armv9"],
)
def test_the_kernel_compiles_to_the_dot_instruction(kind, target):
    sch, *_ = _kernel(kind, target, 24, 64, 96)
    assert sch is not None, "DenseDot did not schedule the kernel"
    asm = tvm.tirx.build(sch.mod, target=target).inspect_source("asm")
    register = {16: "%zmm", 8: "%ymm", 4: ".4s"}[cpu_info(target).dot_lanes()]
    register = ".8h" if _instruction(kind, target) == "smull" else register  # int16 products
    lines = [line for line in asm.splitlines() if _instruction(kind, target) in line]
    # (a scalar smull of x/w registers is address arithmetic, not a product of the matmul)
    lines = [line for line in lines if not re.search(r"smull\t[xw]\d", line)]
    assert lines and all(register in line for line in lines), lines[:3]


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_the_threads_split_the_rows_not_the_weight_panels(kind):
    """The parallel loop walks a row block's panels one after another, so each thread keeps the
    rows it wrote in the kernel before (``dense_dot`` module doc)."""
    sch, *_ = _kernel(kind, ZEN4, 128, 64, 512)  # 32 row blocks of 4, 16 panels of 32
    script = sch.mod.script()
    # the row block is the parallel index over the panels' count, the panel the rest
    fused = re.search(r"for (\w+) in T.parallel\(512\b", script)
    assert fused is not None, script
    var = fused.group(1)
    assert f"T.axis.spatial(128, {var} // 16 * 4 + " in script, script  # row block: outer
    assert f"T.axis.spatial(32, {var} % 16 * 2 + " in script, script  # panel (of 2 vectors)


@pytest.mark.parametrize("kind, target", [("bf16", HOST), ("int8", HOST), ("int8", ZEN3)],
                         ids=["bf16-host", "int8-host", "int8-avx2"])
@pytest.mark.parametrize("shape", [(24, 64, 96), (8, 130, 40), (1, 512, 128)])
def test_the_kernel_computes_the_rounded_product(kind, target, shape):
    if target is ZEN3 and "avx2" not in host_features():
        pytest.skip("this CPU has no AVX2 to run the Zen 3 kernels on")
    info = cpu_info(target)
    if not (info.bf16_dot if kind == "bf16" else info.int8_dot):
        pytest.skip(f"this CPU has no {kind} dot product to run {kind} kernels on")
    sch, inputs, expected, out_shape = _kernel(kind, target, *shape)
    assert sch is not None
    lib = tvm.tirx.build(sch.mod, target=target)
    args = [tvm.runtime.tensor(a) for a in inputs]
    out = tvm.runtime.tensor(np.zeros([int(d) for d in out_shape], np.float32))
    lib(*args, out)
    # the same rounded operands: int8 sums exactly, bf16 in fp32 in another order
    scale = np.abs(expected).max()
    assert np.abs(out.numpy() - expected).max() <= 1e-5 * scale


@pytest.mark.parametrize("target", [HOST, ZEN4, ARMV9], ids=["host", "zen4", "armv9"])
def test_a_bf16_rounding_fuses_into_its_producer_only_where_the_matmul_is_its_only_reader(target):
    """h = relu(x·W1) is read by the second matmul alone: its rounding to bf16 is the first
    matmul's epilogue. x is also read by the residual add: its rounding stays a kernel."""
    from tvm import relax
    from tvm.script import relax as R

    from mbcompile.targets.pipeline import layout_passes, legalize_passes, lower_passes
    from mbcompile.targets.schedules import ScheduleKernels, default_rules

    if not cpu_info(target).bf16_dot:
        pytest.skip("the target has no bf16 dot product")
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 128), np.float32), rng.standard_normal((128, 64), np.float32)
    c1, c2 = relax.const(w1), relax.const(w2)

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((32, 64), "float32")):
            with R.dataflow():
                h = R.nn.relu(R.matmul(x, c1))
                out = R.add(R.matmul(h, c2), x)
                R.output(out)
            return out

    with target:
        mod = tvm.transform.Sequential(layout_passes(target, "bf16") + legalize_passes(target))(
            Module)
        kernels = sorted(gv.name_hint for gv, f in mod.functions_items()
                         if isinstance(f, tvm.tirx.PrimFunc))
        schedule = ScheduleKernels(target, default_rules(target))
        mod = schedule(mod)
    assert [k for k in kernels if "to_bf16" in k] == ["fused_dense_bf16_relu_to_bf161", "to_bf16"]
    assert "unscheduled" not in schedule.last_report, schedule.last_report
    ex = tvm.compile(mod, target=target,
                     relax_pipeline=tvm.transform.Sequential(lower_passes(target)))
    if target is ARMV9 or (target is ZEN4 and "avx512_bf16" not in host_features()):
        return  # compiled and scheduled; running needs the target's CPU
    x = rng.standard_normal((32, 64), np.float32)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    b = lambda a: bf16_values(bf16_bits(a)).astype(np.float64)  # noqa: E731
    h = np.maximum(b(x) @ b(w1), 0)
    expected = b(h.astype(np.float32)) @ b(w2) + x
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


def _panel_kernel(m: int, k: int, n: int, kind: str = "bf16"):
    return _kernel(kind, ZEN4, m, k, n)


@pytest.mark.parametrize("kind, instruction", [("bf16", "vdpbf16ps"), ("int8", "vpdpbusd")])
@pytest.mark.parametrize(
    "shape, panels", [((24, 128, 96), True), ((8, 512, 512), True), ((24, 64, 96), False),
                      ((24, 200, 96), False), ((1, 128, 96), False)],
    ids=["k128", "k512-short", "k64", "k200", "one-row"],
)
def test_matmuls_whose_k_is_a_multiple_of_128_run_on_panel_steps(shape, panels, kind, instruction):
    """On 512-bit vdpbf16ps or vpdpbusd, K in chunks of 128: one step call per 8 rows × 32
    columns × 128 k values, its accumulators in registers (``panel_intrinsics``); other K, the
    one-instruction steps in a stack tile."""
    sch, *_ = _panel_kernel(*shape, kind=kind)
    script = sch.mod.script()
    assert (f"mbc_{instruction}_8x32_acc" in script) is panels, script
    if panels:
        asm = tvm.tirx.build(sch.mod, target=ZEN4).inspect_source("asm")
        lines = [line for line in asm.splitlines() if instruction in line]
        assert len(lines) >= 16 and all("%zmm" in line for line in lines), lines[:3]


def test_a_short_input_splits_the_columns_too_so_every_thread_has_work():
    """8 tokens are one block of 8 rows: the 16 panels go in 8 chunks of 2 (MIN_TASKS), or in
    16 of 1 for a 16-core target (two tasks per core wanted, at most one per panel)."""
    sch, *_ = _panel_kernel(8, 128, 512)
    assert re.search(r"T.parallel\(8\b", sch.mod.script()), sch.mod.script()
    sch, *_ = _panel_kernel(384, 128, 512)  # 48 row blocks: the columns whole
    assert re.search(r"T.parallel\(48\b", sch.mod.script()), sch.mod.script()
    many = tvm.target.Target({**ZEN4.export(), "num-cores": 16})
    func = _func("bf16", many, 8, 128, 512)[0]
    assert re.search(r"T.parallel\(16\b", DenseDot().apply(func, many, False).mod.script())
    func = _func("bf16", many, 128, 128, 512)[0]  # 16 row blocks × 2 chunks
    assert re.search(r"T.parallel\(32\b", DenseDot().apply(func, many, False).mod.script())


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_each_panel_is_zeroed_summed_and_finished_before_the_next(kind):
    """Per 32-column panel: its zeros, its steps (the K chunks unrolled, so the first step
    starts from the zeros in registers), then its epilogue (here the crop of N 40 to its two
    padded panels), all in the one panel loop: the epilogue overlaps the next panel's steps."""
    sch, *_ = _panel_kernel(16, 256, 40, kind)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(block).name_hint for block in blocks]
    assert len(blocks) == 3 and names[0].endswith("_init") and names[1].endswith("_update_o"), names
    panel_loops = {sch.get_sref(sch.get_loops(block)[1]) for block in blocks}
    assert len(panel_loops) == 1, sch.mod.script()
    chunks = sch.get(sch.get_loops(blocks[1])[2])
    assert chunks.kind == tvm.tirx.ForKind.UNROLLED and int(chunks.extent) == 2  # K 256


@pytest.mark.parametrize("kind, instruction", [("bf16", "vdpbf16ps"), ("int8", "vpdpbusd")])
@pytest.mark.parametrize("shape", [(24, 128, 96), (2, 512, 128), (100, 256, 64), (8, 128, 512),
                                   (384, 128, 32), (24, 128, 40), (6, 256, 33)])
def test_the_panel_kernel_computes_the_rounded_product(shape, kind, instruction):
    """Every shape, N not a multiple of 32 included (its last panel padded, then cropped)."""
    info = cpu_info(HOST)
    if instruction not in (info.bf16_dot, info.int8_dot) or info.dot_lanes() != 16:
        pytest.skip(f"this CPU has no 512-bit {instruction} to run the panel steps on")
    sch, inputs, expected, out_shape = _kernel(kind, HOST, *shape)
    assert f"mbc_{instruction}_" in sch.mod.script()
    lib = tvm.tirx.build(sch.mod, target=HOST)
    out = tvm.runtime.tensor(np.zeros([int(d) for d in out_shape], np.float32))
    lib(*(tvm.runtime.tensor(a) for a in inputs), out)
    assert np.abs(out.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("kind, instruction", [("bf16", "vdpbf16ps"), ("int8", "vpdpbusd")])
def test_a_panel_kernel_has_one_schedule_tuned_or_not(kind, instruction):
    """Its step is a different intrinsic for each row count, named in the trace: a sampled row
    count that a tuning search changed would replay into a mismatch. So nothing is sampled,
    and the trace replays onto the kernel as it is."""
    from tvm import s_tir

    untuned, *_ = _kernel(kind, ZEN4, 24, 128, 96)
    tuned, *_ = _kernel(kind, ZEN4, 24, 128, 96, tunable=True)
    assert not [inst for inst in tuned.trace.insts if inst.kind.name.startswith("Sample")]
    tvm.ir.assert_structural_equal(untuned.mod, tuned.mod)
    fresh = s_tir.Schedule(_func(kind, ZEN4, 24, 128, 96)[0])
    tuned.trace.apply_to_schedule(fresh, remove_postproc=True)
    assert f"mbc_{instruction}_8x32_acc" in fresh.mod.script()


def test_a_tuning_database_neither_tunes_nor_replaces_a_panel_kernel(tmp_path, monkeypatch):
    """A record of a panel kernel tuned before it took the panel steps (as in a database made by
    an earlier mbcompile: the shipped Zen 4 one held such bf16 records) does not replace them;
    a record of a kernel with knobs (K 64: the stack tile) still applies."""
    from mbcompile.targets.metaschedule import meta_schedule
    from mbcompile.targets.pipeline import apply_database
    from mbcompile.targets.schedules import dense_dot
    from mbcompile.targets.schedules.fixed import has_fixed_schedule
    from mbcompile.targets.tuning import apply_database_pass
    from mbcompile.targets.tuning_database import Database

    ms = meta_schedule()
    panel, other = _func("bf16", ZEN4, 24, 128, 96)[0], _func("bf16", ZEN4, 24, 64, 96)[0]
    assert has_fixed_schedule(panel, ZEN4) and not has_fixed_schedule(other, ZEN4)
    with monkeypatch.context() as patch:  # the kernel as it was scheduled before the panels
        patch.setattr(dense_dot, "takes_panels", lambda *args: False)
        old = DenseDot().apply(panel, ZEN4, False)
    assert "_8x32_acc" not in old.mod.script()
    db = Database.create(tmp_path / "db", ZEN4)
    ms_db = db.ms_database()
    for func, sch in ((panel, old), (other, DenseDot().apply(other, ZEN4, True))):
        workload = ms_db.commit_workload(tvm.IRModule({"main": func}))
        ms_db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [1e-6], ZEN4, ms.arg_info.ArgInfo.from_prim_func(func)))
    mod = tvm.IRModule({"panel": panel, "other": other})
    with ZEN4:
        bare = apply_database_pass(db)(mod)  # the record alone would give the old kernel back
        tuned, supplied = apply_database(mod, ZEN4, db)
    assert "mbc_vdpbf16ps_8x32_acc" not in bare["panel"].script()
    assert "mbc_vdpbf16ps_8x32_acc" in tuned["panel"].script()
    assert supplied == 1 and tuned["other"].attrs["tirx.is_scheduled"]
