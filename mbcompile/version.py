"""mbcompile's version, recorded in every artifact with those of the tools that compiled it."""

import platform

__version__ = "0.1.0"


def compile_versions() -> dict[str, str]:
    """The versions an artifact records: mbcompile, TVM, torch, transformers, Python."""
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
