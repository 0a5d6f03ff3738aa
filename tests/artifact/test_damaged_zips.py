"""Damaged and crafted zips: every one ends in an ArtifactError that names the file and the
member, and declared sizes are refused before anything large is read.

(The comments say what the reader before issue 14 raised instead.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
from crafting import (
    LIB,
    TOKENIZER,
    Part,
    artifact_parts,
    build_zip,
    deflated_zeros,
    metadata_dict,
    metadata_json,
    write_artifact,
)

from mbcompile import artifact
from mbcompile.artifact import MAX_METADATA_BYTES, MAX_TOKENIZER_BYTES
from mbcompile.errors import ArtifactError, MbcompileError


def _refused(path, *fragments: str) -> str:
    """Read ``path`` (and only its tokenizer), expect ArtifactError naming the file and each
    fragment; returns the message."""
    for read in (artifact.read, artifact.read_tokenizer):
        with pytest.raises(ArtifactError) as caught:
            read(path)
        message = str(caught.value)
        assert str(path) in message
        for fragment in fragments:
            assert fragment in message, message
    return message


def _zip(tmp_path, parts, name="crafted.mbc"):
    path = tmp_path / name
    path.write_bytes(build_zip(parts))
    return path


def _edit(parts, name, **changes):
    """The parts with the one named ``name`` changed."""
    return [Part(**{**vars(p), **changes}) if p.name == name else p for p in parts]


def test_artifact_error_is_an_mbcompile_error_and_a_value_error():
    assert issubclass(ArtifactError, MbcompileError)
    assert issubclass(ArtifactError, ValueError)


def test_built_zip_is_a_valid_artifact(tmp_path):
    path = _zip(tmp_path, artifact_parts(tokenizer=TOKENIZER))
    art = artifact.read(path)
    assert art.lib == LIB and art.tokenizer == TOKENIZER


@pytest.mark.parametrize(
    "method, label",
    [
        (zipfile.ZIP_DEFLATED, "method 8"),
        (zipfile.ZIP_BZIP2, "method 12"),
        (zipfile.ZIP_LZMA, "method 14"),
    ],
)
def test_compressed_member_is_refused_with_the_method(tmp_path, method, label):
    path = tmp_path / "compressed.mbc"
    with (
        zipfile.ZipFile(write_artifact(tmp_path / "plain.mbc")) as src,
        zipfile.ZipFile(path, "w") as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=method)
    _refused(path, "'metadata.json'", label, "uncompressed")


@pytest.mark.parametrize("method", [99, 77])  # AES; unknown
def test_unknown_compression_method_is_refused(tmp_path, method):
    # was NotImplementedError: That compression method is not supported
    path = _zip(tmp_path, _edit(artifact_parts(), "lib.so", method=method))
    message = _refused(path, "'lib.so'", f"method {method}")
    assert "re-save" in message


def test_encrypted_member_is_refused(tmp_path):
    # was RuntimeError: File 'lib.so' is encrypted, password required for extraction
    path = _zip(tmp_path, _edit(artifact_parts(), "lib.so", flags=0x1))
    _refused(path, "'lib.so'", "encrypted")


def test_bad_crc_is_refused_as_corrupt(tmp_path):
    path = _zip(tmp_path, _edit(artifact_parts(), "lib.so", crc=12345))
    with pytest.raises(ArtifactError, match=r"'lib.so'.*CRC.*corrupt"):
        artifact.read(path)


def test_bad_deflate_data_is_refused(tmp_path):
    # was zlib.error: Error -3 while decompressing data (also refused as a compressed member)
    parts = _edit(artifact_parts(), "lib.so", method=zipfile.ZIP_DEFLATED, file_size=len(LIB))
    _refused(_zip(tmp_path, _edit(parts, "lib.so", data=b"\xff" * 64)), "'lib.so'")


def test_member_name_that_is_not_utf8_is_refused(tmp_path):
    # was UnicodeDecodeError: the name flag says UTF-8, the bytes are not
    parts = [*artifact_parts(), Part(b"\xff\xfe.bin", b"x", flags=0x800)]
    _refused(_zip(tmp_path, parts), "zip directory", "UnicodeDecodeError")


def test_repeated_member_is_refused(tmp_path):
    parts = artifact_parts()
    other = json.loads(parts[0].data)
    other["signature"]["seq_len"] = 8
    parts.append(Part("metadata.json", json.dumps(other).encode()))
    _refused(_zip(tmp_path, parts), "'metadata.json' appears twice")


def test_central_directory_past_the_end_is_refused(tmp_path):
    data = bytearray(build_zip(artifact_parts()))
    data[-10:-6] = (len(data) * 4).to_bytes(4, "little")  # central directory size
    path = tmp_path / "crafted.mbc"
    path.write_bytes(bytes(data))
    _refused(path, "zip directory")


@pytest.mark.parametrize("keep", [0, 22, 100, 3000, -200, -46, -1])
def test_truncated_zip_is_refused(tmp_path, keep):
    data = build_zip(artifact_parts(tokenizer=TOKENIZER))
    path = tmp_path / "short.mbc"
    path.write_bytes(data[:keep])
    _refused(path)


def test_folder_is_not_an_artifact(tmp_path):
    _refused(tmp_path, "a folder")


# -- declared sizes ---------------------------------------------------------------------------


def test_metadata_declared_larger_than_its_bound_is_refused(tmp_path):
    size = MAX_METADATA_BYTES + 1
    parts = _edit(artifact_parts(), "metadata.json", file_size=size)
    _refused(_zip(tmp_path, parts), "'metadata.json'", f"declares {size} bytes", "at most")


def test_tokenizer_file_larger_than_its_bound_is_refused(tmp_path):
    size = MAX_TOKENIZER_BYTES + 1
    parts = _edit(artifact_parts(tokenizer=TOKENIZER), "tokenizer/vocab.txt", file_size=size)
    _refused(_zip(tmp_path, parts), "'tokenizer/vocab.txt'", f"expected at most {size - 1}")


def test_member_larger_than_the_metadata_says_is_refused(tmp_path):
    meta = json.loads(metadata_json(metadata_dict(), {"lib.so": LIB}))
    meta["members"]["lib.so"]["bytes"] = 100
    path = write_artifact(tmp_path / "x.mbc", text=json.dumps(meta).encode())
    _refused(path, "'lib.so'", f"declares {len(LIB)} bytes", "the metadata says 100")


def test_declared_sizes_larger_than_the_file_are_refused(tmp_path):
    parts = artifact_parts(tokenizer=TOKENIZER)
    size = len(build_zip(parts))
    declared = size - 100
    crafted = _zip(tmp_path, _edit(parts, "lib.so", file_size=declared, compress_size=declared))
    message = _refused(crafted, f"in a file of {size} bytes")
    assert "declares" in message


def test_member_running_past_the_end_of_the_file_is_refused(tmp_path):
    parts = artifact_parts()
    data = build_zip(parts)
    # the library's bytes are there, but the file ends before its central directory says
    path = tmp_path / "cut.mbc"
    cut = data.index(LIB) + len(LIB) // 2
    path.write_bytes(data[:cut] + data[-22:])
    _refused(path)


_MEMORY_PROBE = textwrap.dedent(
    """
    import re, resource, sys, time
    from mbcompile import artifact
    from mbcompile.errors import ArtifactError

    status = open("/proc/self/status").read()
    vm = int(re.search(r"VmSize:\\s+(\\d+) kB", status).group(1)) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # 256 MiB more address space than the imports took: any large allocation fails
    resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))
    start = time.perf_counter()
    try:
        artifact.read(sys.argv[1])
        outcome = "read"
    except ArtifactError as err:
        outcome = "ArtifactError: " + str(err)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    print(outcome)
    print(seconds, grown)
    """
)


def _probe(path) -> tuple[str, float, int]:
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, numbers = done.stdout.strip().splitlines()
    seconds, grown_kib = numbers.split()
    return outcome, float(seconds), int(grown_kib)


@pytest.mark.parametrize("stored_size", [len(LIB), 2**32 - 2])
def test_zip_declaring_4_gb_is_refused_quickly_with_little_memory(tmp_path, stored_size):
    # was: zf.read asked for the whole declared size at once (MemoryError under this limit)
    size = 2**32 - 2
    meta = json.loads(metadata_json(metadata_dict(), {"lib.so": LIB}))
    meta["members"]["lib.so"]["bytes"] = size  # the metadata agrees with the zip
    lib = Part("lib.so", LIB, file_size=size, compress_size=stored_size)
    stored = _zip(tmp_path, [Part("metadata.json", json.dumps(meta).encode()), lib])
    outcome, seconds, grown_kib = _probe(stored)
    assert outcome.startswith("ArtifactError"), outcome
    assert "'lib.so'" in outcome and "4294967294 bytes" in outcome, outcome
    assert seconds < 2 and grown_kib < 32 * 1024


def test_zip_bomb_of_4_gb_is_refused_quickly_with_little_memory(tmp_path):
    # was: inflated in full (8 GB of memory before it was refused)
    size = 2**32 - 2
    meta = json.loads(metadata_json(metadata_dict(), {"lib.so": LIB}))
    meta["members"]["lib.so"]["bytes"] = size
    bomb = Part("lib.so", deflated_zeros(size), method=zipfile.ZIP_DEFLATED, file_size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _zip(tmp_path, [Part("metadata.json", json.dumps(meta).encode()), bomb], "bomb.mbc")
    assert path.stat().st_size < 8 * 2**20
    outcome, seconds, grown_kib = _probe(path)
    assert outcome.startswith("ArtifactError") and "'lib.so'" in outcome, outcome
    assert seconds < 2 and grown_kib < 32 * 1024


# -- metadata.json that is not metadata -------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),  # was RecursionError
        (b'{"format_version": ' + b"9" * 5000 + b"}", "not valid JSON"),  # was ValueError
        (b"[]", "format marker missing"),
        (b'{"format": "mbcompile-artifact", "format_version": true}', "format version True"),
        (b'{"format": "mbcompile-artifact", "format_version": "1"}', "format version '1'"),
    ],
)
def test_metadata_that_is_not_metadata_is_refused(tmp_path, text, fragment):
    _refused(write_artifact(tmp_path / "x.mbc", text=text), fragment)


@pytest.mark.parametrize(
    "members, fragment",
    [
        ([], "no compiled library"),
        ({"tokenizer/vocab.txt": {}}, "no compiled library"),
        ({"lib.so": "abc"}, "members['lib.so'] is 'abc'"),
        ({"lib.so": {"bytes": 4096}}, "members['lib.so'].sha256 is None"),
        ({"lib.so": {"sha256": "0" * 63, "bytes": 4096}}, "64 hexadecimal digits"),
        ({"lib.so": {"sha256": "0" * 64, "bytes": "4096"}}, "members['lib.so'].bytes is '4096'"),
        ({"lib.so": {"sha256": "0" * 64, "bytes": -1}}, "an integer >= 0"),
        ({"lib.so": {"sha256": "0" * 64, "bytes": True}}, "members['lib.so'].bytes is True"),
        ({"lib.so": {"sha256": "0" * 64, "bytes": 4096}}, "lib.so fails its SHA-256 check"),
    ],
)
def test_malformed_member_list_is_refused(tmp_path, members, fragment):
    # was KeyError / TypeError / AttributeError
    text = metadata_json(metadata_dict(), {}, members=members)
    path = write_artifact(tmp_path / "x.mbc", text=text)
    with pytest.raises(ArtifactError) as caught:
        artifact.read(path)
    assert str(path) in str(caught.value) and fragment in str(caught.value), str(caught.value)
