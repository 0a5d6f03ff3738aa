"""The compile driver: capture → MobileBERT passes → target pipeline → CompiledModel."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any

from . import __version__, artifact
from .capture import Captured, capture, check_model
from .errors import ModelError
from .runtime import CompiledModel, _Library
from .signature import OutputSpec
from .stats import kernel_calls, module_stats

# Heads with vocabulary logits, which ``logits_for="masked"`` prunes.
PRUNABLE_HEADS = ("masked-lm", "pretraining")


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


def _run_pass(p, mod) -> tuple[Any, dict]:
    start = time.perf_counter()
    mod, fired = p(mod)
    row = {
        "pass": p.name,
        "fired": int(fired),
        "seconds": round(time.perf_counter() - start, 3),
        **module_stats(mod),
    }
    return mod, row


def listed_passes(passes) -> list:
    """Pass instances for ``compile(passes=...)``; refuses ``PruneMaskedLMHead``, which is the
    ``logits_for`` option's."""
    from mbcompile.passes import PruneMaskedLMHead, resolve_passes

    resolved = resolve_passes(passes)
    if any(p.name == PruneMaskedLMHead.name for p in resolved):
        raise ValueError(
            "PruneMaskedLMHead changes the compiled function's inputs and outputs, so it is "
            "not a pass to list: ask for it with compile(..., logits_for='masked', "
            "max_masked=..., mask_token_id=...)"
        )
    return resolved


def run_passes(mod, passes) -> tuple[Any, list[dict]]:
    """Run MobileBERT passes in order; returns the module and one report row per pass."""
    rows = []
    for p in listed_passes(passes):
        mod, row = _run_pass(p, mod)
        rows.append(row)
    return mod, rows


def masked_head_pass(model, *, seq_len: int, logits_for: str, max_masked: int, mask_token_id):
    """The ``PruneMaskedLMHead`` that ``logits_for`` asks for (None for ``"all"``), after
    checking the options against the model."""
    from mbcompile.passes.prune_masked_lm_head import DEFAULT_MASK_TOKEN_ID, PruneMaskedLMHead

    if logits_for not in ("all", "masked"):
        raise ValueError(f"logits_for must be 'all' or 'masked', got {logits_for!r}")
    if logits_for == "all":
        return None
    head = check_model(model)
    if head not in PRUNABLE_HEADS:
        raise ValueError(f"logits_for='masked' applies to the heads {PRUNABLE_HEADS}, not {head!r}")
    if not isinstance(max_masked, int) or not 1 <= max_masked <= seq_len:
        raise ValueError(f"max_masked must be an integer in [1, seq_len], got {max_masked!r}")
    mask_token_id = DEFAULT_MASK_TOKEN_ID if mask_token_id is None else mask_token_id
    vocab_size = model.config.vocab_size
    if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id {mask_token_id!r} is outside [0, {vocab_size}) (vocab_size)"
        )
    return PruneMaskedLMHead(max_masked=max_masked, mask_token_id=mask_token_id)


def prune_masked_lm_head(captured: Captured, prune) -> tuple[Captured, dict]:
    """Run ``prune`` (a ``PruneMaskedLMHead``) on the captured module and describe the new
    interface: a ``masked_positions`` input, the logits at ``max_masked`` positions and the
    positions as the last output. Returns the new Captured and the pass's report row."""
    mod, row = _run_pass(prune, captured.mod)
    if not row["fired"]:
        raise ModelError(
            "logits_for='masked': found no vocabulary projection to prune in the captured "
            f"{captured.signature.model_class} ({'; '.join(prune.refusals) or 'no candidate'})"
        )
    sig = captured.signature
    k = prune.max_masked
    logits = sig.outputs[prune.pruned_output]
    outputs = list(sig.outputs)
    outputs[prune.pruned_output] = dataclasses.replace(
        logits, shape=(sig.batch_size, k, logits.shape[-1]), seq_axes=(), masked_axis=1
    )
    outputs.append(OutputSpec(name="masked_positions", shape=(sig.batch_size, k), dtype="int64"))
    signature = dataclasses.replace(
        sig,
        outputs=tuple(outputs),
        fields=(*sig.fields, "masked_positions"),
        max_masked=k,
        mask_token_id=prune.mask_token_id,
    )
    return dataclasses.replace(captured, mod=mod, signature=signature), row


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
    passes = listed_passes(passes)  # checked before the slow work
    prune = masked_head_pass(
        model,
        seq_len=seq_len,
        logits_for=logits_for,
        max_masked=max_masked,
        mask_token_id=mask_token_id,
    )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    captured = capture(model, seq_len=seq_len, batch_size=batch_size, num_choices=num_choices)
    timings["capture"] = time.perf_counter() - start
    start = time.perf_counter()
    report: dict[str, Any] = {"imported": module_stats(captured.mod), "passes": []}
    if prune is not None:  # first, whatever ``passes`` says: it defines the function's interface
        captured, row = prune_masked_lm_head(captured, prune)
        report["passes"].append(row)
    mod = captured.mod
    with tvm_target:  # passes that emit kernels (FuseAttention) size them for the target
        if passes:
            mod, rows = run_passes(mod, passes)
            report["passes"] += rows
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
    tokenizer: str | os.PathLike | None = None,
) -> CompiledModel:
    """Compile a Hugging Face MobileBERT (any of its eight heads) for ``target``.

    ``passes`` is ``"default"``, an explicit list of passes (instances, classes or names), or
    ``()`` for none. Weights become compile-time constants of the compiled library.

    ``logits_for="masked"`` (MaskedLM, PreTraining): vocabulary logits only at the positions of
    ``mask_token_id`` (default 103, [MASK] of the uncased vocabulary), at most ``max_masked`` per
    sequence; the output gains ``masked_positions`` (batch, n; -1 where a row has fewer, whose
    logits are NaN). It runs the ``PruneMaskedLMHead`` pass first, before and independently of
    ``passes`` (also with ``passes=()``): the pass sets the compiled function's inputs and
    outputs, so it is an option here and cannot be listed in ``passes``.

    ``tuning_db``: a folder written by ``mbcompile.tune`` (refused if made for another target or
    TVM version), ``"default"`` (the database shipped in targets/databases/ for this target, if
    any) or None (the untuned schedules only).

    ``tokenizer``: a folder whose tokenizer files (vocab.txt, tokenizer.json, ...) are saved with
    the model, so that ``mbcompile.pipeline(task, compiled)`` needs no tokenizer; by default the
    checkpoint folder the model was loaded from, if it is here and holds any.
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
        # A reshape alone is lowered to a view (RewriteDataflowReshape), not a kernel call.
        views = tvm.relax.transform.RewriteDataflowReshape()(fused_mod)
        fused["kernel_calls"] = kernel_calls(views)

    def on_tuned(count):
        fused["tuned_kernels"] = count

    start = time.perf_counter()
    pipeline = build_pipeline(tvm_target, database=database, on_fused=on_fused, on_tuned=on_tuned)
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
        # kernels whose schedule came from the database (0: none of its workloads matched)
        "tuned_kernels": fused.get("tuned_kernels", 0),
        "versions": _versions(),
        "report": report,
        "compile_seconds": {k: round(v, 2) for k, v in timings.items()},
    }

    def _export(ex, path):
        export_library(ex, spec, path)

    source = tokenizer if tokenizer is not None else captured.config.get("_name_or_path")
    tokenizer_files = artifact.tokenizer_files(source) if source else {}
    return CompiledModel(
        captured.signature,
        metadata,
        _Library(executable=executable, export=_export),
        tokenizer_files=tokenizer_files,
    )
