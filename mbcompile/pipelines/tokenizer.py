"""Tokenizers for the pipelines: from a local folder, from file contents, and back to files.

The tokenizer of a pipeline is a transformers tokenizer object, a local folder of tokenizer files,
or (default) the tokenizer saved in the artifact, else the one beside the checkpoint the model
was compiled from. Nothing is downloaded: folders load with ``local_files_only=True``.
transformers is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mbcompile import artifact
from mbcompile.errors import PipelineError


def _load_tokenizer_folder(folder: Path, where: str | None = None):
    """A transformers tokenizer from local files only (MobileBERT's tokenizer is BERT's);
    PipelineError naming ``where`` (the folder, or the artifact) and its files when they are
    damaged."""
    try:
        tokenizer = _read_tokenizer_folder(folder)
        tokenizer("a probe . [MASK]")  # damaged vocabularies (no [UNK]) fail only when used
        return tokenizer
    except PipelineError:
        raise
    except Exception as err:  # noqa: BLE001 - json, tokenizers and transformers raise anything
        names = sorted(p.name for p in folder.iterdir() if p.name in artifact.TOKENIZER_FILES)
        raise PipelineError(
            f"tokenizer: cannot read the tokenizer files {names} of {where or folder}: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from None


def _read_tokenizer_folder(folder: Path):
    from transformers import AutoTokenizer, BertTokenizerFast

    if (folder / "tokenizer_config.json").is_file() or (folder / "config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (ValueError, OSError, KeyError):
            pass  # e.g. a config without a tokenizer class: BERT's tokenizer below
    if (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file():
        return BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    raise PipelineError(
        f"tokenizer: {folder} holds no tokenizer files "
        f"(looked for {list(artifact.TOKENIZER_FILES)})"
    )


def _tokenizer_from_files(files: dict[str, bytes], config: dict | None, where: str = "the artifact"):
    """Load a tokenizer from file contents (e.g. an artifact's tokenizer/ members)."""
    with tempfile.TemporaryDirectory(prefix="mbcompile-tokenizer-") as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        if "config.json" not in files:
            # AutoTokenizer finds the tokenizer class through the model type.
            (folder / "config.json").write_text(json.dumps(config or {"model_type": "mobilebert"}))
        return _load_tokenizer_folder(folder, where)


def _files_of_tokenizer(tokenizer) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for a tokenizer object, by name."""
    with tempfile.TemporaryDirectory(prefix="mbcompile-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _checkpoint_tokenizer_files(config: dict) -> dict[str, bytes]:
    """Tokenizer files beside the checkpoint a model was compiled from (its config's
    ``_name_or_path``), if that folder is here (for artifacts saved before compile recorded
    them)."""
    source = config.get("_name_or_path") or ""
    return artifact.tokenizer_files(source) if source else {}
