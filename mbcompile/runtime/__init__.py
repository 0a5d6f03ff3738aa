"""Stage 5, the runtime: load an artifact and call it like the Hugging Face model.

``inputs`` checks and pads what a caller passes, ``library`` loads the linked library once,
``program`` runs ``main`` on this CPU (and sets the thread count), ``outputs`` is HF's
ModelOutput, and ``model`` is the :class:`CompiledModel` that ties them together. Needs numpy
and TVM only.
"""

from mbcompile.runtime.model import CompiledModel, load
from mbcompile.runtime.outputs import ModelOutput
from mbcompile.runtime.program import LocalProgram, use_all_cpus

__all__ = ["CompiledModel", "LocalProgram", "ModelOutput", "load", "use_all_cpus"]
