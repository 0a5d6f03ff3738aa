"""Tuning through a TVM RPC tracker (``mbcompile tune --tracker HOST:PORT --key KEY``): the
builder cross-links each candidate for the target, MetaSchedule's RPC runner measures it on a
device the tracker hands out, and the database applies like a local one.

The emulated tests (``slow``) register the emulated aarch64 device with a tracker on 127.0.0.1 and
tune a tiny model's costliest kernel for two trials (timings under qemu mean nothing: the flow and
the database are what is checked), then compile with that database and run through the tracker.
They skip, with the reason, where the emulator cannot run. The errors (unreachable tracker, no
device with the key, a device that cannot measure, a tracker without a key) need no emulator.
"""

from __future__ import annotations

import json
import time

import pytest
import tvm
from helpers import (
    assert_matches_eager,
    free_port,
    host_server,
    make_model,
    random_inputs,
    tiny_config,
)

import mbcompile
from mbcompile.cli import main
from mbcompile.devices import RemoteProgram, emulator, load_remote
from mbcompile.errors import RemoteError
from mbcompile.targets.registry import resolve_target
from mbcompile.targets.rpc_tuning import ARTIFACT, export_linked, rpc_builder
from mbcompile.targets.tuning import MANIFEST, RECORDS

SEQ = 16
KEY = "emulated-aarch64"


@pytest.fixture(scope="module")
def model():
    return make_model("base", tiny_config(num_hidden_layers=1), seed=7)


# -- on the emulated aarch64 device, registered with the tracker ------------------------------


