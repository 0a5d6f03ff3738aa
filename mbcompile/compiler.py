"""The compile driver: capture → MobileBERT passes → target pipeline → CompiledModel."""

from __future__ import annotations

import platform
import time
from typing import Any

from . import __version__
from .capture import capture
from .runtime import CompiledModel, _Library
from .stats import kernel_calls, module_stats


def _versions() -> dict[str, str]:
    import torch
    import transformers
    import tvm

    return {
        "mbcompile": __version__,
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run_passes(mod, passes) -> tuple[Any, list[dict]]:
    """Run MobileBERT passes in order; returns the module and one report row per pass."""
    from mbcompile.passes import resolve_passes

    rows = []
    for p in resolve_passes(passes):
        start = time.perf_counter()
        mod, fired = p(mod)
        rows.append(
            {
                "pass": p.name,
                "fired": int(fired),
                "seconds": round(time.perf_counter() - start, 3),
                **module_stats(mod),
            }
        )
    return mod, rows


def prepare(
    model,
    *,
    target="host",
    seq_len: int = 128,
    batch_size: int = 1,
    num_choices: int | None = None,
    passes="default",
    logits_for: str = "all",
    max_masked: int = 8,
    mask_token_id: int | None = None,
):
    """Capture ``model`` and run the MobileBERT passes: what ``compile`` and ``tune`` share.

    Returns (target spec, TVM target, Captured, Relax module after the passes, report, timings).
    """
    from mbcompile.targets.registry import resolve_target

    spec = resolve_target(target)
    tvm_target = spec.tvm_target()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    captured = capture(
        model,
        seq_len=seq_len,
        batch_size=batch_size,
        num_choices=num_choices,
        logits_for=logits_for,
        max_masked=max_masked,
        mask_token_id=mask_token_id,
    )
    timings["capture"] = time.perf_counter() - start
    start = time.perf_counter()
    mod = captured.mod
    report: dict[str, Any] = {"imported": module_stats(mod)}
    with tvm_target:  # passes that emit kernels (FuseAttention) size them for the target
        mod, report["passes"] = run_passes(mod, passes) if passes else (mod, [])
    timings["passes"] = time.perf_counter() - start
    return spec, tvm_target, captured, mod, report, timings


def compile(
    model,
    *,
    seq_len: int = 128,
    batch_size: int = 1,
    num_choices: int | None = None,
    target="host",
    passes="default",
    logits_for: str = "all",
    max_masked: int = 8,
    mask_token_id: int | None = None,
    tuning_db="default",
) -> CompiledModel:
    """Compile a Hugging Face MobileBERT (any of its eight heads) for ``target``.

    ``passes`` is ``"default"``, an explicit list of passes (instances, classes or names), or
    ``()`` for none. Weights become compile-time constants of the compiled library.

    ``logits_for="masked"`` (MaskedLM, PreTraining): vocabulary logits only at the positions of
    ``mask_token_id`` (default 103, [MASK] of the uncased vocabulary), at most ``max_masked`` per
    sequence; the output gains ``masked_positions`` (batch, n; -1 where a row has fewer, whose
    logits are NaN).

    ``tuning_db``: a folder written by ``mbcompile.tune`` (refused if made for another target or
    TVM version), ``"default"`` (the database shipped in targets/databases/ for this target, if
    any) or None (the untuned schedules only).
    """
    import tvm

    from mbcompile.targets.export import export_library
    from mbcompile.targets.pipeline import build_pipeline
    from mbcompile.targets.tuning import resolve_database

    spec, tvm_target, captured, mod, report, timings = prepare(
        model,
        target=target,
        seq_len=seq_len,
        batch_size=batch_size,
        num_choices=num_choices,
        passes=passes,
        logits_for=logits_for,
        max_masked=max_masked,
        mask_token_id=mask_token_id,
    )
    database = resolve_database(tuning_db, tvm_target)
    fused: dict[str, int] = {}

    def on_fused(fused_mod):
        fused["kernel_calls"] = kernel_calls(fused_mod)

    start = time.perf_counter()
    pipeline = build_pipeline(tvm_target, database=database, on_fused=on_fused)
    executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)
    timings["build"] = time.perf_counter() - start
    report["final"] = {**module_stats(mod), **fused}

    metadata = {
        "model_class": captured.signature.model_class,
        "head": captured.signature.head,
        "config": captured.config,
        "target": spec.to_dict(),
        "tvm_target": str(tvm_target),
        "tuning_db": None if database is None else str(database.path),
        "versions": _versions(),
        "report": report,
        "compile_seconds": {k: round(v, 2) for k, v in timings.items()},
    }

    def _export(ex, path):
        export_library(ex, spec, path)

    return CompiledModel(
        captured.signature, metadata, _Library(executable=executable, export=_export)
    )
