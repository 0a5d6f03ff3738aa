"""mbcompile: an ahead-of-time compiler for MobileBERT.

Public API::

    compiled = mbcompile.compile(model, seq_len=128, target="host")
    out = compiled(input_ids=ids, attention_mask=mask)
    compiled.save("model.mbc")
    again = mbcompile.load("model.mbc")        # numpy + TVM only: no torch, no transformers
    fill = mbcompile.pipeline("fill-mask", again, tokenizer="path/to/checkpoint")

``compile`` imports torch and transformers when called; ``load`` never does.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    ArtifactError,
    InputError,
    MbcompileError,
    ModelError,
    TargetError,
    ToolchainError,
)
from .outputs import ModelOutput
from .runtime import CompiledModel, load


def compile(model, **kwargs) -> CompiledModel:
    """Compile a Hugging Face MobileBERT; see :func:`mbcompile.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(model, **kwargs)


def tune(model, **kwargs) -> dict:
    """Tune a model's kernels with MetaSchedule; see :func:`mbcompile.tuner.tune`."""
    from .tuner import tune as _tune

    return _tune(model, **kwargs)


def pipeline(task: str, model, tokenizer=None):
    """A tokenizer-based pipeline ("fill-mask", "question-answering", ...) over a compiled model;
    see :func:`mbcompile.pipelines.pipeline`."""
    from .pipelines import pipeline as _pipeline

    return _pipeline(task, model, tokenizer)


def __getattr__(name: str):
    if name == "Target":
        from .targets.registry import Target

        return Target
    if name == "RemoteError":
        from .remote import RemoteError

        return RemoteError
    if name == "PipelineError":
        from .pipelines import PipelineError

        return PipelineError
    raise AttributeError(f"module 'mbcompile' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "CompiledModel",
    "InputError",
    "MbcompileError",
    "ModelError",
    "ModelOutput",
    "PipelineError",
    "RemoteError",
    "Target",
    "TargetError",
    "ToolchainError",
    "compile",
    "load",
    "pipeline",
    "tune",
]
