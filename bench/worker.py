"""One benchmark process at one thread count: build every backend, time them interleaved.

Run by ``python -m bench`` with TVM_NUM_THREADS / OMP_NUM_THREADS already set, so that every
runtime starts with the same thread count. Prints one JSON document on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import mbcompile
from mbcompile.capture import random_model
from mbcompile.cpu import cpu_info
from mbcompile.targets.registry import host_cpu_name, host_features, host_target

from . import peers

CACHE = Path(__file__).resolve().parent / ".cache"


def _roof(threads: int) -> dict:
    """torch.mm GFLOP/s on a large square and on MobileBERT's hot shapes, this thread count."""
    shapes = {"1024x1024x1024": (1024, 1024, 1024), "128x512x128": (128, 512, 128),
              "128x128x512": (128, 128, 512)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            torch.mm(a, b)
        reps = max(3, int(2e9 / (2 * m * n * k)))
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            times.append((time.perf_counter() - t) / reps)
        out[name] = 2 * m * n * k / statistics.median(times) / 1e9
    return out


def _simd() -> str:
    """The widest vector extension this CPU has (the machine kind changes between sessions)."""
    flags = host_features()
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")):
        if flag in flags:
            return name
    return "none"


def _source_revision() -> str:
    """The git commit of the tree (plus "-dirty"), so cached artifacts follow code changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mbcompile", "passes",
                                "targets"], cwd=root, text=True, capture_output=True,
                               check=False).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nogit"
    return rev + ("-dirty" if dirty else "")


def _compiled(model, head: str, seq: int, variant: str, log) -> tuple:
    """Compile (or load from bench/.cache) one mbcompile variant; returns (compiled, seconds)."""
    CACHE.mkdir(exist_ok=True)
    key = f"{head}-s{seq}-{variant}-{mbcompile.__version__}-{_source_revision()}.mbc"
    path = CACHE / key
    kwargs = {"seq_len": seq}
    if variant in ("untuned", "no-passes"):  # the passes' effect is measured on equal schedules
        kwargs["tuning_db"] = None
    if variant == "no-passes":
        kwargs["passes"] = ()
    if variant.startswith("fill-mask"):
        kwargs.update(logits_for="masked", max_masked=1)
    for precision in ("bf16", "int8"):
        if variant.endswith(precision):
            kwargs["precision"] = precision
    if path.exists() and os.environ.get("MBCOMPILE_BENCH_RECOMPILE") != "1":
        compiled = mbcompile.load(path)
        return compiled, compiled.metadata.compile_seconds
    log(f"compiling {key} ...")
    compiled = mbcompile.compile(model, **kwargs)
    compiled.save(path)
    return compiled, compiled.metadata.compile_seconds


# what each peer computes in (OpenVINO's runners read theirs back)
_PEER_PRECISION = {"PyTorch eager": "fp32", "torch.compile": "fp32", "ONNX Runtime fp32": "fp32",
                   "ONNX Runtime int8 (reference)": "int8 weights per channel, uint8 activations "
                                                    "per tensor"}


def _fill_mask_runner(compiled, ids):
    """The logits of the one masked position, from the ids holding the [MASK] token."""
    return lambda _ids, mask, types: [compiled(ids, mask, types)[0][0, 0]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head", required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--backends", default="all")
    p.add_argument("--variants", default="default")
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds of pause before each timed call")
    args = p.parse_args()

    def log(msg):
        print(f"[{args.head} seq {args.seq} t{args.threads}] {msg}", flush=True)

    torch.set_num_threads(args.threads)
    model = random_model("mobilebert-uncased", args.head)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, model.config.vocab_size, size=(1, args.seq)).astype(np.int64)
    mask_pos = args.seq // 3
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    types[:, args.seq // 2 :] = 1

    runners, extra = {}, {}
    wanted = None if args.backends == "all" else set(args.backends.split(","))
    info = cpu_info(host_target().tvm_target())
    for variant in args.variants.split(","):
        lacking = {"bf16": not info.bf16_dot, "int8": not info.int8_dot}
        if any(variant.endswith(p) and missing for p, missing in lacking.items()):
            log(f"skipping {variant}: this CPU has no native {variant[-4:]} dot product")
            continue
        compiled, seconds = _compiled(model, args.head, args.seq, variant, log)
        tuned = compiled.metadata.tuned_kernels > 0
        name = "mbcompile" if variant == "default" else f"mbcompile {variant}"
        if tuned:  # kernels from the shipped database (targets/databases/) for this model + target
            n = compiled.metadata.tuned_kernels
            name += f" (tuned: {n} kernel{'s' if n != 1 else ''})"
        extra[name] = {"compile_seconds": seconds, "tuned": tuned,
                       "precision": compiled.metadata.precision,
                       "matmul_flops": compiled.report().get("final", {}).get("matmul_flops")}
        if variant.startswith("fill-mask"):
            fm_ids = ids.copy()
            fm_ids[0, mask_pos] = compiled.signature.mask_token_id
            runners[name] = _fill_mask_runner(compiled, fm_ids)
        else:
            runners[name] = peers.mbcompiled(compiled)
    eager = peers.torch_eager(model)
    builders = {
        "PyTorch eager": lambda: eager,
        "torch.compile": lambda: peers.torch_compile(model),
        "ONNX Runtime fp32": lambda: peers.onnxruntime(model, (ids, mask, types), args.threads),
        "ONNX Runtime int8 (reference)": lambda: peers.onnxruntime(
            model, (ids, mask, types), args.threads, int8=True),
        "OpenVINO fp32": lambda: peers.openvino(model, (ids, mask, types), args.threads, "f32"),
        # its default: bf16 where the CPU has it; the name gets the precision it read back
        "OpenVINO default": lambda: peers.openvino(model, (ids, mask, types), args.threads),
    }
    for name, build in builders.items():
        if wanted is None or name in wanted or name == "PyTorch eager":
            log(f"building {name}")
            runner = build()
            if name == "OpenVINO default":
                name = f"OpenVINO default ({runner.precision})"
            extra[name] = {"precision": getattr(runner, "precision", _PEER_PRECISION.get(name))}
            runners[name] = runner

    reference = eager(ids, mask, types)
    fm_ids = ids.copy()
    diffs = {}
    for name, run in runners.items():
        for _ in range(2):  # warm-up (torch.compile compiles here)
            outs = run(ids, mask, types)
        if "fill-mask" in name:
            fm_ids[0, mask_pos] = 103
            ref_logits = eager(fm_ids, mask, types)[0][0, mask_pos]
            diffs[name] = float(np.abs(outs[0] - ref_logits).max())
        else:
            diffs[name] = float(np.abs(np.asarray(outs[0], np.float64) - reference[0]).max())

    times = {name: [] for name in runners}
    order = list(runners)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)
        for name in order:
            # Thread pools keep spinning after a run (PyTorch's OpenMP, ONNX Runtime's pool): on
            # 2 cores they steal the next backend's core (measured: mbcompile 38.4 ms alone,
            # 46.3 right after PyTorch eager, 40.0 after a 0.3 s pause). Let them go idle.
            time.sleep(args.settle)
            t = time.perf_counter()
            runners[name](ids, mask, types)
            times[name].append((time.perf_counter() - t) * 1e3)
    roof = _roof(args.threads)

    rows = []
    for name, ts in times.items():
        rows.append({
            "backend": name, "head": args.head, "seq": args.seq, "threads": args.threads,
            "median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
            "max_abs_diff_vs_torch": diffs[name], **extra.get(name, {}),
        })
    print(json.dumps({
        "rows": rows, "roof_gflops": roof,
        "machine": {"cpu": host_cpu_name(), "llvm_cpu": host_target().llvm["mcpu"],
                    "simd": _simd(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
