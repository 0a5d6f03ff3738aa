"""Building valid, damaged and crafted artifacts byte by byte, without compiling a model.

``metadata_dict()`` is what a question-answering compile writes (keys of format version 1);
``build_zip`` writes a zip from raw parts (any method, flags, CRC and declared sizes), so a test
can say exactly which header lies; ``write_artifact`` packs a metadata dict and members as
``archive.write`` does, with correct ``members`` hashes unless told otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LIB = bytes(range(256)) * 16  # stands in for lib.so: these tests never load it
TOKENIZER = {
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ncat\n",
    "tokenizer_config.json": b"{}",
}
TARGET = {
    "arch": "x86_64",
    "description": "this machine (x86_64, LLVM cpu haswell)",
    "export": "host-cc",
    "features": ["avx2", "fma"],
    "llvm": {"mcpu": "haswell", "mtriple": "x86_64-linux-gnu"},
    "name": "host",
    "num_cores": None,
}


def signature_dict() -> dict[str, Any]:
    """The signature of a tiny question-answering model at seq_len 16."""
    logits = {"dtype": "float32", "index": None, "masked_axis": None, "seq_axes": [1]}
    return {
        "model_class": "MobileBertForQuestionAnswering",
        "head": "question-answering",
        "batch_size": 1,
        "seq_len": 16,
        "num_choices": None,
        "vocab_size": 211,
        "type_vocab_size": 2,
        "outputs": [
            {"name": "start_logits", "shape": [1, 16], **logits},
            {"name": "end_logits", "shape": [1, 16], **logits},
        ],
        "fields": ["start_logits", "end_logits"],
        "max_masked": None,
        "mask_token_id": None,
        "takes_lengths": True,
    }


def metadata_dict() -> dict[str, Any]:
    """metadata.json's model keys (not format/format_version/members), as compile writes them."""
    sig = signature_dict()
    return {
        "model_class": sig["model_class"],
        "head": sig["head"],
        "signature": sig,
        "config": {"hidden_size": 64, "vocab_size": 211, "id2label": {"0": "LABEL_0"}},
        "target": copy.deepcopy(TARGET),
        "tvm_target": '{"kind": "llvm", "mcpu": "haswell"}',
        "tuning_db": None,
        "tuned_kernels": 0,
        "versions": {"mbcompile": "0.1.0", "tvm": "0.27.0"},
        "report": {"final": {"kernel_calls": 82}, "passes": [{"pass": "FoldNoNorm", "fired": 1}]},
        "compile_seconds": {"build": 2.28, "capture": 2.95},
        "options": {"seq_len": 16, "passes": [], "target": "host"},
    }


def members_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def metadata_json(meta: dict, contents: dict[str, bytes], **file_keys) -> bytes:
    """The full metadata.json: ``meta`` plus format keys and member hashes (overridable)."""
    full = {
        **meta,
        "format": "mbcompile-artifact",
        "format_version": 1,
        "members": {name: members_entry(data) for name, data in contents.items()},
        **file_keys,
    }
    return json.dumps(full, indent=2, sort_keys=True).encode()


def write_artifact(
    path: Path,
    meta: dict | None = None,
    lib: bytes = LIB,
    tokenizer: dict[str, bytes] | None = None,
    text: bytes | None = None,
) -> Path:
    """An artifact zip as archive.write makes it; ``text`` replaces metadata.json verbatim."""
    members = {"lib.so": lib}
    members.update({f"tokenizer/{n}": d for n, d in sorted((tokenizer or {}).items())})
    if text is None:
        text = metadata_json(metadata_dict() if meta is None else meta, members)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("metadata.json", text)
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@dataclass
class Part:
    """One zip member as stored: ``data`` is what lies in the file (compressed or not); the
    other fields are what the headers declare (None: the honest value)."""

    name: str | bytes
    data: bytes
    method: int = zipfile.ZIP_STORED
    flags: int = 0
    crc: int | None = None
    file_size: int | None = None
    compress_size: int | None = None


def build_zip(parts: list[Part]) -> bytes:
    """A zip (no zip64) from raw parts, local and central headers declaring the same."""
    out, central = bytearray(), bytearray()
    for p in parts:
        name = p.name.encode() if isinstance(p.name, str) else p.name
        crc = zlib.crc32(p.data) if p.crc is None else p.crc
        size = len(p.data) if p.file_size is None else p.file_size
        stored = len(p.data) if p.compress_size is None else p.compress_size
        fields = (20, p.flags, p.method, 0, 0x21, crc, stored, size, len(name))
        offset = len(out)
        out += struct.pack("<4s5HLLLHH", b"PK\x03\x04", *fields, 0) + name + p.data
        central += (
            struct.pack("<4s6HLLLHHHHHLL", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, offset) + name
        )
    eocd = struct.pack(
        "<4s4HLLH", b"PK\x05\x06", 0, 0, len(parts), len(parts), len(central), len(out), 0
    )
    return bytes(out + central + eocd)


def artifact_parts(
    meta: dict | None = None, lib: bytes = LIB, tokenizer: dict[str, bytes] | None = None
) -> list[Part]:
    """The parts of a valid artifact, for build_zip (edit one, then build)."""
    members = {"lib.so": lib}
    members.update({f"tokenizer/{n}": d for n, d in sorted((tokenizer or {}).items())})
    text = metadata_json(metadata_dict() if meta is None else meta, members)
    return [Part("metadata.json", text), *(Part(n, d) for n, d in members.items())]


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream that inflates to ``size`` zero bytes (about size/1000 bytes long):
    one fully flushed block of 1 MiB of zeros, repeated."""
    mib = 2**20
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = block.compress(bytes(mib)) + block.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    return one * (size // mib) + last.compress(bytes(size % mib)) + last.flush()


def set_key(data: dict, path: str, value: Any) -> dict:
    """A copy of ``data`` with the value at ``path`` ("signature.outputs.0.shape.1") replaced;
    the value ``DELETE`` removes the key."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return data


DELETE = object()
