"""Stage 1, capture: a Hugging Face MobileBERT → a Relax module and its signature.

``models`` builds the PyTorch model (a local checkpoint folder or a named architecture);
``torch_export`` runs ``torch.export`` at the compiled shape and imports the program into Relax
with the weights bound as constants. ``onnx_model`` loads an ONNX export instead and
``onnx_import`` imports it with TVM's ONNX frontend into the same interface; ``relax_forms``
makes both importers' modules read alike. Needs torch and transformers (the ``compile``
extra; onnx and onnxruntime for ONNX files, the ``onnx`` extra).
"""

from mbcompile.capture.captured import DEFAULT_NUM_CHOICES, Captured
from mbcompile.capture.models import (
    CONFIGS,
    checkpoint_folder,
    checkpoint_source,
    float32_model,
    load_checkpoint,
    named_config,
    random_model,
)
from mbcompile.capture.onnx_import import capture_onnx
from mbcompile.capture.onnx_model import OnnxModel, is_onnx_path, load_onnx
from mbcompile.capture.torch_export import (
    capture,
    check_model,
    example_inputs,
)

__all__ = [
    "CONFIGS",
    "DEFAULT_NUM_CHOICES",
    "Captured",
    "OnnxModel",
    "capture",
    "capture_onnx",
    "check_model",
    "checkpoint_folder",
    "checkpoint_source",
    "example_inputs",
    "float32_model",
    "is_onnx_path",
    "load_checkpoint",
    "load_onnx",
    "named_config",
    "random_model",
]
