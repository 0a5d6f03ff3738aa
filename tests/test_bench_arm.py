"""CI's small ARM instruction count (``python -m bench.arm --quick``): one layer of the default
architecture, 32 tokens, on the emulated Cortex-A76. It fails if mbcompile executes more
instructions per MAC than ONNX Runtime's MLAS kernels on the same model and inputs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def quick():
    import onnxruntime

    from mbcompile.devices.emulator import cached, counting, device

    missing = {**device.missing_tools(), **counting.missing_tools()}
    if missing:
        pytest.skip(f"no instruction counting: {sorted(missing)} missing")
    built = cached()
    site = built and built.directory.parent / "counting" / f"ort-site-{onnxruntime.__version__}"
    if site is None or not (site / "onnxruntime").is_dir():
        pytest.skip("ONNX Runtime's aarch64 wheel is not set up for the emulated device "
                    "(python -m bench.arm --setup, which .ci/run does)")
    from bench.arm import run

    return run(layers=1, seqs=[32], targets=["aarch64"], fill_mask=False, forwards=1,
               log=lambda _: None)


def test_mbcompile_executes_no_more_instructions_per_mac_than_onnx_runtime(quick):
    ours, ort = (next(r for r in quick["rows"] if r["backend"].startswith(name))
                 for name in ("mbcompile", "onnxruntime"))
    assert ours["macs"] == ort["macs"] > 30e6
    assert ours["instr_per_mac"] <= ort["instr_per_mac"], (ours["total"], ort["total"])
    # The arithmetic is dense: one fp32 lane per MAC, and few loads and stores. (The first k of
    # each NEON step multiplies, fmul, instead of accumulating on zeros: just under one FMLA
    # lane per MAC.)
    assert 0.98 <= ours["fmla_lanes_per_mac"] <= 1.02
    assert ours["ldst_share"] <= 0.20
    assert ours["cycles_a55"] >= ours["cycles_a76"] > ours["fmla"] / 2 * 0.99
    assert ours["max_abs_diff_vs_torch"] <= 1e-4 and ort["max_abs_diff_vs_torch"] <= 1e-4


def test_the_kernel_breakdown_names_the_dense_kernels(quick):
    (kernels,) = quick["kernels"].values()
    dense = [k for k in kernels if k["kernel"].startswith("fused_dense")]
    assert sum(k["total"] for k in dense) > 0.8 * sum(k["total"] for k in kernels)
    assert all(k["bottleneck_a76"] == "neon" for k in dense[:4])
