"""The saved artifact: one zip file with the compiled library and its metadata.

Members: ``metadata.json`` (format marker and version, model class, head, config, input/output
signature, target, mbcompile/TVM versions, SHA-256 of every other member) and ``lib.so`` (the
compiled library; weights are linked into it as constants). Saving writes a temporary file beside
the destination and renames it, so a reader never sees half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError

FORMAT = "mbcompile-artifact"
FORMAT_VERSION = 1
LIB_MEMBER = "lib.so"
META_MEMBER = "metadata.json"


@dataclass
class Artifact:
    metadata: dict
    lib: bytes


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: str | os.PathLike, metadata: dict, lib: bytes) -> Path:
    """Write the artifact atomically; returns its path."""
    path = Path(path)
    meta = dict(metadata)
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    meta["members"] = {LIB_MEMBER: {"sha256": sha256(lib), "bytes": len(lib)}}
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(META_MEMBER, json.dumps(meta, indent=2, sort_keys=True))
            zf.writestr(LIB_MEMBER, lib)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact; ArtifactError names what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with zipfile.ZipFile(path) as zf:
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
            if LIB_MEMBER not in names or LIB_MEMBER not in members:
                raise ArtifactError(f"{path}: artifact has no compiled library ({LIB_MEMBER})")
            lib = zf.read(LIB_MEMBER)
    except zipfile.BadZipFile as err:
        raise ArtifactError(f"{path}: not an mbcompile artifact or corrupt ({err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: corrupt metadata ({err})") from None
    except (zipfile.LargeZipFile, OSError, EOFError) as err:
        raise ArtifactError(f"{path}: cannot read artifact ({err})") from None
    if sha256(lib) != members[LIB_MEMBER].get("sha256"):
        raise ArtifactError(f"{path}: {LIB_MEMBER} fails its SHA-256 check: the file is corrupt")
    return Artifact(metadata=meta, lib=lib)
