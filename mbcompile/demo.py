"""The main job on an embedded default: compile, check against PyTorch, time both."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class DemoResult:
    max_abs_error: dict[str, float]  # at the longest length checked
    compiled_ms: list[float]  # at the longest length checked
    torch_ms: list[float]
    compile_seconds: dict[str, float]
    # Every length checked and timed: (max abs error, compiled ms median, PyTorch ms median).
    by_length: dict[int, tuple[float, float, float]] | None = None


def _max_abs(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_abs(x, y) for x, y in zip(a, b))
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def run_demo(
    checkpoint: str | None = None,
    config: str = "mobilebert-uncased",
    head: str = "base",
    seq_len: int | None = None,
    target: str = "host",
    repeats: int = 5,
    lengths: tuple[int, ...] = (12, 128),
    tolerance: float = 1e-4,
    settle: float = 0.3,
    log=print,
) -> DemoResult:
    import torch

    import mbcompile
    from mbcompile.capture import load_checkpoint, random_model

    if checkpoint:
        model = load_checkpoint(checkpoint, head=None if head == "base" else head)
        log(f"model: {type(model).__name__} from {checkpoint}")
    else:
        model = random_model(config, head)
        log(f"model: {type(model).__name__}, {config} architecture, random weights (seed 0)")
    from mbcompile.targets.registry import host_cpu_name, host_target

    threads = torch.get_num_threads()
    log(f"machine: {host_cpu_name()} ({host_target().llvm['mcpu']}), {os.cpu_count()} cores; "
        f"PyTorch threads {threads}")
    start = time.perf_counter()
    what = f"length {seq_len}" if seq_len else "every length up to the model's maximum"
    log(f"compiling for {what} ...")
    compiled = mbcompile.compile(model, seq_len=seq_len, target=target)
    log(f"compiled for {compiled.target} in {time.perf_counter() - start:.1f} s: {compiled}; "
        f"compiled lengths {list(compiled.signature.lengths)}")
    tuned, database = compiled.metadata.tuned_kernels, compiled.metadata.tuning_db
    if tuned:
        log(f"kernel schedules: {tuned} from the tuning database {database}")
    elif database:
        log(f"kernel schedules: untuned (the tuning database {database} has none of these kernels)")
    else:
        log("kernel schedules: untuned (no shipped tuning database is for this target)")

    lengths = tuple(n for n in lengths if n <= compiled.signature.seq_len) or (
        compiled.signature.seq_len,
    )
    if seq_len is not None:
        lengths = (seq_len,)
    by_length = {}
    for length in lengths:
        errors, compiled_ms, torch_ms = _check_and_time(
            compiled, model, length, repeats, tolerance, settle, log
        )
        by_length[length] = (
            max(errors.values()), statistics.median(compiled_ms), statistics.median(torch_ms)
        )
    return DemoResult(
        errors, compiled_ms, torch_ms, compiled.metadata.compile_seconds, by_length
    )


def _check_and_time(compiled, model, length, repeats, tolerance, settle, log):
    import torch

    from mbcompile.capture import example_inputs

    shape = compiled.signature.input_shape_for(length)
    ids, mask, types = example_inputs(model.config, shape, seed=1)
    mask[..., length - length // 4 :] = 0  # padding at the end
    types[..., length // 2 :] = 1  # two segments
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_dict=True)
    out = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types, return_dict=True)
    errors = {name: _max_abs(out[name], ref[name]) for name in out.keys()}  # noqa: SIM118 - ModelOutput iterates its values
    log(f"{length} tokens (runs the {compiled.signature.fitting_length(length)}-token program):")
    for name, err in errors.items():
        log(f"  {name}: max abs error vs PyTorch {err:.2e}")
    worst = max(errors.values())
    if not worst <= tolerance:
        raise AssertionError(f"compiled outputs differ from PyTorch by {worst:.3e} > {tolerance}")

    compiled_ms, torch_ms = [], []
    for _ in range(repeats):  # interleaved
        # A thread pool keeps spinning for a while after its run and, with as many threads as
        # cores, takes a core from the next run: pause ``settle`` s first (as bench/ does).
        time.sleep(settle)
        t = time.perf_counter()
        compiled(input_ids=ids, attention_mask=mask, token_type_ids=types)
        compiled_ms.append((time.perf_counter() - t) * 1e3)
        time.sleep(settle)
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        torch_ms.append((time.perf_counter() - t) * 1e3)
    log(
        f"  latency, median of {repeats} interleaved runs, {settle:g} s apart (batch 1): "
        f"mbcompile {statistics.median(compiled_ms):.1f} ms "
        f"[{min(compiled_ms):.1f}-{max(compiled_ms):.1f}], "
        f"PyTorch eager {statistics.median(torch_ms):.1f} ms "
        f"[{min(torch_ms):.1f}-{max(torch_ms):.1f}]"
    )
    return errors, compiled_ms, torch_ms
