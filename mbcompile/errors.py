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


class OptionError(MbcompileError, ValueError):
    """A compile or tune option has a bad value (``seq_len=0``, an unknown pass, ...)."""


class RemoteError(MbcompileError, ConnectionError):
    """A remote device cannot be reached, does not speak TVM RPC, or cannot run the library."""


class EmulatorError(MbcompileError, RuntimeError):
    """The emulated device cannot be built or its RPC server does not start."""


class PipelineError(MbcompileError, ValueError):
    """A pipeline cannot serve this input or model: wrong task for the head, no mask token,
    missing tokenizer, text longer than the compiled sequence length."""


class InputTypeError(InputError, TypeError):
    """An input of the wrong kind for a compiled model (e.g. ``inputs_embeds``, which the
    compiled function does not take)."""


class PipelineTypeError(PipelineError, TypeError):
    """A pipeline was given a value of the wrong type (a number where text is expected, a
    tokenizer that is not one)."""


class ModelClosedError(MbcompileError, RuntimeError):
    """A compiled model was called after ``close()``."""
