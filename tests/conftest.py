"""Fixtures shared by the tests: a tiny compiled model and its saved artifact."""

from __future__ import annotations

import pytest
from helpers import free_port, make_model, tiny_config


@pytest.fixture(scope="session")
def tiny_qa():
    """A tiny question-answering model and its compiled form (seq 16, batch 1)."""
    import mbcompile

    model = make_model("question-answering", tiny_config())
    return model, mbcompile.compile(model, seq_len=16, passes=())


@pytest.fixture(scope="session")
def tiny_tuned(tmp_path_factory):
    """A one-layer tiny model's two costliest kernels (seq 16) tuned for two trials each: the
    model, the database folder, tune's summary and its progress lines. Shared by the tuning
    tests; copy the folder to change it."""
    import mbcompile

    model = make_model("base", tiny_config(num_hidden_layers=1))
    work_dir = tmp_path_factory.mktemp("tuned") / "db"
    lines: list[str] = []
    summary = mbcompile.tune(
        model, work_dir=work_dir, seq_len=16, trials=2, max_tasks=2, log=lines.append
    )
    return model, work_dir, summary, lines


@pytest.fixture(scope="session")
def tiny_qa_artifact(tiny_qa, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifacts") / "qa.mbc"
    tiny_qa[1].save(path)
    return path


@pytest.fixture(scope="session")
def device():
    """The emulated aarch64 device's TVM RPC server on 127.0.0.1 (built first if not cached);
    skipped, with the reason, where qemu-user-static or mmdebstrap is missing."""
    from mbcompile.devices import emulator
    from mbcompile.targets.registry import host_arch

    missing = emulator.missing_tools()
    if missing:
        pytest.skip(
            f"no emulated aarch64 device: {sorted(missing)} missing "
            f"(apt-get install {' '.join(sorted(set(missing.values())))})"
        )
    if host_arch() not in ("x86_64", "aarch64"):
        pytest.skip(f"qemu user mode is not set up for a {host_arch()} host")
    with emulator.start_server(free_port()) as server:
        yield server


@pytest.fixture(scope="session")
def tracker():
    """A TVM RPC tracker on 127.0.0.1 (TVM's tracker needs tornado)."""
    from mbcompile.devices import start_tracker

    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
    with start_tracker(free_port()) as running:
        yield running
