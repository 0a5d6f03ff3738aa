"""Test helpers: tiny seeded MobileBERT models, valid random inputs, comparison with eager.

(A module of its own, not conftest.py: every tests/ folder may have a conftest, and pytest
imports them all under the one name ``conftest``.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch

TOL = 1e-4  # max abs error against PyTorch eager, fp32

# MBCOMPILE_SOAK=1: the long soaks whole (every full-size head, repeated interrupts); without
# it (CI, the README's command) a smaller part of each, to keep the suite near 25 minutes.
SOAK = os.environ.get("MBCOMPILE_SOAK", "") == "1"


def soak(every: list, default: list) -> list:
    """``every`` under MBCOMPILE_SOAK=1, else ``default`` (a part of it)."""
    return every if SOAK else default

# A small architecture of MobileBERT's shape family: fast to capture and build.
TINY = {
    "vocab_size": 211,
    "hidden_size": 64,
    "embedding_size": 32,
    "intra_bottleneck_size": 32,
    "true_hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
}


def tiny_config(**overrides):
    from transformers import MobileBertConfig

    return MobileBertConfig(**{**TINY, **overrides})


def make_model(head: str, config, seed: int = 0):
    from mbcompile.capture import random_model

    return random_model(config, head, seed=seed)


def trained_pad_row(model, seed: int = 3):
    """Give the padding id's word-embedding row values, as trained checkpoints have (BERT-family
    TF checkpoints learn a [PAD] row; PyTorch's random init zeroes it)."""
    pad = model.config.pad_token_id or 0
    table = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table[pad] = torch.randn(table.shape[1], generator=gen) * table.std() * 3
    assert float(table[pad].detach().abs().sum()) > 0
    return model


def random_inputs(config, shape, *, pad: int = 0, segments: bool = True, seed: int = 1):
    """Token ids in range, a mask with ``pad`` padded positions at the end, two segments."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.long)
    if pad:
        mask[..., shape[-1] - pad :] = 0
    types = torch.zeros(shape, dtype=torch.long)
    if segments:
        types[..., shape[-1] // 2 :] = 1
    return ids, mask, types


def max_abs_errors(out, ref) -> dict[str, float]:
    """Per-field max abs error between a compiled output and HF's ModelOutput (same names)."""
    assert list(out.keys()) == [k for k in ref.keys()], (list(out.keys()), list(ref.keys()))  # noqa: SIM118
    errors = {}
    for name in ref.keys():  # noqa: SIM118 - ModelOutput
        a, b = out[name], ref[name]
        if isinstance(b, tuple):
            assert isinstance(a, tuple) and len(a) == len(b), (name, len(a), len(b))
        pairs = zip(a, b) if isinstance(b, tuple) else [(a, b)]
        errs = [0.0]
        for x, y in pairs:
            x = x.numpy() if isinstance(x, torch.Tensor) else x
            y = y.detach().numpy()
            assert x.shape == y.shape, (name, x.shape, y.shape)
            errs.append(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
        errors[name] = max(errs)
    return errors


def assert_matches_eager(compiled, model, ids, mask=None, types=None, tol: float = TOL):
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if types is not None:
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        ref = model(**kwargs)
    out = compiled(**kwargs)
    errors = max_abs_errors(out, ref)
    worst = max(errors.values())
    assert worst <= tol, f"max abs error {worst:.3e} > {tol}: {errors}"
    return out


def attention_reference(q, kt, v, bias, heads) -> np.ndarray:
    """Guarded softmax attention in float64 (``FuseAttention``'s kernels): rows with every key
    at -inf give zeros."""
    bh, seq_q, seq_k = q.shape[0], q.shape[1], kt.shape[2]
    full = np.broadcast_to(bias, (bh // heads, heads, seq_q, seq_k)).reshape(bh, seq_q, seq_k)
    scores = q.astype(np.float64) @ kt + full
    top = scores.max(-1, keepdims=True)
    masked = np.isneginf(top)
    probs = np.exp(scores - np.where(masked, 0, top))
    probs = np.where(masked, 0, probs / np.where(masked, 1, probs.sum(-1, keepdims=True)))
    return probs @ v


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with Ctrl-C: SIGINT as an interactive shell
    gives it (default disposition, not blocked). A command started in the background by a shell
    without job control (``bash script &``, as CI runners may be) inherits SIGINT ignored, and
    so would every child: Ctrl-C would then stop nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def free_port() -> int:
    """A TCP port nothing listens on, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def host_server(tracker_address: str, key: str):
    """TVM's RPC server on this machine (``python -m tvm.exec.rpc_server``), registered with the
    tracker under ``key``; TVM's runtime library only, as on a board started without
    ``--load-library``. Yields its port once the tracker lists it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1), "--tracker", tracker_address, "--key", key],
        env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill below reaches its worker
    )
    try:
        deadline = time.monotonic() + 90
        from mbcompile.devices import tracker_devices

        while key not in tracker_devices(tracker_address):
            assert proc.poll() is None, f"TVM's rpc_server exited with {proc.returncode}"
            assert time.monotonic() < deadline, "TVM's rpc_server did not register in 90 s"
            time.sleep(0.3)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- the command line ----------------------------------------------------------------------

ARGPARSE_ERROR = re.compile(r"^mbcompile( [\w-]+)*: error: ")


def assert_one_error_line(err: str, fragment: str) -> str:
    """stderr is one ``mbcompile: error:`` line, or argparse's usage block and its error line;
    that line contains ``fragment``. Returns the line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    if lines[0].startswith("usage: mbcompile"):
        line = lines[-1]
        assert ARGPARSE_ERROR.match(line), lines
    else:
        assert len(lines) == 1, f"{len(lines)} lines on stderr, expected one:\n{err}"
        line = lines[0]
        assert line.startswith("mbcompile: error: "), line
    assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``mbcompile.cli.main(argv)`` in this process."""
    from mbcompile.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.err
