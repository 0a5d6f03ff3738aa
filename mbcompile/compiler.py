"""The compile driver: capture → MobileBERT passes → target pipeline → linked library → model.

Every stage runs before ``compile`` returns, linking (and cross-compiling) included: a missing
cross toolchain is reported by ``compile``, and the model it returns holds the library's bytes,
ready to save or, on a CPU that can run it, to call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mbcompile import artifact
from mbcompile.artifact import Artifact, Metadata, tokenizer_json
from mbcompile.artifact.tokenizer_json import with_tokenizer_json
from mbcompile.errors import ModelError, OptionError
from mbcompile.options import DEFAULT_MASK_TOKEN_ID, CompileOptions
from mbcompile.report import kernel_calls, module_stats
from mbcompile.runtime import CompiledModel
from mbcompile.signature import OutputSpec
from mbcompile.version import compile_versions

# Heads with vocabulary logits, which ``logits_for="masked"`` prunes.
PRUNABLE_HEADS = ("masked-lm", "pretraining")


@dataclass
class Prepared:
    """A model captured and rewritten for one target: what ``compile`` and ``tune`` share."""

    target: Any  # mbcompile.targets.registry.Target
    tvm_target: Any  # tvm.target.Target
    captured: Any  # mbcompile.capture.Captured (its signature describes the final interface)
    mod: Any  # the Relax module after the passes
    report: dict[str, Any]
    timings: dict[str, float]


def _run_pass(p, mod) -> tuple[Any, dict]:
    start = time.perf_counter()
    mod, fired = p(mod)
    # Per function of the module (one per compiled length): the count in ``main``, the longest.
    by_function = getattr(p, "fired_by_function", {})
    row = {
        "pass": p.name,
        "fired": int(by_function.get("main", fired)),
        "seconds": round(time.perf_counter() - start, 3),
        **module_stats(mod),
    }
    return mod, row


def listed_passes(passes, target=None) -> list:
    """Pass instances for ``compile(passes=...)`` (passes that emit kernels are built for
    ``target``); refuses ``PruneMaskedLMHead``, which is the ``logits_for`` option's."""
    from mbcompile.passes import PruneMaskedLMHead, resolve_passes

    try:
        resolved = resolve_passes(passes, target=target)
    except ValueError as err:
        raise OptionError(str(err)) from None
    if any(p.name == PruneMaskedLMHead.name for p in resolved):
        raise OptionError(
            "PruneMaskedLMHead changes the compiled function's inputs and outputs, so it is "
            "not a pass to list: ask for it with compile(..., logits_for='masked', "
            "max_masked=..., mask_token_id=...)"
        )
    return resolved


def masked_head_pass(model, options: CompileOptions):
    """The ``PruneMaskedLMHead`` that ``options.logits_for`` asks for (None for ``"all"``),
    after checking the options against the model."""
    from mbcompile.capture import check_model
    from mbcompile.passes.prune_masked_lm_head import DEFAULT_MASK_TOKEN_ID, PruneMaskedLMHead

    if options.logits_for == "all":
        return None
    head = check_model(model)
    if head not in PRUNABLE_HEADS:
        raise OptionError(
            f"logits_for='masked' applies to the heads {PRUNABLE_HEADS}, not {head!r}"
        )
    mask_token_id = options.mask_token_id
    mask_token_id = DEFAULT_MASK_TOKEN_ID if mask_token_id is None else mask_token_id
    vocab_size = model.config.vocab_size
    if not 0 <= mask_token_id < vocab_size:
        raise OptionError(
            f"mask_token_id {mask_token_id!r} is outside [0, {vocab_size}) (vocab_size)"
        )
    return PruneMaskedLMHead(max_masked=options.max_masked, mask_token_id=mask_token_id)


def prune_masked_lm_head(captured, prune) -> tuple[Any, dict]:
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


def _quiet(_message: str) -> None:
    pass


