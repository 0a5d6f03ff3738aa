"""Stage 1, capture: a Hugging Face MobileBERT → a Relax module and its signature.

``models`` builds the PyTorch model (a local checkpoint folder or a named architecture);
``torch_export`` runs ``torch.export`` at the compiled shape and imports the program into Relax
with the weights bound as constants. Needs torch and transformers (the ``compile`` extra); the
runtime never imports this package.
"""

from mbcompile.capture.models import (
    CONFIGS,
    checkpoint_folder,
    checkpoint_source,
    load_checkpoint,
    named_config,
    random_model,
)
from mbcompile.capture.torch_export import (
    DEFAULT_NUM_CHOICES,
    Captured,
    capture,
    check_model,
    example_inputs,
)

__all__ = [
    "CONFIGS",
    "DEFAULT_NUM_CHOICES",
    "Captured",
    "capture",
    "check_model",
    "checkpoint_folder",
    "checkpoint_source",
    "example_inputs",
    "load_checkpoint",
    "named_config",
    "random_model",
]