@pytest.fixture(scope="module")
def emulated(device, tracker):
    """The emulated device's RPC server registered with the tracker under KEY (the ``device``
    fixture skips where the emulator cannot run); it loads the device TVM's
    libtvm_runtime_extra.so, which MetaSchedule's runner needs."""
    with emulator.start_server(free_port(), tracker=tracker.address, key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def tuned(model, tracker, emulated, tmp_path_factory):
    """The costliest kernel tuned for two trials on the emulated device, through the tracker."""
    work_dir = tmp_path_factory.mktemp("remote-tuning") / "db"
    lines: list[str] = []
    summary = mbcompile.tune(
        model, work_dir=work_dir, target="aarch64", seq_len=SEQ, trials=2, max_tasks=1,
        tracker=tracker.address, key=KEY, log=lines.append,
    )
    return work_dir, summary, lines


@pytest.mark.slow
def test_tuning_through_the_tracker_measures_on_the_emulated_device(tuned, emulated, tracker):
    work_dir, summary, lines = tuned
    assert summary["tuned"] == 1 and summary["records"] >= 1, summary
    assert (summary["tracker"], summary["key"]) == (tracker.address, KEY)
    assert any(f"measuring on 1 device(s) with key {KEY!r}" in line for line in lines)
    assert any("ETA" in line and " us" in line for line in lines), lines  # a valid measurement
    # The candidates were linked for aarch64 here and loaded by the device's server.
    assert "load_module" in emulated.log() and ARTIFACT in emulated.log()
    records = [json.loads(line) for line in (work_dir / RECORDS).read_text().splitlines()]
    run_secs = [r[1][1] for r in records]
    assert all(secs and all(0 < s < 10 for s in secs) for secs in run_secs), run_secs
    assert {r[1][2]["mtriple"] for r in records} == {"aarch64-linux-gnu"}


@pytest.mark.slow
def test_the_database_names_the_aarch64_target(tuned):
    work_dir, _, _ = tuned
    manifest = json.loads((work_dir / MANIFEST).read_text())
    want = resolve_target("aarch64").llvm
    assert manifest["target"]["mtriple"] == want["mtriple"] == "aarch64-linux-gnu"
    assert manifest["target"]["mcpu"] == want["mcpu"]
    assert manifest["target"]["mattr"] == sorted(want["mattr"])
    assert manifest["target"]["tvm"] == tvm.__version__


@pytest.fixture(scope="module")
def tuned_artifact(model, tuned, tmp_path_factory):
    work_dir, _, _ = tuned
    compiled = mbcompile.compile(model, seq_len=SEQ, target="aarch64", tuning_db=work_dir)
    assert compiled.metadata.tuning_db == str(work_dir)
    return compiled.save(tmp_path_factory.mktemp("remote-tuned") / "base-arm.mbc")


@pytest.mark.slow
def test_the_tuned_build_runs_through_the_tracker_and_matches_eager(
    model, tuned_artifact, tracker, emulated
):
    compiled = load_remote(tuned_artifact, tracker=tracker.address, key=KEY)
    program = compiled.program
    try:
        assert isinstance(program, RemoteProgram) and program.address == emulated.address
        ids, mask, types = random_inputs(model.config, (2, 13), pad=2)
        assert_matches_eager(compiled, model, ids, mask, types)
    finally:
        program.close()


@pytest.mark.slow
def test_cli_tune_with_tracker_and_key_writes_a_database(
    model, tracker, emulated, tmp_path, capsys
):
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    work_dir = tmp_path / "db"
    argv = ["tune", str(checkpoint), "--target", "aarch64", "--seq-len", str(SEQ),
            "--trials", "1", "--max-tasks", "1", "--tracker", tracker.address, "--key", KEY,
            "-o", str(work_dir)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.splitlines()[0])
    assert summary["tuned"] == 1 and summary["records"] >= 1, summary
    assert summary["tracker"] == tracker.address
    assert f"from tracker {tracker.address}" in err
    manifest = json.loads((work_dir / MANIFEST).read_text())
    assert manifest["target"]["mtriple"] == "aarch64-linux-gnu"


# -- the builder -------------------------------------------------------------------------------


def test_candidates_are_linked_into_a_shared_library_for_the_target():
    """MetaSchedule's default export ships a tar for the device to link; ours links here."""
    spec = resolve_target("aarch64")
    a = tvm.te.placeholder((8,), name="a")
    b = tvm.te.compute((8,), lambda i: a[i] + 1.0, name="b")
    built = tvm.compile(tvm.te.create_prim_func([a, b]), target=spec.tvm_target())
    path = export_linked(spec.to_dict(), built)
    with open(path, "rb") as f:
        head = f.read(20)
    assert path.endswith(ARTIFACT) and head[:4] == b"\x7fELF"
    assert head[16:18] == b"\x03\x00"  # ET_DYN: a shared library, not a tar or an object
    assert head[18:20] == b"\xb7\x00"  # EM_AARCH64


def test_builder_for_a_target_without_its_compiler_fails_before_tuning(monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("ANDROID_NDK_ROOT", raising=False)
    with pytest.raises(mbcompile.ToolchainError, match="ANDROID_NDK_HOME"):
        rpc_builder(resolve_target("android-arm64"))


# -- errors, found before anything is captured ------------------------------------------------


def test_unreachable_tracker_fails_before_capturing(model, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="cannot reach tracker") as info:
        mbcompile.tune(model, work_dir=tmp_path / "db", target="aarch64", seq_len=SEQ,
                       tracker=address, key=KEY)
    assert time.perf_counter() - start < 5
    assert address in str(info.value)
    assert not (tmp_path / "db").exists()


def test_no_device_under_the_key_fails_at_once(model, tracker, tmp_path):
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="no device is registered with tracker .* key 'rasp4'"):
        mbcompile.tune(model, work_dir=tmp_path / "db", target="aarch64", seq_len=SEQ,
                       tracker=tracker.address, key="rasp4")
    assert time.perf_counter() - start < 5


def test_device_without_random_fill_is_named_with_the_fix(model, tracker, tmp_path):
    with (
        host_server(tracker.address, "bare-board"),
        pytest.raises(RemoteError, match="cannot measure kernels") as info,
    ):
        mbcompile.tune(model, work_dir=tmp_path / "db", seq_len=SEQ,
                       tracker=tracker.address, key="bare-board")
    message = str(info.value)
    assert "random_fill_for_measure" in message and "libtvm_runtime_extra.so" in message
    assert "--load-library" in message


def test_tracker_without_key_is_refused(model, tmp_path):
    with pytest.raises(RemoteError, match="given without a device key"):
        mbcompile.tune(model, work_dir=tmp_path / "db", tracker="127.0.0.1:9190")
    with pytest.raises(ValueError, match="not both"):
        mbcompile.tune(model, work_dir=tmp_path / "db", tracker="127.0.0.1:9190", key=KEY,
                       runner=object())


def test_cli_tune_tracker_without_key_exits_2_naming_it(tmp_path, capsys):
    argv = ["tune", "--config", "mobilebert-uncased", "--tracker", "127.0.0.1:9190",
            "-o", str(tmp_path / "db")]
    assert main(argv) == 2
    assert "given without a device key: add key='KEY' (--key)" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