def prepare(model, options: CompileOptions, log: Callable[[str], None] = _quiet) -> Prepared:
    """Capture ``model`` and run the MobileBERT passes for ``options.target``; ``log`` gets a
    line as each stage starts and ends."""
    from mbcompile.capture import OnnxModel, capture, capture_onnx, check_model, float32_model
    from mbcompile.cpu import check_precision
    from mbcompile.passes.base import forget_graphs
    from mbcompile.targets.metaschedule import sigint_held
    from mbcompile.targets.registry import resolve_target

    spec = resolve_target(options.target)
    tvm_target = spec.tvm_target()
    check_precision(options.precision, tvm_target, spec.name)
    passes = listed_passes(options.passes, tvm_target)  # checked before the slow work
    check_model(model)
    model = float32_model(model, log)
    fixed = getattr(model, "fixed_seq_len", None)  # an ONNX file exported at one length
    if fixed is not None and options.seq_len is None and options.max_seq_len is None:
        options = dataclasses.replace(options, seq_len=fixed)
    seq_lens = options.seq_lens(model.config.max_position_embeddings)
    prune = masked_head_pass(model, options)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    how, name, capture_with = "torch.export", type(model).__name__, capture
    if isinstance(model, OnnxModel):
        how, name = f"ONNX import of {model.path.name}", model.model_class
        capture_with = capture_onnx
    log(f"capture: {how} of {name} at {_lengths_text(seq_lens)} ...")
    # TVM calls back into Python here (the importer, the passes): a Ctrl-C raised inside such a
    # callback crosses C++ and comes out as a bare RuntimeError, so it waits for the block's end
    with sigint_held():
        captured = capture_with(
            model,
            seq_lens=seq_lens,
            batch_size=options.batch_size,
            num_choices=options.num_choices,
        )
    timings["capture"] = time.perf_counter() - start
    log(f"capture: done in {timings['capture']:.1f} s")
    start = time.perf_counter()
    with sigint_held():
        report: dict[str, Any] = {"imported": module_stats(captured.mod), "passes": []}
        if prune is not None:  # first, whatever ``passes`` says: it sets the interface
            log("passes: PruneMaskedLMHead ...")
            captured, row = prune_masked_lm_head(captured, prune)
            report["passes"].append(row)
        mod = captured.mod
        try:
            for i, p in enumerate(passes):
                log(f"passes: {p.name} ({i + 1}/{len(passes)}) ...")
                mod, row = _run_pass(p, mod)
                report["passes"].append(row)
        finally:
            forget_graphs()  # the passes' Graphs hold the functions they read
    timings["passes"] = time.perf_counter() - start
    log(f"passes: done in {timings['passes']:.1f} s")
    return Prepared(spec, tvm_target, captured, mod, report, timings)


def _lengths_text(seq_lens) -> str:
    if len(seq_lens) == 1:
        return f"length {seq_lens[0]}"
    return f"{len(seq_lens)} lengths ({', '.join(map(str, seq_lens))})"


