"""Running over TVM RPC: ``mbcompile.load(path, remote=...)``, ``mbcompile run --remote``, the
errors for bad addresses, and the emulated device's RPC server in both of its modes; through a
TVM RPC tracker: ``load_remote(path, tracker=..., key=...)``, ``mbcompile run --tracker --key``,
``mbcompile emulator tracker`` and the tracker's errors (unreachable, not a tracker, no device
with the key, every device busy).

Remote runs go to the emulated aarch64 device on 127.0.0.1 (``slow``: built on first use, skipped
with the reason where qemu-user-static or mmdebstrap is missing). The tracker tests use TVM's own
RPC server on this machine (``python -m tvm.exec.rpc_server``, as a board runs it) and x86
artifacts, so they need no emulator; tuning through a tracker is in
tests/targets/test_remote_tuning.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
    assert_matches_eager,
    default_sigint,
    free_port,
    host_server,
    make_model,
    random_inputs,
    tiny_config,
)

import mbcompile
from mbcompile import artifact
from mbcompile.cli import main
from mbcompile.devices import (
    RemoteProgram,
    connect_tracker,
    emulator,
    load_remote,
    parse_address,
    start_tracker,
    tracker_devices,
)
from mbcompile.errors import EmulatorError, RemoteError
from mbcompile.targets.registry import host_arch

SEQ = 16
HOST_KEY = "host-cpu"  # the key of TVM's RPC server on this machine (tracker tests)


# -- addresses and errors (no device needed) -------------------------------------------------


def test_address_is_host_and_port():
    assert parse_address("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_address("[::1]:9090") == ("::1", 9090)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":9090", "127.0.0.1:rpc", "h:0"])
def test_malformed_remote_address_is_named(address, tiny_qa_artifact):
    with pytest.raises(RemoteError, match="bad remote address") as info:
        mbcompile.load(tiny_qa_artifact, remote=address)
    assert repr(address) in str(info.value)
    assert isinstance(info.value, mbcompile.MbcompileError)


def test_nothing_listening_fails_fast_and_names_the_address(tiny_qa_artifact):
    address = f"127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="cannot reach remote") as info:
        mbcompile.load(tiny_qa_artifact, remote=address)
    assert time.perf_counter() - start < 5
    assert address in str(info.value) and "mbcompile emulator serve" in str(info.value)


def test_peer_that_never_answers_times_out_instead_of_hanging():
    with socket.socket() as silent:  # accepts connections (backlog) but never speaks TVM RPC
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(RemoteError, match="did not complete the TVM RPC handshake"):
            RemoteProgram(b"", address, timeout=2)
        assert time.perf_counter() - start < 10


def test_cli_run_with_unreachable_remote_exits_2_naming_it(tiny_qa_artifact, capsys):
    address = f"127.0.0.1:{free_port()}"
    assert main(["run", str(tiny_qa_artifact), "--remote", address]) == 2
    assert address in capsys.readouterr().err


def test_cli_parses_the_emulator_commands():
    from mbcompile.cli import parser

    ns = parser().parse_args(["emulator", "serve", "--port", "9191", "--mode", "in-process"])
    assert (ns.emulator_command, ns.port, ns.mode) == ("serve", 9191, "in-process")
    assert (ns.tracker, ns.key) == (None, None)
    assert parser().parse_args(["emulator", "build", "--force"]).force
    ns = parser().parse_args(["emulator", "serve", "--tracker", "127.0.0.1:9190", "--key", "emu"])
    assert (ns.tracker, ns.key) == ("127.0.0.1:9190", "emu")
    ns = parser().parse_args(["emulator", "tracker", "--port", "9191"])
    assert (ns.emulator_command, ns.port, ns.host) == ("tracker", 9191, "127.0.0.1")


# -- on the emulated aarch64 device ------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_arm(tmp_path_factory):
    """A tiny question-answering model compiled for aarch64 (batch 2) and saved."""
    model = make_model("question-answering", tiny_config(num_labels=2), seed=4)
    compiled = mbcompile.compile(model, seq_len=SEQ, batch_size=2, target="aarch64")
    return model, compiled.save(tmp_path_factory.mktemp("remote") / "qa.mbc")


@pytest.mark.slow
def test_remote_run_has_the_local_api_and_matches_eager(device, qa_arm):
    model, path = qa_arm
    remote = mbcompile.load(path, remote=device.address)
    try:
        assert isinstance(remote.program, RemoteProgram)
        # 3 sequences of 11 tokens: two calls of the batch-2 program, padded and cut back.
        ids, mask, types = random_inputs(model.config, (3, 11), pad=2)
        out = assert_matches_eager(remote, model, ids, mask, types)
        assert list(out) == ["start_logits", "end_logits"]
        assert out.start_logits.shape == (3, 11)
        numpy_out = remote(ids.numpy())  # numpy in, numpy out; mask and types default
        assert isinstance(numpy_out["end_logits"], np.ndarray)
    finally:
        remote.program.close()


@pytest.mark.slow
def test_device_timer_reports_seconds_per_run(device, qa_arm):
    _, path = qa_arm
    arrays = mbcompile.load(path).program_inputs(np.ones((2, SEQ), np.int64))
    with RemoteProgram(artifact.read(path).lib, device.address) as program:
        seconds = program.time(arrays, number=2, repeat=3)
    assert len(seconds) == 3 and all(0 < s < 60 for s in seconds)


@pytest.mark.slow
def test_closed_session_frees_the_server_for_the_next_client(device, qa_arm):
    _, path = qa_arm
    lib = artifact.read(path).lib
    arrays = mbcompile.load(path).program_inputs(np.ones((2, SEQ), np.int64))
    for _ in range(2):  # the stock server serves one session at a time
        program = RemoteProgram(lib, device.address, timeout=20)
        program.run(arrays)
        program.close()
    with pytest.raises(RemoteError, match="closed"):
        program.run([np.ones((2, SEQ), np.int64)] * 3)


@pytest.mark.slow
def test_x86_library_on_the_arm_device_is_refused_naming_its_target(device, tiny_qa_artifact):
    if host_arch() != "x86_64":
        pytest.skip("needs an x86-64 host artifact")
    with pytest.raises(RemoteError, match="cannot load the library compiled for target 'host'"):
        mbcompile.load(tiny_qa_artifact, remote=device.address)


@pytest.mark.slow
def test_cli_run_remote_prints_outputs_and_device_time(device, qa_arm, capsys):
    _, path = qa_arm
    assert main(["run", str(path), "--remote", device.address, "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "start_logits: shape (2, 16)" in out
    assert "device time: median" in out and device.address in out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stock", "in-process"])
def test_emulated_rpc_server_runs_in_either_mode(mode, qa_arm, device):
    """stock: TVM's rpc.Server, whose child Python needs binfmt_misc (registered as root);
    in-process: the same server loop without the child."""
    built = emulator.build()  # cached: the device fixture built it
    if mode == "stock":
        problem = emulator.ensure_binfmt(built)
        if problem is not None:
            pytest.skip(f"stock TVM RPC server unavailable: {problem}")
    model, path = qa_arm
    with emulator.start_server(free_port(), mode=mode, device=built) as server:
        assert server.mode == mode
        remote = mbcompile.load(path, remote=server.address)
        try:
            ids, mask, types = random_inputs(model.config, (2, SEQ), pad=1)
            assert_matches_eager(remote, model, ids, mask, types)
        finally:
            remote.program.close()


@pytest.mark.slow
def test_server_that_cannot_bind_reports_its_log(device):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(EmulatorError, match=f"127.0.0.1:{port} did not start"):
            emulator.start_server(port, mode="in-process", timeout=120)


# -- through a TVM RPC tracker ---------------------------------------------------------------


@pytest.fixture(scope="module")
def host_device(tracker):
    with host_server(tracker.address, HOST_KEY) as port:
        yield port


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tracker": "127.0.0.1:1"}, "given without a device key"),
        ({"key": "rasp4"}, "given without a tracker"),
        ({"remote": "127.0.0.1:1", "tracker": "127.0.0.1:1", "key": "rasp4"}, "not both"),
        ({"tracker": "localhost", "key": "rasp4"}, "bad tracker address 'localhost'"),
        ({}, "no device named"),
    ],
)
def test_device_options_are_checked_before_connecting(options, message, tiny_qa_artifact):
    start = time.perf_counter()
    with pytest.raises(RemoteError, match=message):
        load_remote(tiny_qa_artifact, **options)
    assert time.perf_counter() - start < 2


def test_unreachable_tracker_fails_fast_and_names_it(tiny_qa_artifact):
    address = f"127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="cannot reach tracker") as info:
        load_remote(tiny_qa_artifact, tracker=address, key=HOST_KEY)
    assert time.perf_counter() - start < 5
    assert address in str(info.value) and "mbcompile emulator tracker" in str(info.value)


def test_peer_that_is_not_a_tracker_times_out_instead_of_hanging():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(RemoteError, match="did not answer as a TVM RPC tracker within 2 s"):
            tracker_devices(address, timeout=2)
        assert time.perf_counter() - start < 10


def test_tracker_on_a_taken_port_is_refused_naming_it(tracker):
    with pytest.raises(RemoteError, match=f"tracker on 127.0.0.1:{tracker.port}: .*in use"):
        start_tracker(tracker.port)


def test_no_device_under_the_key_fails_at_once_naming_the_registered_keys(
    tracker, host_device, tiny_qa_artifact
):
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="no device is registered with tracker") as info:
        load_remote(tiny_qa_artifact, tracker=tracker.address, key="rasp4")
    assert time.perf_counter() - start < 5
    assert "'rasp4'" in str(info.value) and repr([HOST_KEY]) in str(info.value)


def test_run_through_the_tracker_has_the_local_api_and_matches_eager(
    tracker, host_device, tiny_qa, tiny_qa_artifact
):
    model, _ = tiny_qa
    compiled = mbcompile.load(tiny_qa_artifact, tracker=tracker.address, key=HOST_KEY)
    program = compiled.program
    try:
        assert isinstance(program, RemoteProgram)
        assert program.address == f"127.0.0.1:{host_device}"  # the device the tracker handed out
        assert (program.tracker, program.key) == (tracker.address, HOST_KEY)
        ids, mask, types = random_inputs(model.config, (2, 12), pad=3)
        out = assert_matches_eager(compiled, model, ids, mask, types)
        assert list(out) == ["start_logits", "end_logits"]
    finally:
        program.close()


def test_busy_devices_time_out_and_the_device_is_handed_out_again_once_free(tracker, host_device):
    held = connect_tracker(tracker.address, HOST_KEY, timeout=20)
    start = time.perf_counter()
    with pytest.raises(RemoteError, match=r"became free within 2 s \(1 registered"):
        connect_tracker(tracker.address, HOST_KEY, timeout=2)
    assert time.perf_counter() - start < 10
    assert tracker.devices()[HOST_KEY]["registered"] == 1
    del held  # ends the session; the server registers as free again
    again = connect_tracker(tracker.address, HOST_KEY, timeout=30)
    assert again.cpu().exist


def test_cli_run_through_the_tracker_prints_outputs_and_device_time(
    tracker, host_device, tiny_qa_artifact, capsys
):
    argv = ["run", str(tiny_qa_artifact), "--tracker", tracker.address, "--key", HOST_KEY,
            "--repeats", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "start_logits: shape (1, 16)" in out
    assert "device time: median" in out and f"from tracker {tracker.address}" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tracker", "127.0.0.1:1"], "without a device key"),
        (["--key", "rasp4"], "without a tracker"),
    ],
)
def test_cli_run_with_half_a_tracker_exits_2_naming_what_is_missing(
    extra, message, tiny_qa_artifact, capsys
):
    assert main(["run", str(tiny_qa_artifact), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_emulator_serve_with_a_tracker_needs_a_key(capsys):
    assert main(["emulator", "serve", "--tracker", "127.0.0.1:9190"]) == 2
    assert "given without a device key" in capsys.readouterr().err


def test_cli_emulator_tracker_serves_until_interrupted():
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbcompile.cli", "emulator", "tracker", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=default_sigint,
    )
    try:
        first = proc.stdout.readline()  # printed once it listens
        assert f"TVM RPC tracker on 127.0.0.1:{port}" in first, first
        assert tracker_devices(f"127.0.0.1:{port}") == {}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        with pytest.raises(RemoteError, match="cannot reach tracker"):
            tracker_devices(f"127.0.0.1:{port}", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_emulated_server_registers_with_the_tracker_and_runs_through_it(
    device, tracker, qa_arm
):
    """In process (no child Python, so no binfmt_misc needed); the stock server registers the
    same way in tests/targets/test_remote_tuning.py."""
    model, path = qa_arm
    key = "emulated-in-process"
    with emulator.start_server(
        free_port(), mode="in-process", tracker=tracker.address, key=key
    ) as server:
        assert (server.tracker, server.key) == (tracker.address, key)
        assert tracker.devices()[key]["registered"] == 1
        compiled = load_remote(path, tracker=tracker.address, key=key)
        try:
            assert compiled.program.address == server.address
            ids, mask, types = random_inputs(model.config, (2, SEQ), pad=4)
            assert_matches_eager(compiled, model, ids, mask, types)
        finally:
            compiled.program.close()
    deadline = time.monotonic() + 10  # stopping the server unregisters it
    while key in tracker.devices() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert key not in tracker.devices()


@pytest.mark.slow
def test_emulated_server_with_an_unreachable_tracker_says_so(device):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(EmulatorError, match=f"cannot reach the tracker at {address}"):
        emulator.start_server(free_port(), mode="in-process", tracker=address, key="emu")


def test_a_device_that_stops_answering_raises_within_the_call_timeout(tiny_qa_artifact):
    """Every call on a device is bounded: a server that stops (SIGSTOP) mid-session makes the
    next call raise RemoteError naming the device after ``call_timeout``, not hang."""
    import os
    import signal

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1)],
        env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "TVM's rpc_server did not start in 60 s"
                time.sleep(0.2)
        compiled = mbcompile.load(tiny_qa_artifact, remote=f"127.0.0.1:{port}", call_timeout=5)
        ids = np.arange(1, 9, dtype=np.int64)[None]
        compiled(ids)  # answers while it runs
        os.killpg(proc.pid, signal.SIGSTOP)
        start = time.perf_counter()
        with pytest.raises(RemoteError, match=rf"127.0.0.1:{port}.*did not answer within 5 s"):
            compiled(ids)
        assert time.perf_counter() - start < 15
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
