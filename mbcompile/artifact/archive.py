"""The saved artifact: one zip file with the compiled library and its metadata.

(Longer than 400 lines: writing and reading stay together because they share the member
layout, the size limits and the reasons behind each check; the metadata's checks are in
metadata.py.)

Members: ``metadata.json`` (format marker and version, model class, head, config, input/output
signature, target, mbcompile/TVM versions, SHA-256 and size of every other member), ``lib.so``
(the compiled library; weights are linked into it as constants) and, optionally, the tokenizer's
files under ``tokenizer/`` (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` ...), so
that ``mbcompile.pipeline("fill-mask", "model.mbc")`` needs nothing else.

Saving writes an unnamed file in the destination folder (``O_TMPFILE``) and links it into place
when complete, so a reader never sees half an artifact and a save killed midway leaves nothing
behind; where the file system cannot, a named temporary file beside the destination is renamed
instead. Saved files get the mode ``0o666 & ~umask``, as any file the process creates.

Reading trusts nothing in the file. Every fault is an ArtifactError naming the file, the member
or metadata key, and what was expected. Members are stored (we never compress: ``lib.so`` is
mostly float weights), so each member's declared size is checked against the metadata, a bound,
and the file's own size before a byte of it is read, and reading is bounded by that size: a zip
declaring gigabytes is refused at once, with no large allocation.

Trust: ``lib.so`` is native code that runs when the model is called. The SHA-256s in the
metadata catch damage (a flipped bit, a truncated copy), not an attacker, who can rewrite them;
``read(path, expected_sha256=...)`` pins the whole file to a digest the caller already trusts,
checked on the same open file that is then read (a file renamed into place after the check
is not the one read).

Artifacts without tokenizer files (all those written before the member existed) read as before;
readers that predate it ignore the extra members.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mbcompile.artifact.metadata import FILE_KEYS, Metadata, invalid
from mbcompile.errors import ArtifactError

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
# Largest metadata.json read (the full model's is about 30 kB).
MAX_METADATA_BYTES = 16 * 2**20
# Largest tokenizer file read (BERT's tokenizer.json is 0.7 MB; big multilingual ones near 20).
MAX_TOKENIZER_BYTES = 64 * 2**20
# What zipfile raises on a crafted or damaged file besides BadZipFile: an unsupported method
# (NotImplementedError), encryption (RuntimeError), bad deflate data (zlib.error), bad names
# (UnicodeDecodeError), and short or impossible headers (EOFError, struct.error, OverflowError,
# ValueError, OSError). Converted to ArtifactError where the zip is read, and only there.
_ZIP_FAULTS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    EOFError,
    struct.error,
    OverflowError,
    ValueError,
    OSError,
)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CHUNK = 2**20


@dataclass
class Artifact:
    """A compiled model as bytes: what the compile driver makes and what a file holds."""

    metadata: Metadata
    lib: bytes
    # Tokenizer file name (e.g. "vocab.txt") → contents; empty when the artifact has none.
    tokenizer: dict[str, bytes] = field(default_factory=dict)

    @property
    def lib_sha256(self) -> str:
        return sha256(self.lib)

    def save(self, path: str | os.PathLike) -> Path:
        """Write this artifact to ``path`` (atomically); see :func:`write`."""
        return write(path, self.metadata, self.lib, tokenizer=self.tokenizer)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the whole file (hex), e.g. to pin with ``read(path, expected_sha256=)``."""
    path = Path(path)
    with _open(path) as file:
        return _hash_file(file)


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


# -- writing ----------------------------------------------------------------------------------