def compile(
    model,
    *,
    target: Any = "host",
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 1,
    num_choices: int | None = None,
    passes: str | Sequence[Any] | None = "default",
    logits_for: str = "all",
    max_masked: int = 8,
    mask_token_id: int | None = None,
    precision: str = "fp32",
    tuning_db: str | os.PathLike | None = "default",
    tokenizer: str | os.PathLike | None = None,
    head: str | None = None,
    log: Callable[[str], None] | None = None,
) -> CompiledModel:
    """Compile a Hugging Face MobileBERT (any of its eight heads) for ``target``.

    ``model``: a transformers MobileBERT, or a checkpoint to load as ``head`` (default: the
    head its config.json names): a local folder, or a hub id such as
    ``"google/mobilebert-uncased"``, resolved as transformers does (the local hub cache first,
    ``HF_HUB_OFFLINE`` honoured; the resolved revision is recorded in the metadata's
    ``source``); or an ONNX file (``"model.onnx"``, exported by ``torch.onnx`` or Optimum with
    static or dynamic axes): imported with TVM's Relax ONNX frontend into the same interface,
    its head taken from ``head``, a ``config.json`` beside it or its outputs, and checked
    against ONNX Runtime instead of PyTorch (``mbcompile.capture.onnx_model``). Weights stored
    or held in float16 or bfloat16 are compiled (and checked) from a float32 copy.

    The options before ``tuning_db`` are :class:`mbcompile.options.CompileOptions` (see it for
    each; ``mbcompile.tune`` takes the same). ``target`` is a name (``mbcompile targets``) or a
    ``Target``.

    Lengths: by default the model takes every input of 1 to ``max_seq_len`` tokens (default the
    model's ``max_position_embeddings``, 512 for MobileBERT), and runs each at the shortest of
    the compiled lengths 8, 16, 32, 64, 128, 256, 384, 512 (up to ``max_seq_len``, which is one)
    that fits: one library, the weights stored once, a function per length. ``seq_len=N``
    compiles that one length only (every shorter input is padded to it): the smallest artifact
    and the quickest compile. ``passes`` is ``"default"``, an explicit list of passes (instances, classes or
    names), or ``()`` for none. Weights become compile-time constants of the linked library.

    ``logits_for="masked"`` (MaskedLM, PreTraining): vocabulary logits only at the positions of
    ``mask_token_id`` (default: the [MASK] of the tokenizer saved with the model, else 103,
    [MASK] of the uncased vocabulary), at most ``max_masked`` per
    sequence; the output gains ``masked_positions`` (batch, n; -1 where a row has fewer, whose
    logits are NaN). It runs the ``PruneMaskedLMHead`` pass first, before and independently of
    ``passes`` (also with ``passes=()``): the pass sets the compiled function's inputs and
    outputs, so it is an option here and cannot be listed in ``passes``.

    ``precision``: ``"fp32"``, or ``"bf16"`` / ``"int8"`` for the matmuls by the model's weights
    on a CPU with native dot products for them (TargetError otherwise); every compile checks
    the model against PyTorch fp32 on two random rows where it can run here and records the
    errors (``metadata.report["accuracy"]``); ``compiled.accuracy(inputs)`` does it on yours.

    ``tuning_db``: a folder written by ``mbcompile.tune`` (refused if made for another target or
    TVM version), ``"default"`` (the database shipped in targets/databases/ for this target, if
    any) or None (the untuned schedules only).

    ``tokenizer``: a folder whose tokenizer files (vocab.txt, tokenizer.json, ...) are saved with
    the model, so that ``mbcompile.pipeline(task, compiled)`` needs no tokenizer; by default the
    checkpoint folder the model was loaded from, if it is here and holds any.

    The library is linked (cross-compiled for an ARM target) before this returns. ``log``: a
    function given a line as each stage (capture, each pass, build, link) starts and ends.
    """
    from mbcompile.capture import checkpoint_folder, float32_model

    options = CompileOptions.pick(locals())
    log = log or _quiet
    if isinstance(model, (str, os.PathLike)):
        log(f"loading {os.fspath(model)} ...")
    model = float32_model(resolve_model(model, head), log)  # the accuracy reference too
    if options.logits_for == "masked" and options.mask_token_id is None:
        # the [MASK] of the tokenizer saved with the model, else the uncased 103
        source = tokenizer if tokenizer is not None else checkpoint_folder(model.config)
        if source:
            mask_token_id = tokenizer_json.mask_token_id(artifact.tokenizer_files(source))
            options = dataclasses.replace(options, mask_token_id=mask_token_id)
    return _compile(model, options, tuning_db, tokenizer, log)



def resolve_model(model, head: str | None):
    """``model`` itself, or the checkpoint it names (a folder, a hub id or an ONNX file)
    loaded as ``head``."""
    from mbcompile.capture import check_model, is_onnx_path, load_checkpoint, load_onnx

    if is_onnx_path(model):
        return load_onnx(model, head=head)
    if isinstance(model, (str, os.PathLike)):
        return load_checkpoint(model, head=head)
    if head is not None and check_model(model) != head:
        raise OptionError(
            f"head={head!r} is for loading a checkpoint; the model given is a "
            f"{type(model).__name__} (head {check_model(model)!r})"
        )
    return model


