"""Exceptions raised by mbcompile, each where the bad value enters."""


class MbcompileError(Exception):
    """Base class of every error mbcompile raises on purpose."""


class InputError(MbcompileError, ValueError):
    """An input to a compiled model has the wrong type, dtype, shape or values."""


class ModelError(MbcompileError, TypeError):
    """The model handed to ``compile`` is not a supported Hugging Face MobileBERT."""


class TargetError(MbcompileError, ValueError):
    """An unknown target name, or a target this machine cannot build for or run."""


class ArtifactError(MbcompileError, ValueError):
    """A saved artifact is corrupt, foreign, or from an incompatible version."""


class ToolchainError(MbcompileError, RuntimeError):
    """A compiler or SDK needed for cross-compilation is missing."""
