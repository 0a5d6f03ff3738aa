"""Stage 4, the artifact: a compiled model as bytes, and as one file.

``metadata`` is the typed description of the model (signature, config, target, versions,
compile report), checked key by key when read; ``archive`` reads and writes the ``.mbc`` zip
(library, metadata, tokenizer files, SHA-256 and size of each member), refusing any damaged or
crafted file with an ArtifactError. ``read(path, expected_sha256=...)`` pins the whole file.

An artifact is native code that runs when the model is called: load only artifacts you trust.
"""

from mbcompile.artifact.archive import (
    FORMAT,
    FORMAT_VERSION,
    LIB_MEMBER,
    MAX_METADATA_BYTES,
    MAX_TOKENIZER_BYTES,
    META_MEMBER,
    TOKENIZER_FILES,
    TOKENIZER_PREFIX,
    Artifact,
    add_tokenizer,
    file_sha256,
    read,
    read_tokenizer,
    sha256,
    tokenizer_files,
    write,
)
from mbcompile.artifact.metadata import Metadata
from mbcompile.errors import ArtifactError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIB_MEMBER",
    "MAX_METADATA_BYTES",
    "MAX_TOKENIZER_BYTES",
    "META_MEMBER",
    "TOKENIZER_FILES",
    "TOKENIZER_PREFIX",
    "Artifact",
    "ArtifactError",
    "Metadata",
    "add_tokenizer",
    "file_sha256",
    "read",
    "read_tokenizer",
    "sha256",
    "tokenizer_files",
    "write",
]