def _compile(
    model,
    options: CompileOptions,
    tuning_db: str | os.PathLike | None,
    tokenizer: str | os.PathLike | None,
    log: Callable[[str], None] = _quiet,
) -> CompiledModel:
    import tvm

    from mbcompile.capture import checkpoint_folder, checkpoint_source
    from mbcompile.targets.codegen import build_executable
    from mbcompile.targets.export import link_library
    from mbcompile.targets.metaschedule import sigint_held
    from mbcompile.targets.pipeline import build_pipeline
    from mbcompile.targets.registry import resolve_target
    from mbcompile.targets.tuning import resolve_database

    database = resolve_database(tuning_db, resolve_target(options.target).tvm_target())  # early
    prepared = prepare(model, options, log)
    spec, tvm_target, timings = prepared.target, prepared.tvm_target, prepared.timings
    fused: dict[str, int] = {}

    def on_fused(fused_mod):
        # A reshape alone is lowered to a view (RewriteDataflowReshape), not a kernel call.
        views = tvm.relax.transform.RewriteDataflowReshape()(fused_mod)
        fused["kernel_calls"] = kernel_calls(views)

    def on_tuned(count):
        fused["tuned_kernels"] = count

    start = time.perf_counter()
    log(f"build: lowering, scheduling and code generation for {tvm_target.kind.name} "
        f"({spec.name}) ...")
    pipeline = build_pipeline(
        tvm_target,
        precision=options.precision,
        database=database,
        on_fused=on_fused,
        on_tuned=on_tuned,
    )
    with sigint_held():  # the build pipeline calls our schedule rules (see prepare)
        executable = build_executable(prepared.mod, tvm_target, pipeline)
    timings["build"] = time.perf_counter() - start
    log(f"build: done in {timings['build']:.1f} s")
    start = time.perf_counter()
    log("link: the shared library ...")
    lib = link_library(executable, spec)
    timings["link"] = time.perf_counter() - start
    log(f"link: done in {timings['link']:.1f} s")
    report = {**prepared.report, "final": {**module_stats(prepared.mod), **fused}}

    captured = prepared.captured
    metadata = Metadata(
        signature=captured.signature,
        config=captured.config,
        target=spec.to_dict(),
        tvm_target=str(tvm_target),
        tuning_db=None if database is None else str(database.path),
        tuned_kernels=fused.get("tuned_kernels", 0),
        versions=compile_versions(),
        report=report,
        compile_seconds={k: round(v, 2) for k, v in timings.items()},
        options=options.to_dict(),
        source=checkpoint_source(model.config),
    )
    source = tokenizer if tokenizer is not None else checkpoint_folder(model.config)
    tokenizer_files = artifact.tokenizer_files(source) if source else {}
    tokenizer_files = with_tokenizer_json(tokenizer_files)  # the pipelines need tokenizers only
    compiled = CompiledModel(Artifact(metadata, lib, tokenizer_files), reference=model)
    checked = dataclasses.replace(metadata, report={**report, "accuracy": _check(compiled, log)})
    return CompiledModel(
        Artifact(checked, lib, tokenizer_files), library=compiled._library, reference=model
    )


def _check(compiled: CompiledModel, log: Callable[[str], None]) -> dict:
    """The compiled model against PyTorch on ``accuracy.sample_inputs`` (recorded in the
    metadata's report, shown by ``mbcompile info``), or why it did not run."""
    from mbcompile.runtime import accuracy
    from mbcompile.targets.registry import Target, can_run_here

    reason = can_run_here(Target.from_dict(compiled.metadata.target))
    if reason is not None:
        return {"skipped": f"not run: {reason}"}
    options = compiled.metadata.options
    mask_token_id = options.get("mask_token_id")
    batch = accuracy.sample_inputs(
        compiled.signature,
        int(compiled.metadata.config.get("vocab_size", 30522)),
        DEFAULT_MASK_TOKEN_ID if mask_token_id is None else mask_token_id,
    )
    result = compiled.accuracy(batch)
    worst = max((o["max_abs_error"] for o in result["outputs"].values()), default=0.0)
    log(f"accuracy: max abs error {worst:.2e} against {result['reference']} "
        f"({result['precision']})")
    length = batch["input_ids"].shape[-1]
    return {**result, "inputs": f"2 random rows of {length} tokens (one padded), seed 0"}
