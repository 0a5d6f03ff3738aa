"""fp32 → bf16 rounding as ``vcvtneps2bf16`` (``targets/round_instruction.py``): the kernels
codegen builds get it where the target has AVX512_BF16, with the numbers of the integer steps
(NaN and denormals aside, as its doc says), and keep the integer steps everywhere else."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, te

from mbcompile.targets import round_instruction, tir_pipeline
from mbcompile.targets.registry import host_target, resolve_target
from mbcompile.targets.schedules.pack_bf16 import bf16_bits, to_bf16

HOST = host_target().tvm_target()
ZEN4 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


def _rounding(lanes: int, rows: int = 8, width: int = 64) -> s_tir.Schedule:
    """``pack_bf16.to_bf16`` of a rows × width matrix, vectorised by ``lanes``."""
    x = te.placeholder((rows, width), "float32")
    sch = s_tir.Schedule(te.create_prim_func([x, to_bf16(x, width)]))
    _, j = sch.get_loops(sch.get_sblock("to_bf16"))
    _, inner = sch.split(j, [None, lanes])
    sch.vectorize(inner)
    return sch


def _asm(lib) -> str:
    return (lib.imports[0] if lib.imports else lib).inspect_source("asm")


def test_the_targets_with_the_instruction():
    assert round_instruction.has_instruction(ZEN4)
    assert round_instruction.has_instruction(resolve_target("x86-64-zen5").tvm_target())
    for name in ("x86-64-zen3", "x86-64-avx512", "aarch64", "aarch64-armv9"):
        assert not round_instruction.has_instruction(resolve_target(name).tvm_target()), name
    assert not round_instruction.has_instruction(None)


@pytest.mark.parametrize("lanes, rewritten", [(16, True), (8, False)])
def test_only_the_16_lane_rounding_is_rewritten(lanes, rewritten):
    """On a Zen 4 (compile only): 16 lanes become the call and import its IR; 8 stay as they
    were, structurally the same function."""
    mod = tvm.tirx.transform.BindTarget(ZEN4.with_host(ZEN4))(_rounding(lanes).mod)
    lower, *_ = tvm.tirx.get_tir_pipeline("default")
    func = lower(mod)["main"]
    after = round_instruction.rewrite(func)
    script = after.script()
    assert (round_instruction.FUNCTION in script) == rewritten
    assert ("pragma_import_llvm" in script) == rewritten
    if not rewritten:
        tvm.ir.assert_structural_equal(after, func)


def test_a_rounding_kernel_is_one_instruction_with_the_numbers_of_the_integer_steps():
    if not round_instruction.has_instruction(HOST):
        pytest.skip("this CPU has no AVX512_BF16 to run vcvtneps2bf16 on")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 64)) * rng.uniform(1e-3, 1e3, (8, 1))).astype(np.float32)
    ties = np.float32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-8 * 3])  # to even: down, up
    x[0, :10] = [*ties, np.inf, -np.inf, 0.0, -0.0, 3.39e38, 3.4e38]  # the largest, then inf
    x[1, :3] = [np.nan, -1e-39, 1e-39]  # a NaN; denormals
    sch = _rounding(16)
    built = {p: tvm.tirx.build(sch.mod, target=HOST, pipeline=p)
             for p in ("default", tir_pipeline.PIPELINE)}
    assert "vcvtneps2bf16" in _asm(built[tir_pipeline.PIPELINE])
    assert "vcvtneps2bf16" not in _asm(built["default"])
    out = {}
    for p, lib in built.items():
        out[p] = tvm.runtime.tensor(np.zeros((8, 64), np.uint16))
        lib(tvm.runtime.tensor(x), out[p])
    ours, steps = out[tir_pipeline.PIPELINE].numpy(), out["default"].numpy()
    normal = np.ones_like(x, bool)
    normal[1, :3] = False
    np.testing.assert_array_equal(ours[normal], steps[normal])
    np.testing.assert_array_equal(ours[normal], bf16_bits(x)[normal])
    assert ours[0, 0] == 0x3F80 and ours[0, 1] == 0x3F82 and ours[0, 9] == 0x7F80
    assert ours[1, 0] & 0x7F80 == 0x7F80 and ours[1, 0] & 0x7F  # still a NaN
    assert list(ours[1, 1:3]) == [0x8000, 0x0000]  # denormals: signed zeros
