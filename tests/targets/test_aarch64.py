"""aarch64: the named ARM targets, cross-compilation (Linux gcc, Android NDK), and every head
cross-compiled for aarch64 and run on the emulated device against PyTorch eager.

The emulated tests (``slow``) build the device on first use (about a minute; cached in
~/.cache/mbcompile/emulator, see ``emulator.cache_dir``) and skip, with the reason, where
qemu-user-static or mmdebstrap is missing. The device itself (cache, tools, server) is tested in
tests/devices/test_emulator.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import zipfile

import pytest
from helpers import (
    assert_matches_eager,
    make_model,
    random_inputs,
    soak,
    tiny_config,
    trained_pad_row,
)

import mbcompile
from mbcompile import TargetError, ToolchainError
from mbcompile.capture import named_config, random_model
from mbcompile.heads import HEADS
from mbcompile.targets.export import AARCH64_LINUX_PACKAGE, fcompile_for
from mbcompile.targets.registry import TARGETS, Target, _validate, host_arch

ARM_TARGETS = ("aarch64", "aarch64-dotprod", "android-arm64", "raspberry-pi-4")
SEQ = 16
FULL_SEQ = 128
cross_only = pytest.mark.skipif(host_arch() == "aarch64", reason="the host is aarch64 itself")


def _elf_machine(lib: bytes) -> int:
    assert lib[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(lib[18:20], "little")  # e_machine: 0xB7 AArch64, 0x3E x86-64


def _lib_of(path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read("lib.so")



# -- the target table ------------------------------------------------------------------------


def test_arm_targets_are_named_with_their_cpus():
    assert set(ARM_TARGETS) <= set(TARGETS)
    expect = {  # name: (mtriple, mcpu, features, export)
        "aarch64": ("aarch64-linux-gnu", "generic", ("asimd",), "aarch64-linux-gnu"),
        "aarch64-dotprod": (
            "aarch64-linux-gnu",
            "generic",
            ("asimd", "asimddp"),
            "aarch64-linux-gnu",
        ),
        "android-arm64": (
            "aarch64-linux-android",
            "cortex-a76",
            ("asimd", "asimddp"),
            "android-ndk",
        ),
        "raspberry-pi-4": ("aarch64-linux-gnu", "cortex-a72", ("asimd",), "aarch64-linux-gnu"),
    }
    for name, (triple, cpu, features, export) in expect.items():
        t = TARGETS[name]
        assert (t.arch, t.llvm["mtriple"], t.llvm["mcpu"]) == ("aarch64", triple, cpu), name
        assert (t.features, t.export) == (features, export), name
    assert TARGETS["raspberry-pi-4"].num_cores == 4


def test_dotprod_is_on_only_for_armv82_targets():
    has = {n: bool(TARGETS[n].tvm_target().attrs["feature.has_dotprod"]) for n in ARM_TARGETS}
    assert has == {
        "aarch64": False,
        "aarch64-dotprod": True,
        "android-arm64": True,
        "raspberry-pi-4": False,
    }


@pytest.mark.parametrize(
    "name, change",
    [
        ("android-arm64", {"export": "aarch64-linux-gnu"}),  # gnu linker for an android triple
        ("android-arm64", {"features": ("asimd", "neon")}),  # not /proc/cpuinfo's spelling
        ("aarch64-dotprod", {"features": ("asimd",)}),  # dotprod code without asimddp
        ("aarch64", {"arch": "x86_64"}),  # triple of another architecture
    ],
)
def test_table_validation_rejects_inconsistent_arm_entries(name, change):
    bad = Target(**{**vars(TARGETS[name]), **change})
    with pytest.raises(AssertionError):
        _validate({name: bad})


def test_tvm_sees_the_arm_targets_as_arm_cpus():
    for name in ARM_TARGETS:
        assert "arm_cpu" in TARGETS[name].tvm_target().keys, name


# -- cross-compilation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_aarch64(tmp_path_factory):
    """A tiny question-answering model, compiled for aarch64 and saved."""
    model = make_model("question-answering", tiny_config(num_labels=2))
    compiled = mbcompile.compile(model, seq_len=SEQ, target="aarch64")
    path = compiled.save(tmp_path_factory.mktemp("aarch64") / "qa.mbc")
    return model, compiled, path


def test_cross_compiled_library_is_an_aarch64_shared_object(qa_aarch64):
    _, _, path = qa_aarch64
    lib = _lib_of(path)
    assert _elf_machine(lib) == 0xB7
    assert int.from_bytes(lib[16:18], "little") == 3  # ET_DYN: a shared library


def test_artifact_records_its_aarch64_target(qa_aarch64):
    _, compiled, path = qa_aarch64
    again = mbcompile.load(path)
    assert compiled.target == again.target == "aarch64"
    assert again.metadata.target == TARGETS["aarch64"].to_dict()
    assert json.loads(again.metadata.tvm_target)["mtriple"] == "aarch64-linux-gnu"


@cross_only
def test_aarch64_artifact_refuses_to_run_on_x86_and_points_to_remote(qa_aarch64):
    model, _, path = qa_aarch64
    ids, _, _ = random_inputs(model.config, (1, SEQ))
    with pytest.raises(TargetError, match="remote="):
        mbcompile.load(path)(ids)


@cross_only
def test_missing_cross_compiler_names_the_apt_package(monkeypatch, tmp_path):
    model = make_model("base", tiny_config())
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-g++ here
    with pytest.raises(ToolchainError, match=re.escape(f"apt-get install {AARCH64_LINUX_PACKAGE}")):
        # compile links (cross-compiles) the library before it returns
        compiled = mbcompile.compile(model, seq_len=8, target="aarch64", passes=())
        compiled.save(tmp_path / "base.mbc")
    assert not (tmp_path / "base.mbc").exists()


def test_missing_ndk_names_android_ndk_home(monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("ANDROID_NDK_ROOT", raising=False)
    with pytest.raises(ToolchainError, match="ANDROID_NDK_HOME"):
        fcompile_for(TARGETS["android-arm64"])


def test_ndk_folder_without_clang_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    with pytest.raises(ToolchainError, match="aarch64-linux-android28-clang"):
        fcompile_for(TARGETS["android-arm64"])


@cross_only
def test_android_build_links_with_the_ndk_clang(monkeypatch, tmp_path):
    """A stand-in NDK (its clang++ runs Debian's aarch64 g++): the NDK's compiler is found where
    the NDK keeps it and links the android-arm64 library. A real NDK was not available here."""
    bin_dir = tmp_path / "ndk" / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin"
    bin_dir.mkdir(parents=True)
    clang = bin_dir / "aarch64-linux-android28-clang++"
    calls = tmp_path / "calls.txt"
    clang.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec aarch64-linux-gnu-g++ "$@"\n')
    clang.chmod(clang.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path / "ndk"))
    model = make_model("base", tiny_config())
    compiled = mbcompile.compile(model, seq_len=8, target="android-arm64", passes=())
    path = compiled.save(tmp_path / "android.mbc")
    assert _elf_machine(_lib_of(path)) == 0xB7
    assert "-static-libstdc++" in calls.read_text()
    assert mbcompile.load(path).metadata.target["llvm"]["mtriple"] == "aarch64-linux-android"


# -- the emulated device: every head against PyTorch -------------------------------------------


def assert_device_matches_eager(device, compiled, model, shape, tmp_path, pad):
    """Upload ``compiled`` to the device and compare its outputs with PyTorch eager."""
    path = compiled.save(tmp_path / "model.mbc")
    remote = mbcompile.load(path, remote=device.address)
    try:
        ids, mask, types = random_inputs(model.config, shape, pad=pad)
        return assert_matches_eager(remote, model, ids, mask, types)
    finally:
        remote.program.close()


@pytest.mark.slow
@pytest.mark.parametrize("head", list(HEADS))
def test_head_cross_compiled_for_aarch64_matches_eager_on_emulated_device(head, device, tmp_path):
    config = tiny_config(num_labels=2 if head == "question-answering" else 3)
    model = make_model(head, config)
    choices = 2 if head == "multiple-choice" else None
    compiled = mbcompile.compile(model, seq_len=SEQ, num_choices=choices, target="aarch64")
    shape = (1, 2, SEQ) if choices else (1, SEQ)
    assert_device_matches_eager(device, compiled, model, shape, tmp_path, pad=3)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["aarch64-dotprod", "raspberry-pi-4"])
def test_arm_board_targets_run_on_emulated_device(target, device, tmp_path):
    model = make_model("question-answering", tiny_config(num_labels=2))
    compiled = mbcompile.compile(model, seq_len=SEQ, target=target)
    assert_device_matches_eager(device, compiled, model, (1, SEQ), tmp_path, pad=2)


@pytest.mark.slow
@pytest.mark.parametrize("head", soak(["masked-lm", "question-answering"], ["question-answering"]))
def test_full_size_head_matches_eager_on_emulated_device_at_seq_128(head, device, tmp_path):
    """google/mobilebert-uncased architecture (24 layers). Under emulation one forward takes
    tens of seconds; the timings are printed (pytest -s)."""
    model = random_model(named_config("mobilebert-uncased"), head)
    start = time.perf_counter()
    compiled = mbcompile.compile(model, seq_len=FULL_SEQ, target="aarch64")
    path = compiled.save(tmp_path / f"{head}.mbc")
    built = time.perf_counter()
    remote = mbcompile.load(path, remote=device.address)
    loaded = time.perf_counter()
    try:
        ids, mask, types = random_inputs(model.config, (1, FULL_SEQ), pad=28)
        assert_matches_eager(remote, model, ids, mask, types)
        ran = time.perf_counter()
    finally:
        remote.program.close()
    print(
        f"\n{head} seq {FULL_SEQ}: compile+export {built - start:.0f} s, upload+load "
        f"{loaded - built:.0f} s, first forward (emulated) {ran - loaded:.1f} s; "
        f"library {os.path.getsize(path) / 1e6:.0f} MB"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, precision, bound",
    [("aarch64-dotprod", "int8", 8e-2), ("aarch64", "int8", 8e-2), ("aarch64-armv9", "bf16", 3e-2)],
)
def test_reduced_precision_build_is_within_its_bound_on_emulated_device(
    target, precision, bound, device, tmp_path
):
    """int8 for ARM: sdot kernels with the ARMv8.2 dot product, NEON smull ones without; bf16:
    bfdot (Armv8.6) kernels (tests/targets/test_dense_dot.py reads them). Outputs within the
    bounds of tests/test_precision.py against PyTorch (qemu's CPU has every feature)."""
    model = trained_pad_row(make_model("base", tiny_config()))
    compiled = mbcompile.compile(model, seq_len=SEQ, target=target, precision=precision)
    assert compiled.metadata.report["accuracy"]["skipped"].startswith("not run")
    remote = mbcompile.load(compiled.save(tmp_path / "model.mbc"), remote=device.address)
    try:
        ids, mask, types = random_inputs(model.config, (2, SEQ), pad=3)
        inputs = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                  "token_type_ids": types.numpy()}
        report = remote.accuracy(inputs, reference=model)
    finally:
        remote.program.close()
    hidden = report["outputs"]["last_hidden_state"]
    assert report["precision"] == precision
    assert 1e-4 < hidden["max_rel_error"] <= bound and hidden["min_cosine"] >= 0.998, hidden
