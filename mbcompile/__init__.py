"""mbcompile: an ahead-of-time compiler for MobileBERT.

Public API::

    compiled = mbcompile.compile(model, seq_len=128, target="host")
    out = compiled(input_ids=ids, attention_mask=mask)
    compiled.save("model.mbc")
    again = mbcompile.load("model.mbc")        # numpy + TVM only: no torch, no transformers
    fill = mbcompile.pipeline("fill-mask", again, tokenizer="path/to/checkpoint")

The stages, in the order data flows (each a package or module here, ``passes/`` and
``targets/`` installed as ``mbcompile.passes`` and ``mbcompile.targets``): ``capture`` →
``passes`` → ``targets`` → ``artifact`` → ``runtime``; ``compiler`` and ``tuner`` drive them,
and ``devices``, ``pipelines`` and ``cli`` sit on top. ``compile`` imports torch and
transformers when called; ``load`` never does.
"""

from __future__ import annotations

from mbcompile.compiler import compile
from mbcompile.devices.remote import load
from mbcompile.errors import (
    ArtifactError,
    EmulatorError,
    InputError,
    MbcompileError,
    ModelError,
    OptionError,
    PipelineError,
    RemoteError,
    TargetError,
    ToolchainError,
)
from mbcompile.options import CompileOptions
from mbcompile.pipelines import pipeline
from mbcompile.runtime import CompiledModel, ModelOutput
from mbcompile.targets.registry import Target
from mbcompile.tuner import tune
from mbcompile.version import __version__

__all__ = [
    "ArtifactError",
    "CompileOptions",
    "CompiledModel",
    "EmulatorError",
    "InputError",
    "MbcompileError",
    "ModelError",
    "ModelOutput",
    "OptionError",
    "PipelineError",
    "RemoteError",
    "Target",
    "TargetError",
    "ToolchainError",
    "__version__",
    "compile",
    "load",
    "pipeline",
    "tune",
]
