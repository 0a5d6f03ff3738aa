"""The saved artifact: one zip file with the compiled library and its metadata.

Members: ``metadata.json`` (format marker and version, model class, head, config, input/output
signature, target, mbcompile/TVM versions, SHA-256 of every other member), ``lib.so`` (the
compiled library; weights are linked into it as constants) and, optionally, the tokenizer's files
under ``tokenizer/`` (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` ...), so that
``mbcompile.pipeline("fill-mask", "model.mbc")`` needs nothing else. Saving writes a temporary file
beside the destination and renames it, so a reader never sees half an artifact.

Artifacts without tokenizer files (all those written before the member existed) read as before;
readers that predate it ignore the extra members.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArtifactError

FORMAT = "mbcompile-artifact"
FORMAT_VERSION = 1
LIB_MEMBER = "lib.so"
META_MEMBER = "metadata.json"
TOKENIZER_PREFIX = "tokenizer/"
# The files of a BERT-style tokenizer that a checkpoint folder may hold (MobileBERT uses BERT's).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass
class Artifact:
    metadata: dict
    lib: bytes
    # Tokenizer file name (e.g. "vocab.txt") → contents; empty when the artifact has none.
    tokenizer: dict[str, bytes] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_plain_file_name(name: str) -> bool:
    """A bare file name: extracting it into a folder cannot land anywhere else."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _check_tokenizer_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    out = {}
    for name, data in files.items():
        if not _is_plain_file_name(name):
            raise ValueError(
                f"tokenizer file name {name!r} must be a bare file name, e.g. 'vocab.txt'"
            )
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"tokenizer file {name!r}: expected bytes, got {type(data).__name__}")
        out[name] = bytes(data)
    return out


def tokenizer_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files (``TOKENIZER_FILES``) found in a checkpoint folder; {} if none, or if
    ``folder`` is not a folder here."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def write(
    path: str | os.PathLike,
    metadata: dict,
    lib: bytes,
    tokenizer: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the artifact atomically; returns its path.

    ``tokenizer`` maps file names ("vocab.txt", "tokenizer.json", ...) to their contents; they are
    stored under ``tokenizer/`` with their SHA-256 in the metadata, like the library.
    """
    path = Path(path)
    files = _check_tokenizer_files(tokenizer or {})
    meta = dict(metadata)
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    members = {LIB_MEMBER: lib}
    members.update({TOKENIZER_PREFIX + name: data for name, data in sorted(files.items())})
    meta["members"] = {m: {"sha256": sha256(d), "bytes": len(d)} for m, d in members.items()}
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(META_MEMBER, json.dumps(meta, indent=2, sort_keys=True))
            for member, data in members.items():
                zf.writestr(member, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _read_metadata(zf: zipfile.ZipFile, path: Path) -> dict:
    """Check the format marker and version; every member the metadata lists must be present."""
    names = set(zf.namelist())
    if META_MEMBER not in names:
        raise ArtifactError(f"{path}: not an mbcompile artifact (no {META_MEMBER})")
    meta = json.loads(zf.read(META_MEMBER))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an mbcompile artifact (format marker missing)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is not supported by this "
            f"mbcompile (reads version {FORMAT_VERSION}); recompile the model"
        )
    members = meta.get("members", {})
    if not isinstance(members, dict) or LIB_MEMBER not in names or LIB_MEMBER not in members:
        raise ArtifactError(f"{path}: artifact has no compiled library ({LIB_MEMBER})")
    for member in members:
        if member not in names:
            raise ArtifactError(f"{path}: member {member!r} listed in the metadata is missing")
        if member.startswith(TOKENIZER_PREFIX) and not _is_plain_file_name(
            member[len(TOKENIZER_PREFIX) :]
        ):
            raise ArtifactError(f"{path}: bad tokenizer member name {member!r}")
    return meta


def _verified(path: Path, meta: dict, member: str, data: bytes) -> bytes:
    entry = meta["members"][member]
    if not isinstance(entry, dict) or sha256(data) != entry.get("sha256"):
        raise ArtifactError(f"{path}: {member} fails its SHA-256 check: the file is corrupt")
    return data


def _read(path: str | os.PathLike, with_lib: bool) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = _read_metadata(zf, path)
            lib = zf.read(LIB_MEMBER) if with_lib else b""
            raw_tokenizer = {
                m[len(TOKENIZER_PREFIX) :]: (m, zf.read(m))
                for m in meta["members"]
                if m.startswith(TOKENIZER_PREFIX)
            }
    except zipfile.BadZipFile as err:
        raise ArtifactError(f"{path}: not an mbcompile artifact or corrupt ({err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: corrupt metadata ({err})") from None
    except (zipfile.LargeZipFile, OSError, EOFError) as err:
        raise ArtifactError(f"{path}: cannot read artifact ({err})") from None
    if with_lib:
        _verified(path, meta, LIB_MEMBER, lib)
    tokenizer = {name: _verified(path, meta, m, d) for name, (m, d) in raw_tokenizer.items()}
    return Artifact(metadata=meta, lib=lib, tokenizer=tokenizer)


def read(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact; ArtifactError names what is wrong with it."""
    return _read(path, with_lib=True)


def read_tokenizer(path: str | os.PathLike) -> dict[str, bytes]:
    """Only the artifact's tokenizer files (verified; the library is not read); {} if none."""
    return _read(path, with_lib=False).tokenizer


def add_tokenizer(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Rewrite an artifact (atomically) with these tokenizer files, replacing any it had."""
    art = read(path)
    return write(path, art.metadata, art.lib, tokenizer=files)
