"""Build Hugging Face MobileBERT models: from a checkpoint (a local folder or a hub id) or a
named config.

Needs transformers (the ``compile`` extra). Local folders load with ``local_files_only=True``;
a hub id is resolved as transformers resolves it (the hub cache first, ``HF_HUB_OFFLINE``
honoured). Named configs are embedded here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mbcompile.errors import ModelError
from mbcompile.heads import HEADS, head_class_name, head_of_class
from mbcompile.hub import hub_offline, is_hub_id

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


def float32_model(model, log=None):
    """``model`` with float32 weights: ``model`` itself when every floating parameter and
    buffer is float32 (or it is an ONNX model), else a converted copy, said in ``log`` (the
    caller's model is left as it is).

    Checkpoints on the hub are often stored in float16 or bfloat16, and transformers 5 loads
    them in the stored dtype; a model may also have been ``.half()``-ed by its user. mbcompile
    captures float32 numerics (``precision`` then picks the matmuls' dtype), and the accuracy
    check compares with this float32 model."""
    import copy

    import torch

    if not hasattr(model, "parameters"):  # an ONNX model (capture.onnx_model checks its own)
        return model
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return model
    if log is not None:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors
                         if t.is_floating_point()})
        log(f"capture: the model's weights are {'+'.join(dtypes)}; compiling a float32 copy "
            "of it (precision= picks the matmuls' dtype)")
    return copy.deepcopy(model).float()


def load_checkpoint(path: str | os.PathLike, head: str | None = None, revision: str | None = None):
    """Load a MobileBERT checkpoint as ``head``: a local folder (config.json + weights), or a
    Hugging Face hub id (``google/mobilebert-uncased``) resolved as transformers does: the local
    hub cache first, ``HF_HUB_OFFLINE`` honoured, a download only when online and allowed.
    ``revision``: a hub branch, tag or commit (default ``main``).

    Without ``head``, the head is the one named in the checkpoint's ``architectures``.
    """
    import torch
    from transformers import AutoConfig

    name = os.fspath(path)
    local = Path(name)
    if local.exists() or not is_hub_id(name):
        if not (local / "config.json").is_file():
            raise ModelError(f"{local}: not a checkpoint folder (no config.json)")
        source, hub = str(local), {"local_files_only": True}
    else:
        offline = hub_offline()
        source, hub = name, {"local_files_only": offline, "revision": revision}
    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except Exception as err:  # noqa: BLE001 - whatever transformers raises on a bad config.json
        raise ModelError(_cannot_load(name, hub, err)) from None
    if config.model_type != "mobilebert":
        raise ModelError(f"{name}: model_type is {config.model_type!r}, not 'mobilebert'")
    if head is None:
        archs = [a for a in (config.architectures or []) if a in HEADS.values()]
        if not archs:
            raise ModelError(
                f"{name}: config.json names no MobileBERT head in 'architectures'; "
                f"choose one with head=..., one of {list(HEADS)}"
            )
        head = head_of_class(archs[0])
    cls = _head_class(head)
    from transformers.utils import logging as hf_logging

    # transformers 5 draws a "Loading weights" progress bar on stderr: not ours to show
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # in float32 whatever dtype the weights are stored in (see float32_model)
        model = cls.from_pretrained(source, dtype=torch.float32, **hub).eval()
    except Exception as err:  # noqa: BLE001 - a damaged weights file raises anything
        raise ModelError(_cannot_load(name, hub, err)) from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if "revision" in hub and not getattr(model.config, "_commit_hash", None):
        model.config._commit_hash = _cached_commit(name, revision)
    return model


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the hub cache's snapshot that ``revision`` (default ``main``) names."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None


def _cannot_load(name: str, hub: dict, err: Exception) -> str:
    reason = " ".join(str(err).split())[:300]
    if not isinstance(err, (OSError, ValueError)):  # damaged, not missing: say what broke
        return f"{name}: cannot load the checkpoint ({type(err).__name__}: {reason})"
    if "revision" not in hub:
        return f"{name}: cannot load the checkpoint ({reason})"
    where = (
        "the Hugging Face cache has it not and HF_HUB_OFFLINE is set (unset it to download, "
        "or download it first)"
        if hub["local_files_only"]
        else "the Hugging Face hub could not provide it"
    )
    return f"{name}: not a local folder, and {where}: {reason}"


def checkpoint_source(config) -> dict[str, str]:
    """Where a model loaded by transformers came from: ``name_or_path`` (a folder or hub id)
    and, for the hub, the resolved ``revision`` (the commit); {} for a model built in memory."""
    out = {}
    name = getattr(config, "_name_or_path", "") or ""
    if name:
        out["name_or_path"] = str(name)
    commit = getattr(config, "_commit_hash", None)
    if commit:
        out["revision"] = str(commit)
    return out


def checkpoint_folder(config) -> Path | None:
    """The local folder of the checkpoint ``config`` was loaded from: the folder itself, or
    the hub cache's snapshot of the resolved revision; None if there is none."""
    source = checkpoint_source(config)
    name = source.get("name_or_path")
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    if Path(name).is_file():  # an ONNX file: its folder (Optimum saves the tokenizer there)
        return Path(name).parent
    if "revision" not in source or not is_hub_id(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=source["revision"])
    return Path(cached).parent if isinstance(cached, str) else None
