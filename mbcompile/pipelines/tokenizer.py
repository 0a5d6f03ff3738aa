"""Tokenizers for the pipelines: from a local folder, from file contents, and back to files.

The tokenizer of a pipeline is a transformers tokenizer object (used as given), a local folder
of tokenizer files, or (default) the tokenizer saved in the artifact, else the one beside the
checkpoint the model was compiled from. Files load as a ``FastTokenizer``, on the ``tokenizers``
library alone (``fast_tokenizer.py``): no transformers, no torch. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mbcompile import artifact
from mbcompile.artifact.tokenizer_json import tokenizer_json_from_vocab, tokenizer_settings
from mbcompile.errors import PipelineError
from mbcompile.pipelines.fast_tokenizer import FastTokenizer


def _load_tokenizer_folder(folder: Path, where: str | None = None):
    """The tokenizer of a local folder's files (see ``_tokenizer_from_files``)."""
    files = artifact.tokenizer_files(folder)
    if not files:
        raise PipelineError(
            f"tokenizer: {folder} holds no tokenizer files "
            f"(looked for {list(artifact.TOKENIZER_FILES)})"
        )
    return _tokenizer_from_files(files, None, where or str(folder))


def _tokenizer_from_files(files: dict[str, bytes], config: dict | None, where: str = "the artifact"):
    """A :class:`FastTokenizer` (``tokenizers`` only) from file contents: ``tokenizer.json``,
    or a WordPiece ``vocab.txt`` converted to one; PipelineError naming ``where`` and its files
    when they are damaged (a vocabulary without [UNK] fails only when used, so it is probed)."""
    try:
        settings, special, added = (
            json.loads(files.get(name, b"{}") or b"{}")
            for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
        )
        if not all(isinstance(x, dict) for x in (settings, special, added)):
            raise ValueError(
                "tokenizer_config.json, special_tokens_map.json and added_tokens.json must be "
                "JSON objects"
            )
        settings = tokenizer_settings(files)  # special_tokens_map.json's tokens over them
        # tokens added in tokenizer_config.json (transformers 5 writes them there)
        decoder = settings.get("added_tokens_decoder") or {}
        if isinstance(decoder, dict):
            added = {**{v["content"]: int(k) for k, v in decoder.items()
                        if isinstance(v, dict) and "content" in v}, **added}
        if "tokenizer.json" in files:
            source = files["tokenizer.json"]
        elif "vocab.txt" in files:
            source = tokenizer_json_from_vocab(files["vocab.txt"], settings)
        else:
            raise PipelineError(
                f"tokenizer: {where} holds no tokenizer.json or vocab.txt "
                f"(found {sorted(files)})"
            )
        tokenizer = FastTokenizer(source, settings, special, added)
        tokenizer("a probe . [MASK]")
        return tokenizer
    except PipelineError:
        raise
    except Exception as err:  # noqa: BLE001 - json and tokenizers raise anything
        raise PipelineError(
            f"tokenizer: cannot read the tokenizer files {sorted(files)} of {where}: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from None


def _files_of_tokenizer(tokenizer) -> dict[str, bytes]:
    """The files to store for a tokenizer object: a FastTokenizer's own, or what a transformers
    tokenizer's ``save_pretrained`` writes, by name."""
    if isinstance(tokenizer, FastTokenizer):
        return tokenizer.files()
    with tempfile.TemporaryDirectory(prefix="mbcompile-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _checkpoint_tokenizer_files(config: dict) -> dict[str, bytes]:
    """Tokenizer files beside the checkpoint a model was compiled from (its config's
    ``_name_or_path``), if that folder is here (for artifacts saved before compile recorded
    them)."""
    source = config.get("_name_or_path") or ""
    return artifact.tokenizer_files(source) if source else {}
