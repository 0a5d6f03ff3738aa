"""Tokenizer-based pipelines over a compiled MobileBERT, shaped like transformers' ``pipeline``.

    fill = mbcompile.pipeline("fill-mask", "mlm.mbc")        # the artifact holds its tokenizer
    fill("the capital of france is [MASK] .")                # [{score, token, token_str, sequence}]
    qa = mbcompile.pipeline("question-answering", compiled, tokenizer="path/to/checkpoint")
    qa(question="where is the cat ?", context=long_text)       # {score, start, end, answer}

Each pipeline returns what transformers' pipeline of the same task returns (keys, order, nesting;
scores as Python floats) and computes it the same way, so a compiled model and its eager original
agree to the model's 1e-4 tolerance. Question answering follows transformers 4.x's
QuestionAnsweringPipeline (transformers 5 dropped it), including its stride windows over contexts
longer than the compiled ``seq_len``.

The model runs with numpy and TVM (no torch); the tokenizer is a transformers tokenizer object, a
local folder of tokenizer files, or (default) the tokenizer saved in the artifact. Nothing is
downloaded: folders load with ``local_files_only=True``.

One file per task (``fill_mask.py``, ``question_answering.py``, ...); ``base.py`` holds the
``Pipeline`` base class and ``tokenizer.py`` the tokenizer loading. Names with a leading
underscore are shared between these files only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mbcompile import artifact
from mbcompile.artifact.tokenizer_json import with_tokenizer_json
from mbcompile.errors import InputError, PipelineError
from mbcompile.pipelines.base import Pipeline, _config_of
from mbcompile.pipelines.feature_extraction import (
    FeatureExtractionPipeline,
    SentenceEmbeddingPipeline,
)
from mbcompile.pipelines.fill_mask import FillMaskPipeline
from mbcompile.pipelines.multiple_choice import MultipleChoicePipeline
from mbcompile.pipelines.next_sentence import NextSentencePredictionPipeline
from mbcompile.pipelines.question_answering import QuestionAnsweringPipeline
from mbcompile.pipelines.text_classification import TextClassificationPipeline
from mbcompile.pipelines.token_classification import TokenClassificationPipeline
from mbcompile.pipelines.tokenizer import (
    _checkpoint_tokenizer_files,
    _load_tokenizer_folder,
    _tokenizer_from_files,
)
from mbcompile.runtime import CompiledModel, load

TASKS: dict[str, type[Pipeline]] = {
    cls.task: cls
    for cls in (
        FillMaskPipeline,
        QuestionAnsweringPipeline,
        TextClassificationPipeline,
        TokenClassificationPipeline,
        NextSentencePredictionPipeline,
        MultipleChoicePipeline,
        FeatureExtractionPipeline,
        SentenceEmbeddingPipeline,
    )
}
ALIASES = {"ner": "token-classification", "sentiment-analysis": "text-classification"}


def pipeline(
    task: str,
    model: CompiledModel | str | os.PathLike,
    tokenizer: Any = None,
    *,
    num_threads: int | None = None,
    batch_size: int | None = None,
    **compile_options: Any,
) -> Pipeline:
    """A pipeline for ``task`` over a compiled model, the path of a saved artifact, or a
    checkpoint to compile first for this task's head (a local checkpoint folder, an ONNX file or
    a Hugging Face hub id, resolved as ``mbcompile.compile`` does; needs the ``compile`` extra).

    ``task``: "fill-mask", "question-answering", "text-classification" (alias
    "sentiment-analysis"), "token-classification" (alias "ner"), "next-sentence-prediction",
    "multiple-choice", "feature-extraction", "sentence-embedding". ``tokenizer``: a transformers tokenizer, a local folder holding its files
    (vocab.txt, tokenizer.json, ...), or None: the tokenizer saved in the artifact (see
    ``Pipeline.save``), else the one beside the checkpoint the model was compiled from.
    ``num_threads``: kernel threads per call (default: every CPU the process may use, or
    ``TVM_NUM_THREADS``). ``batch_size``: inputs per model call, as in transformers (each call
    may give its own; default: the compiled batch size). ``compile_options`` (e.g.
    ``precision="int8"``): those of ``mbcompile.compile``, for a checkpoint compiled here (for the
    compiled batch size, compile first and pass the compiled model); refused with anything else.
    """
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise PipelineError(f"Unknown task {task!r}; known: {sorted(TASKS) + sorted(ALIASES)}")
    cls = TASKS[name]
    source = None
    if isinstance(model, (str, os.PathLike)) and _is_checkpoint(model):
        model = _compile_checkpoint(model, cls, compile_options, tokenizer)
    elif compile_options:
        raise PipelineError(
            f"{name}: {sorted(compile_options)}: compile options apply to a checkpoint compiled "
            "here, not to a compiled model or a saved artifact"
        )
    elif isinstance(model, (str, os.PathLike)):
        source = Path(model)
        model = load(source)
    cls.check_head(model)
    if num_threads is not None:
        try:
            model = model.with_threads(num_threads)
        except InputError as err:
            raise PipelineError(f"{name}: {err}") from None

    files = None
    config = _config_of(model)
    if tokenizer is None:
        # load() and compile() keep the artifact's (or the checkpoint's) tokenizer files.
        files = model.tokenizer_files or _checkpoint_tokenizer_files(config)
        if not files:
            where = f"the artifact {source}" if source is not None else "this compiled model"
            raise PipelineError(
                f"{name}: no tokenizer: {where} has none saved with it; pass tokenizer= (a "
                f"transformers tokenizer or a local folder with vocab.txt / tokenizer.json), or "
                f"save one into the artifact with mbcompile.pipeline(..., tokenizer=...).save(path)"
            )
        tokenizer = _tokenizer_from_files(files, config)
    elif isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer)
        if not folder.is_dir():
            raise PipelineError(f"tokenizer: {folder} is not a folder (give a local folder path)")
        tokenizer = _load_tokenizer_folder(folder)
        files = with_tokenizer_json(artifact.tokenizer_files(folder))
    return cls(model, tokenizer, tokenizer_files=files or None, batch_size=batch_size)


def _is_checkpoint(name: str | os.PathLike) -> bool:
    """A checkpoint folder (config.json inside), an ONNX file, or a hub id that is no file
    here."""
    path = Path(name)
    if path.suffix == ".onnx":
        return True
    if path.is_dir():
        return (path / "config.json").is_file()
    from mbcompile.hub import is_hub_id

    return not path.exists() and is_hub_id(os.fspath(name)) and not str(name).endswith(".mbc")


def _compile_checkpoint(
    name: str | os.PathLike, cls: type[Pipeline], compile_options: dict[str, Any], tokenizer: Any
) -> CompiledModel:
    """The checkpoint compiled for ``cls``'s head; for fill-mask, the pruned head
    (``logits_for="masked"``) at the [MASK] of the tokenizer the pipeline will use (compile
    reads the checkpoint's own, or the folder given as ``tokenizer``)."""
    from mbcompile.compiler import compile as compile_model

    # An ONNX file's graph has its head (its outputs say which): check_head then judges it.
    head = None if Path(name).suffix == ".onnx" else cls.heads[0]
    options = dict(compile_options)
    if cls.task == "fill-mask":
        options.setdefault("logits_for", "masked")
        if isinstance(tokenizer, (str, os.PathLike)):
            options.setdefault("tokenizer", tokenizer)
        elif getattr(tokenizer, "mask_token_id", None) is not None:
            options.setdefault("mask_token_id", int(tokenizer.mask_token_id))
    return compile_model(name, head=head, **options)


__all__ = [
    "ALIASES",
    "TASKS",
    "FeatureExtractionPipeline",
    "SentenceEmbeddingPipeline",
    "FillMaskPipeline",
    "MultipleChoicePipeline",
    "NextSentencePredictionPipeline",
    "Pipeline",
    "PipelineError",
    "QuestionAnsweringPipeline",
    "TextClassificationPipeline",
    "TokenClassificationPipeline",
    "pipeline",
]
