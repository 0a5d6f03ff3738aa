"""AArch64's fp32 matmul steps (``neon_steps``, ``neon_intrinsics``, ``DenseNeon``): which
matmuls they take, the instructions they compile to, and their numbers on the emulated device
against numpy for every row count (4, 2, 1) and K that is not a multiple of the unroll."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import tvm
from tvm import te

from mbcompile.devices.rpc import connect
from mbcompile.targets.export import fcompile_for
from mbcompile.targets.registry import resolve_target
from mbcompile.targets.schedules import DenseNeon, DensePacked, default_rules
from mbcompile.targets.schedules.neon_intrinsics import block_rows
from mbcompile.targets.schedules.neon_steps import COLUMNS
from mbcompile.targets.schedules.pack_weights import dense_packed, pack_weight, packed_block_width

SPEC = resolve_target("aarch64")
NEON = SPEC.tvm_target()
X86 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def _dense(m: int, k: int, n: int, k_offset: int = 0, relu: bool = True):
    """x[m, k_offset + k] (columns from k_offset) · W + bias, then ReLU, W packed as on NEON."""
    x = te.placeholder((m, k + k_offset), name="x")
    wp = te.placeholder((-(-n // COLUMNS), k, COLUMNS), name="wp")
    bias = te.placeholder((n,), name="bias")
    y = dense_packed(x, wp, n, k_offset=k_offset)
    out = te.compute((m, n), lambda i, j: te.max(y[i, j] + bias[j], 0.0) if relu
                     else y[i, j] + bias[j], name="epilogue")
    return te.create_prim_func([x, wp, bias, out])


def _inputs(m: int, k: int, n: int, k_offset: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k + k_offset)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    expected = np.maximum(x[:, k_offset:].astype(np.float64) @ w + bias, 0)
    return [x, pack_weight(w, COLUMNS), bias, np.zeros((m, n), np.float32)], expected


def _asm(func) -> str:
    sch = DenseNeon().apply(func, NEON, False)
    assert sch is not None
    return tvm.tirx.build(sch.mod, target=NEON).inspect_source("asm")


def test_neon_targets_pack_16_columns_and_take_the_steps_first():
    assert packed_block_width(NEON, "float32", 512) == COLUMNS == 16
    assert packed_block_width(X86, "float32", 512) == 32  # x86 unchanged
    assert packed_block_width(resolve_target("aarch64-dotprod").tvm_target(), "float32", 8) == 16
    rules = [type(r).__name__ for r in default_rules(NEON)]
    assert rules.index("DenseNeon") < rules.index("DensePacked")


def test_rows_per_step_are_four_two_or_one():
    assert [block_rows(m) for m in (128, 384, 6, 10, 9, 1, 7)] == [4, 4, 2, 2, 1, 1, 1]


def test_only_neon_targets_take_the_steps():
    func = _dense(16, 32, 32)
    assert DenseNeon().apply(func, NEON, False) is not None
    assert DenseNeon().apply(func, X86, False) is None
    # a panel of another width (what x86 packs) is left to the register tile
    x = te.placeholder((8, 32), name="x")
    wp = te.placeholder((1, 32, 8), name="wp")
    narrow = te.create_prim_func([x, wp, dense_packed(x, wp, 8)])
    assert DenseNeon().apply(narrow, NEON, False) is None
    assert DensePacked().apply(narrow, NEON, False) is not None


def test_a_16_column_panel_the_steps_refuse_falls_back_to_the_register_tile():
    """DensePacked takes a 16-column panel in tiles of 8 columns (its 8 × 8 tile): what runs
    when DenseNeon bails."""
    sch = DensePacked().apply(_dense(16, 32, 32), NEON, False)
    assert sch is not None


def test_the_step_loads_16_weights_per_instruction_and_multiplies_by_lane():
    import re

    asm = _asm(_dense(128, 512, 64))
    loop = asm[asm.index("fmla"):]
    four = re.findall(r"ld1\t\{ (?:v\d+\.4s, ){3}v\d+\.4s \}, \[x\d+\], #64", loop)
    two = re.findall(r"ldp\tq\d+, q\d+, \[x\d+\], #32", loop)
    assert len(four) >= 8  # 16 weights of one k per ld1, post-indexed: 8 k per iteration
    assert len(two) >= 4  # 8 k of each of the 4 rows per ldp, post-indexed
    assert re.search(r"fmla\tv\d+\.4s, v\d+\.4s, v\d+\.s\[3\]", loop)  # by element
    assert not re.search(r"ldr\ts\d+", loop)  # no scalar loads of A


@pytest.mark.parametrize(
    "m, k, n, k_offset",
    [(128, 512, 64, 0), (8, 128, 32, 0), (6, 20, 48, 0), (2, 13, 16, 0), (1, 512, 32, 0),
     (3, 7, 16, 0), (12, 64, 32, 128)],
    ids=["4rows-k512", "4rows-k128", "2rows-k20", "2rows-k13", "gemv-k512", "1row-k7",
         "column-slice"],
)
def test_the_step_computes_the_product_on_the_emulated_device(device, tmp_path, m, k, n,
                                                               k_offset):
    func = _dense(m, k, n, k_offset)
    sch = DenseNeon().apply(func, NEON, False)
    assert sch is not None, "DenseNeon did not take the matmul"
    assert "mbc_neon_fmla" in sch.mod["main"].script()
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=NEON)
    # a name of its own: the device's dlopen would hand back an earlier library of the same path
    path = tmp_path / f"dense-{m}x{k}x{n}-{k_offset}.so"
    lib.export_library(str(path), fcompile=fcompile_for(SPEC))
    args, expected = _inputs(m, k, n, k_offset)
    session = connect(device.address, 30)  # closed below: the server serves one at a time
    session.upload(str(path))
    dev = session.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    session.load_module(path.name)["main"](*tensors)
    got = tensors[-1].numpy()
    del tensors, dev, session
    gc.collect()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_tuning_leaves_the_steps_out_and_keeps_the_other_kernels():
    """The steps have one schedule: ``targets/tuning.py`` does not make tasks of them, and does
    of the rest of an aarch64 build (the elementwise and reduction kernels)."""
    from helpers import make_model, tiny_config

    from mbcompile.compiler import prepare
    from mbcompile.options import CompileOptions
    from mbcompile.targets.pipeline import fused_module
    from mbcompile.targets.schedules import dense_neon
    from mbcompile.targets.tuning import _tasks, meta_schedule

    model = make_model("base", tiny_config(num_hidden_layers=1))
    mod = fused_module(prepare(model, CompileOptions(target="aarch64", seq_len=16)).mod, NEON)
    steps = [gv for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and dense_neon.handles(f, NEON)]
    assert steps, "no matmul of the build takes the NEON steps"
    tasks = _tasks(meta_schedule(), mod, NEON, None)
    assert tasks and not any(dense_neon.handles(t.dispatched[0]["main"], NEON) for t in tasks)
    assert dense_neon.handles(_dense(16, 32, 32), NEON)
    assert not dense_neon.handles(_dense(16, 32, 32), X86)
