"""Named targets: the table, host detection, errors, what can run here."""

from __future__ import annotations

import pytest
import tvm

from mbcompile import TargetError
from mbcompile.targets.registry import TARGETS, can_run_here, host_arch, resolve_target


def test_required_targets_are_named():
    assert {"x86-64", "x86-64-avx512", "aarch64"} <= set(TARGETS)


def test_unknown_target_error_lists_known_names():
    with pytest.raises(TargetError) as info:
        resolve_target("arm")
    assert "Unknown target 'arm'" in str(info.value)
    for name in ("host", "x86-64", "aarch64"):
        assert name in str(info.value)


def test_host_resolves_to_this_cpu_not_native():
    host = resolve_target("host")
    assert host.arch == host_arch()
    assert host.llvm["mcpu"] not in ("", "native", "generic")
    assert host.llvm["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert can_run_here(host) is None


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_named_target_makes_a_valid_tvm_target(name):
    target = resolve_target(name, num_cores=4).tvm_target()
    assert str(target.kind) == "llvm"
    assert int(target.attrs["num-cores"]) == 4


def test_foreign_architecture_cannot_run_here():
    other = "aarch64" if host_arch() == "x86_64" else "x86-64"
    reason = can_run_here(TARGETS[other])
    assert reason is not None and "remote" in reason


@pytest.mark.parametrize("name", ["x86-64-zen3", "x86-64-zen4"])
def test_amd_zen_targets_by_name_get_their_shipped_tuning_database(name):
    from mbcompile.targets.tuning import resolve_database

    target = resolve_target(name, num_cores=2).tvm_target()
    db = resolve_database("default", target)
    assert db is not None and db.manifest["target"]["mcpu"] == TARGETS[name].llvm["mcpu"]


def test_generic_x86_targets_get_no_cpu_specific_database():
    from mbcompile.targets.tuning import resolve_database

    for name in ("x86-64", "x86-64-avx512"):
        assert resolve_database("default", resolve_target(name).tvm_target()) is None


@pytest.mark.parametrize(
    "name, fp32_bits, dot_bits",
    [("x86-64-zen3", 256, 256), ("x86-64-zen4", 256, 512), ("x86-64-zen5", 512, 512)],
)
def test_each_amd_zen_generation_gets_its_vector_widths(name, fp32_bits, dot_bits):
    """Zen 4 splits 512-bit operations in two (fp32 tiles of 256 bits, dot products of 512);
    Zen 5 runs them whole; Zen 3 has no AVX-512. Zen 4 and 5 have AVX512_BF16 and VNNI."""
    from mbcompile.cpu import cpu_info

    info = cpu_info(resolve_target(name).tvm_target())
    assert (info.vector_bits, info.dot_lanes() * 32) == (fp32_bits, dot_bits)
    has_avx512 = name != "x86-64-zen3"
    assert (info.bf16_dot, info.int8_dot) == (
        ("vdpbf16ps", "vpdpbusd") if has_avx512 else ("", "vpmaddubsw"))