def write(
    path: str | os.PathLike,
    metadata: Metadata,
    lib: bytes,
    tokenizer: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the artifact atomically; returns its path.

    ``tokenizer`` maps file names ("vocab.txt", "tokenizer.json", ...) to their contents; they are
    stored under ``tokenizer/`` with their SHA-256 in the metadata, like the library.
    """
    path = _writable(path)
    files = _check_tokenizer_files(tokenizer or {})
    meta = metadata.to_dict()
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    members = {LIB_MEMBER: lib}
    members.update({TOKENIZER_PREFIX + name: data for name, data in sorted(files.items())})
    meta["members"] = {m: {"sha256": sha256(d), "bytes": len(d)} for m, d in members.items()}
    text = json.dumps(meta, indent=2, sort_keys=True)
    try:
        (path.parent if str(path.parent) else Path(".")).mkdir(parents=True, exist_ok=True)
        with _new_file(path) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(META_MEMBER, text)
            for member, data in members.items():
                zf.writestr(member, data)
    except OSError as err:  # the reason only: the temporary file's name means nothing to a user
        raise ArtifactError(
            f"{path}: cannot write the artifact ({err.strerror or type(err).__name__})"
        ) from None
    return path


def _writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or ArtifactError when it cannot name an artifact file: empty, a
    folder, or anything but a regular file already there (a device such as /dev/null, a pipe,
    a socket), which the atomic rename would replace."""
    text = os.fspath(path)
    if not text or text.endswith(os.sep) or Path(text).name in ("", ".", ".."):
        raise ArtifactError(f"{text!r}: not a file name to save an artifact as")
    path = Path(text)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder: give the artifact's file path in it")
    if os.path.lexists(path) and not path.is_file():
        raise ArtifactError(
            f"{path}: is not a regular file (a device, pipe or socket), which saving would "
            "replace: give a file path"
        )
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ArtifactError(f"{path}: {parent} is a file, not a folder")
            break
    return path


@contextmanager
def _new_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` (replacing what was there) only once the block completes.

    Linux: an unnamed file in the destination folder (``O_TMPFILE``), linked under a temporary
    name and renamed over ``path`` at the end, so a kill at any earlier point leaves nothing (the
    kernel frees an unnamed file with its last descriptor). Elsewhere, or on a file system without
    ``O_TMPFILE``: a named temporary file beside ``path``, removed on error (a kill leaves it).
    """
    folder = path.parent if str(path.parent) else Path(".")
    fd = _open_unnamed(folder)
    named = None
    if fd is None:
        named = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            if named is None:
                named = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
                _link(out.fileno(), named)
        os.replace(named, path)
    except BaseException:
        if named is not None:
            named.unlink(missing_ok=True)
        raise


def _link(fd: int, name: Path) -> None:
    """Give the unnamed file open as ``fd`` the name ``name``. (``os.link`` calls linkat, which
    can follow /proc's symlink to the file, only when given a folder descriptor; plain link()
    would try to link the symlink itself and fail with EXDEV.)"""
    folder = os.open(name.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", name.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _open_unnamed(folder: Path) -> int | None:
    """A write descriptor of a new unnamed file in ``folder`` (mode 0o666 & ~umask), or None
    where the platform or the file system has no ``O_TMPFILE``."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):  # linked through /proc at the end
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o666)
    except OSError as err:
        # EOPNOTSUPP: this file system cannot; EISDIR: a kernel older than 3.11.
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


# -- reading ----------------------------------------------------------------------------------


@contextmanager
def _open(path: Path) -> Iterator[BinaryIO]:
    if not path.is_file():
        what = "a folder, not an artifact file" if path.is_dir() else "no such artifact file"
        raise ArtifactError(f"{path}: {what}")
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, after the checks
    except OSError as err:
        raise ArtifactError(f"{path}: cannot open the artifact ({err.strerror})") from None
    with file:
        yield file


def _hash_file(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _pinned(path: Path, expected_sha256: Any) -> str:
    if not isinstance(expected_sha256, str) or not _SHA256.fullmatch(expected_sha256):
        raise ArtifactError(
            f"{path}: expected_sha256 {expected_sha256!r} is not a SHA-256; expected 64 "
            f"hexadecimal digits, as printed by `sha256sum` or mbcompile.artifact.file_sha256"
        )
    return expected_sha256.lower()


@contextmanager
def _zip_faults(path: Path, what: str) -> Iterator[None]:
    """Turn the exceptions zipfile raises on a damaged file into ArtifactError naming ``what``."""
    try:
        yield
    except ArtifactError:
        raise
    except _ZIP_FAULTS as err:
        raise ArtifactError(
            f"{path}: {what} cannot be read ({type(err).__name__}: {err}); the file is corrupt "
            f"or not an mbcompile artifact"
        ) from None


def _entries(path: Path, zf: zipfile.ZipFile, size: int) -> dict[str, zipfile.ZipInfo]:
    """The zip's members by name; refused if a name repeats or the declared sizes cannot fit."""
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in entries:
            raise ArtifactError(f"{path}: member {info.filename!r} appears twice in the zip")
        entries[info.filename] = info
    declared = sum(info.compress_size for info in entries.values())
    if declared > size:
        largest = max(entries.values(), key=lambda info: info.compress_size)
        raise ArtifactError(
            f"{path}: the zip declares {declared} bytes of members (member "
            f"{largest.filename!r}: {largest.compress_size} bytes) in a file of {size} bytes; "
            f"the file is truncated or crafted"
        )
    return entries


def _check_entry(path: Path, info: zipfile.ZipInfo, size: int, limit: tuple[int, str]) -> None:
    """Before reading: a member is stored, unencrypted, no larger than ``limit`` (bytes, and what
    they are) and inside the ``size`` bytes of the file."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise ArtifactError(f"{path}: member {name!r} is encrypted; artifacts never are")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ArtifactError(
            f"{path}: member {name!r} uses zip compression method {info.compress_type}; "
            f"mbcompile stores members uncompressed (method 0): re-save the artifact with "
            f"mbcompile, or repack it with `zip -0`"
        )
    if info.file_size > limit[0]:
        raise ArtifactError(
            f"{path}: member {name!r} declares {info.file_size} bytes; expected at most "
            f"{limit[0]} ({limit[1]})"
        )
    if info.compress_size != info.file_size or info.header_offset + info.file_size > size:
        raise ArtifactError(
            f"{path}: member {name!r} declares {info.file_size} bytes stored in "
            f"{info.compress_size} from offset {info.header_offset}, which does not fit in the "
            f"file's {size} bytes; the file is truncated or crafted"
        )


def _read_entry(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member already checked by :func:`_check_entry`, reading no more than it declares."""
    with _zip_faults(path, f"member {info.filename!r}"), zf.open(info) as member:
        data = member.read(info.file_size)
    if len(data) != info.file_size:
        raise ArtifactError(
            f"{path}: member {info.filename!r} holds {len(data)} bytes, not the "
            f"{info.file_size} it declares; the file is corrupt"
        )
    return data


def _parse_metadata(path: Path, raw: bytes) -> dict:
    where = f"{path}: {META_MEMBER}"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{where} is not UTF-8 text ({err})") from None
    except RecursionError:
        raise ArtifactError(f"{where} nests too deeply to parse; expected JSON metadata") from None
    except ValueError as err:  # JSONDecodeError; integers of more than 4300 digits
        raise ArtifactError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an mbcompile artifact (format marker missing)")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is not supported by this "
            f"mbcompile (reads version {FORMAT_VERSION}); recompile the model"
        )
    return meta


def _listed_members(path: Path, meta: dict) -> dict[str, tuple[str, int]]:
    """metadata.json's ``members``: name → (sha256, bytes), every value checked."""
    where = f"{path}: {META_MEMBER}"
    members = meta.get("members")
    if not isinstance(members, dict) or LIB_MEMBER not in members:
        raise ArtifactError(f"{path}: artifact has no compiled library ({LIB_MEMBER})")
    out = {}
    for name, entry in members.items():
        key = f"members[{name!r}]"
        if name.startswith(TOKENIZER_PREFIX) and not _is_plain_file_name(
            name[len(TOKENIZER_PREFIX) :]
        ):
            raise ArtifactError(f"{path}: bad tokenizer member name {name!r}")
        if not isinstance(entry, dict):
            raise invalid(where, key, entry, 'an object {"sha256": ..., "bytes": ...}')
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise invalid(where, f"{key}.sha256", digest, "64 hexadecimal digits")
        if type(size) is not int or size < 0:
            raise invalid(where, f"{key}.bytes", size, "an integer >= 0")
        out[name] = (digest.lower(), size)
    return out


def _check_listed(
    path: Path, entries: dict[str, zipfile.ZipInfo], listed: dict[str, tuple[str, int]], size: int
) -> None:
    """Every member the metadata lists is in the zip, within its bound and of the size the
    metadata says, before any of them is read."""
    for name, (_, nbytes) in listed.items():
        if name not in entries:
            raise ArtifactError(f"{path}: member {name!r} listed in the metadata is missing")
        info = entries[name]
        if name.startswith(TOKENIZER_PREFIX):
            _check_entry(path, info, size, (MAX_TOKENIZER_BYTES, "the bound"))
        else:
            _check_entry(path, info, size, (size, "the size of the whole file"))
        if info.file_size != nbytes:
            raise ArtifactError(
                f"{path}: member {name!r} declares {info.file_size} bytes in the zip; "
                f"the metadata says {nbytes}: the file is corrupt or crafted"
            )


def _read(path: str | os.PathLike, with_lib: bool, expected_sha256: str | None = None) -> Artifact:
    path = Path(path)
    pin = None if expected_sha256 is None else _pinned(path, expected_sha256)
    with _open(path) as file:
        size = os.fstat(file.fileno()).st_size
        if pin is not None:
            actual = _hash_file(file)
            if actual != pin:
                raise ArtifactError(
                    f"{path}: SHA-256 is {actual}, expected {pin}: this is not the pinned "
                    f"artifact (damaged, replaced or another build); refusing to read it"
                )
            file.seek(0)
        with _zip_faults(path, "the zip directory"):
            zf = zipfile.ZipFile(file)
        with zf:
            entries = _entries(path, zf, size)
            if META_MEMBER not in entries:
                raise ArtifactError(f"{path}: not an mbcompile artifact (no {META_MEMBER})")
            _check_entry(path, entries[META_MEMBER], size, (MAX_METADATA_BYTES, "the bound"))
            meta = _parse_metadata(path, _read_entry(path, zf, entries[META_MEMBER]))
            listed = _listed_members(path, meta)
            _check_listed(path, entries, listed, size)
            model = Metadata.from_dict(
                {k: v for k, v in meta.items() if k not in FILE_KEYS}, f"{path}: {META_MEMBER}"
            )
            wanted = [n for n in listed if n.startswith(TOKENIZER_PREFIX)]
            if with_lib:
                wanted.insert(0, LIB_MEMBER)
            contents = {}
            for name in wanted:
                data = _read_entry(path, zf, entries[name])
                if sha256(data) != listed[name][0]:
                    raise ArtifactError(
                        f"{path}: {name} fails its SHA-256 check: the file is corrupt"
                    )
                contents[name] = data
    tokenizer = {
        n[len(TOKENIZER_PREFIX) :]: d for n, d in contents.items() if n.startswith(TOKENIZER_PREFIX)
    }
    return Artifact(model, lib=contents.get(LIB_MEMBER, b""), tokenizer=tokenizer)


def read(path: str | os.PathLike, expected_sha256: str | None = None) -> Artifact:
    """Read and verify an artifact; ArtifactError names what is wrong with it.

    ``expected_sha256`` (64 hex digits, any case): the SHA-256 the whole file must have, checked
    before anything in it is parsed; a deployment pins the exact artifact it shipped this way.
    """
    return _read(path, with_lib=True, expected_sha256=expected_sha256)


def read_tokenizer(path: str | os.PathLike) -> dict[str, bytes]:
    """Only the artifact's tokenizer files (verified; the library is not read); {} if none."""
    return _read(path, with_lib=False).tokenizer


def add_tokenizer(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Rewrite an artifact (atomically) with these tokenizer files, replacing any it had."""
    art = read(path)
    return write(path, art.metadata, art.lib, tokenizer=files)
