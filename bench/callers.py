"""python -m bench.callers: throughput of one loaded model called from 1, 2 and 4 threads at once.

A service calls one model from several request threads. mbcompile gives each calling thread
its own Relax VM (and TVM thread pool) over the one loaded library; ONNX Runtime's
InferenceSession is thread-safe and shared the same way. Each (backend, kernel threads, caller
threads) configuration runs in its own process (thread counts are fixed before a runtime
starts), for ``--seconds`` after a warm-up, configurations interleaved over ``--rounds``
rounds with ``--settle`` seconds between them (idle thread pools spin). Reported: texts per
second (median over rounds, min–max), and each caller's median latency. fp32, batch 1.
Writes bench/results/callers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _model(layers: int):
    from mbcompile.capture import named_config, random_model

    return random_model(named_config("mobilebert-uncased", num_hidden_layers=layers), "base")


def _runner(backend: str, layers: int, seq: int, kernel_threads: int):
    import numpy as np

    model = _model(layers)
    example = [np.random.default_rng(0).integers(0, 30522, (1, seq), dtype=np.int64)]
    example += [np.ones_like(example[0]), np.zeros_like(example[0])]
    if backend == "mbcompile":
        import mbcompile

        # compiled once per (layers, seq) and kept in bench/.cache: each configuration runs in a
        # process of its own
        cache = Path(__file__).resolve().parent / ".cache" / f"callers-L{layers}-S{seq}.mbc"
        if not cache.is_file():
            mbcompile.compile(model, seq_len=seq).save(cache)
        compiled = mbcompile.load(cache)
        return lambda: compiled(*example)
    from bench import peers

    run = peers.onnxruntime(model, example, kernel_threads)
    return lambda: run(*example)


def _measure(backend: str, layers: int, seq: int, kernel_threads: int, callers: int,
             seconds: float) -> dict:
    """In this process: ``callers`` threads call the model for ``seconds``; calls and latencies."""
    call = _runner(backend, layers, seq, kernel_threads)
    for _ in range(3):
        call()
    stop = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers)

    def work(k: int) -> None:
        start.wait()
        while time.perf_counter() < stop:
            t = time.perf_counter()
            call()
            latencies[k].append(time.perf_counter() - t)

    began = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    calls = sum(len(x) for x in latencies)
    return {
        "texts_per_s": calls / elapsed,
        "median_latency_ms": 1e3 * statistics.median([v for x in latencies for v in x]),
        "calls": calls,
    }


def _run_config(backend: str, kernel_threads: int, callers: int, args) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(kernel_threads),
               OMP_NUM_THREADS=str(kernel_threads))
    cmd = [sys.executable, "-m", "bench.callers", "--one", backend, str(kernel_threads),
           str(callers), "--layers", str(args.layers), "--seq", str(args.seq),
           "--seconds", str(args.seconds)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.callers", description=__doc__)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--callers", default="1,2,4")
    p.add_argument("--one", nargs=3, metavar=("BACKEND", "KERNEL_THREADS", "CALLERS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        backend, kernel_threads, callers = args.one[0], int(args.one[1]), int(args.one[2])
        out = _measure(backend, args.layers, args.seq, kernel_threads, callers, args.seconds)
        print(json.dumps(out))
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    configs = [
        (backend, kernel_threads, int(callers))
        for callers in args.callers.split(",")
        for kernel_threads in sorted({cores, 1})
        for backend in ("mbcompile", "ort")
    ]
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in range(args.rounds):
        for config in configs:
            time.sleep(args.settle)
            results[config].append(_run_config(*config, args))
            last = results[config][-1]
            print(f"round {r + 1}: {config}: {last['texts_per_s']:.1f} texts/s", flush=True)
    _write(results, args, cores, started)


def _write(results: dict, args, cores: int, started: str) -> None:
    from mbcompile.targets.registry import host_cpu_name, host_target

    names = {"mbcompile": "mbcompile", "ort": "ONNX Runtime fp32"}
    rows = []
    for (backend, kernel_threads, callers), runs in results.items():
        rate = [x["texts_per_s"] for x in runs]
        rows.append({
            "backend": names[backend], "kernel_threads": kernel_threads, "callers": callers,
            "texts_per_s": statistics.median(rate), "min": min(rate), "max": max(rate),
            "median_latency_ms": statistics.median(x["median_latency_ms"] for x in runs),
        })
    header = (
        f"Measured {started} on {host_cpu_name()} ({host_target().llvm['mcpu']}), {cores} cores, "
        f"fp32, batch 1, seq {args.seq}, {args.layers} layers (mobilebert-uncased architecture, "
        f"random weights); each configuration in its own process, {args.seconds:g} s per run, "
        f"median of {args.rounds} interleaved rounds, {args.settle:g} s pause between runs."
    )
    lines = [header, "", "| callers | kernel threads per call | backend | texts/s (median) | "
             "min–max | median latency ms |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["callers"], r["kernel_threads"], r["backend"])):
        lines.append(f"| {r['callers']} | {r['kernel_threads']} | {r['backend']} | "
                     f"{r['texts_per_s']:.1f} | {r['min']:.1f}–{r['max']:.1f} | "
                     f"{r['median_latency_ms']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "callers.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "callers.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
