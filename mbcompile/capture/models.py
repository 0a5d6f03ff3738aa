"""Build Hugging Face MobileBERT models: from a local checkpoint folder or a named config.

Needs transformers (the ``compile`` extra). Never touches the network: checkpoints load with
``local_files_only=True`` and named configs are embedded here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mbcompile.errors import ModelError
from mbcompile.heads import HEADS, head_class_name, head_of_class

# Named architectures, as MobileBertConfig keyword arguments.
CONFIGS: dict[str, dict] = {
    # google/mobilebert-uncased: transformers' MobileBertConfig defaults (24 layers, 512 hidden,
    # 128 bottleneck, 4 FFNs, NoNorm, ReLU, trigram input).
    "mobilebert-uncased": {},
    # A 2-layer model of the same shape family, for quick trials.
    "mobilebert-tiny": {"num_hidden_layers": 2},
}


def named_config(name: str, **overrides):
    from transformers import MobileBertConfig

    if name not in CONFIGS:
        raise ModelError(f"Unknown config {name!r}; known: {list(CONFIGS)}")
    return MobileBertConfig(**{**CONFIGS[name], **overrides})


def _head_class(head: str):
    import transformers

    return getattr(transformers, head_class_name(head))


def random_model(config, head: str = "base", seed: int = 0):
    """A randomly initialised model of ``head`` (seeded), in eval mode."""
    import torch

    if isinstance(config, str):
        config = named_config(config)
    torch.manual_seed(seed)
    return _head_class(head)(config).eval()


def load_checkpoint(path: str | os.PathLike, head: str | None = None):
    """Load a MobileBERT checkpoint folder (config.json + weights) as ``head``.

    Without ``head``, the head is the one named in the checkpoint's ``architectures``.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "mobilebert":
        raise ModelError(f"{path}: model_type is {config.model_type!r}, not 'mobilebert'")
    if head is None:
        archs = [a for a in (config.architectures or []) if a in HEADS.values()]
        if not archs:
            raise ModelError(
                f"{path}: config.json names no MobileBERT head in 'architectures'; "
                f"choose one with head=..., one of {list(HEADS)}"
            )
        head = head_of_class(archs[0])
    cls = _head_class(head)
    from transformers.utils import logging as hf_logging

    # transformers 5 draws a "Loading weights" progress bar on stderr: not ours to show
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(path, local_files_only=True).eval()
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
