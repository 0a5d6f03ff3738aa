"""One "lengths" benchmark process: latency against input length, at one thread count.

For each length, interleaved in shuffled rounds with a pause before each call: mbcompile's
default artifact (every length up to 512 in one artifact), an mbcompile build for exactly that
length, and ONNX Runtime fp32 exported with dynamic batch and length axes (one session for every
length). ``--head masked-lm`` measures the fill-mask build (``logits_for="masked"``, one [MASK])
against the exact fill-mask build and ONNX Runtime's full MaskedLM. Also batch 8 against batch 1
at length 32, per text. Outputs are checked against PyTorch eager at every length.

Run by ``python -m bench`` (``--lengths``) with the thread count already set in the environment;
prints one JSON document on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import numpy as np
import torch

import mbcompile
from mbcompile.capture import random_model
from mbcompile.targets.registry import host_cpu_name, host_target

from . import peers
from .worker import CACHE, _simd, _source_revision

VARIABLE = "mbcompile (one artifact, lengths ≤ 512)"
EXACT = "mbcompile (built for exactly this length)"
ORT = "ONNX Runtime fp32 (dynamic axes)"


def _compiled(model, head: str, seq_len: int | None, log):
    """The artifact for one length (``seq_len``) or for every length (None), cached."""
    CACHE.mkdir(exist_ok=True)
    shape = f"s{seq_len}" if seq_len else "lengths"
    key = f"{head}-{shape}-{mbcompile.__version__}-{_source_revision()}.mbc"
    path = CACHE / key
    kwargs = {"seq_len": seq_len} if seq_len else {}
    if head == "masked-lm":
        kwargs.update(logits_for="masked", max_masked=1)
    if path.exists() and os.environ.get("MBCOMPILE_BENCH_RECOMPILE") != "1":
        return mbcompile.load(path)
    log(f"compiling {key} ...")
    compiled = mbcompile.compile(model, **kwargs)
    compiled.save(path)
    return compiled


def _inputs(length: int, batch: int, vocab: int, mask_id: int | None, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, length)).astype(np.int64)
    ids[:, 0] = 101
    if mask_id is not None:
        ids[:, length // 2] = mask_id
    types = np.zeros_like(ids)
    types[:, length // 2 :] = 1  # two segments
    return ids, np.ones_like(ids), types


def _first_output(head: str, outs, ids, mask_id):
    """What is compared: the encoder output, or the logits at the [MASK] position."""
    out = np.asarray(outs[0])
    if head == "masked-lm":
        if out.shape[1] != ids.shape[1]:  # fill-mask: logits at the masked positions only
            return out[:, 0]
        return out[:, ids.shape[1] // 2]
    return out


def _interleaved(runners: dict, inputs: tuple, rounds: int, settle: float) -> dict:
    """ms per call of each runner: ``rounds`` shuffled rounds, ``settle`` s before each call."""
    times = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for name in order:
            time.sleep(settle)
            t = time.perf_counter()
            runners[name](*inputs)
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head", default="base", choices=("base", "masked-lm"))
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--lengths", default="8,16,32,64,128,256,384,512")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--settle", type=float, default=0.3)
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    def log(msg):
        print(f"[lengths {args.head} t{args.threads}] {msg}", flush=True)

    torch.set_num_threads(args.threads)
    model = random_model("mobilebert-uncased", args.head)
    vocab = model.config.vocab_size
    variable = _compiled(model, args.head, None, log)
    mask_id = variable.signature.mask_token_id
    example = _inputs(16, 1, vocab, mask_id, 0)
    ort = peers.onnxruntime(model, example, args.threads, dynamic=True)
    eager = peers.torch_eager(model)
    mb_variable = peers.mbcompiled(variable)

    rows = []
    sizes = {"variable": len(variable.library_bytes), "exact": {}}
    for length in lengths:
        exact = _compiled(model, args.head, length, log)
        runners = {VARIABLE: mb_variable, EXACT: peers.mbcompiled(exact), ORT: ort}
        ids, mask, types = _inputs(length, 1, vocab, mask_id, length)
        reference = _first_output(args.head, eager(ids, mask, types), ids, mask_id)
        diffs = {}
        for name, run in runners.items():
            out = run(ids, mask, types)  # warm-up
            got = _first_output(args.head, out, ids, mask_id)
            diffs[name] = float(np.abs(np.asarray(got, np.float64) - reference).max())
        times = _interleaved(runners, (ids, mask, types), args.rounds, args.settle)
        for name, ts in times.items():
            rows.append({"backend": name, "length": length, "batch": 1, "threads": args.threads,
                         "head": args.head, "median_ms": statistics.median(ts), "min_ms": min(ts),
                         "max_ms": max(ts), "max_abs_diff_vs_torch": diffs[name]})
        log(f"length {length}: " + ", ".join(
            f"{n.split(' (')[0] if n != EXACT else 'exact'} {statistics.median(t):.1f}"
            for n, t in times.items()))
        sizes["exact"][length] = len(exact.library_bytes)
        exact.close()

    # Batch 8 against batch 1 at length 32, per text (the same artifact; ORT beside it).
    batch_rows = []
    for batch in (1, 8):
        ids, mask, types = _inputs(32, batch, vocab, mask_id, 32)
        runners = {VARIABLE: mb_variable, ORT: ort}
        for run in runners.values():
            run(ids, mask, types)
        times = _interleaved(runners, (ids, mask, types), args.rounds, args.settle)
        for name, ts in times.items():
            batch_rows.append({"backend": name, "length": 32, "batch": batch,
                               "threads": args.threads, "head": args.head,
                               "median_ms": statistics.median(ts),
                               "per_text_ms": statistics.median(ts) / batch})
    print(json.dumps({
        "rows": rows, "batch_rows": batch_rows,
        "library_bytes": sizes,
        "compile_seconds": variable.metadata.compile_seconds,
        "machine": {"cpu": host_cpu_name(), "llvm_cpu": host_target().llvm["mcpu"],
                    "simd": _simd(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
