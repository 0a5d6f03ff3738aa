"""Pinning: ``read``/``load(path, expected_sha256=...)`` accept only the exact file that was
shipped, checked before anything in it is parsed and before any native code loads."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import crafting
import numpy as np
import pytest

import mbcompile
from mbcompile import artifact, runtime
from mbcompile.errors import ArtifactError


def test_file_sha256_is_the_digest_of_the_whole_file(small_artifact):
    assert (
        artifact.file_sha256(small_artifact)
        == hashlib.sha256(small_artifact.read_bytes()).hexdigest()
    )


def test_file_sha256_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(ArtifactError, match="nothing.mbc: no such artifact file"):
        artifact.file_sha256(tmp_path / "nothing.mbc")


def test_pinned_read_accepts_the_digest_in_any_case(small_artifact):
    digest = artifact.file_sha256(small_artifact)
    plain = artifact.read(small_artifact)
    assert artifact.read(small_artifact, expected_sha256=digest).metadata == plain.metadata
    assert artifact.read(small_artifact, expected_sha256=digest.upper()).lib == plain.lib


def test_pinned_read_refuses_another_file_naming_both_digests(small_artifact, tmp_path):
    digest = artifact.file_sha256(small_artifact)
    other = crafting.write_artifact(tmp_path / "other.mbc")  # valid, without tokenizer files
    artifact.read(other)
    with pytest.raises(ArtifactError) as caught:
        artifact.read(other, expected_sha256=digest)
    message = str(caught.value)
    assert str(other) in message and digest in message and artifact.file_sha256(other) in message


def test_pinned_read_checks_before_parsing(tmp_path):
    """A file that is not even a zip is refused for its digest, not for its contents."""
    junk = tmp_path / "junk.mbc"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(ArtifactError, match="SHA-256 is .*expected 0{64}"):
        artifact.read(junk, expected_sha256="0" * 64)


@pytest.mark.parametrize("bad", ["", "abc", "0" * 63, "0" * 65, "g" * 64, "sha256:" + "0" * 64, 12])
def test_malformed_expected_sha256_names_the_format(small_artifact, bad):
    with pytest.raises(ArtifactError, match="expected 64 hexadecimal digits") as caught:
        artifact.read(small_artifact, expected_sha256=bad)
    assert str(small_artifact) in str(caught.value)


def test_pinned_load_runs_the_pinned_model(tiny_qa_artifact):
    digest = artifact.file_sha256(tiny_qa_artifact)
    ids = np.arange(1, 9)[None]
    pinned = runtime.load(tiny_qa_artifact, expected_sha256=digest)
    assert np.array_equal(
        pinned(ids).start_logits, mbcompile.load(tiny_qa_artifact)(ids).start_logits
    )


def test_pin_is_checked_before_any_native_code_loads(tiny_qa_artifact):
    """In a fresh process: the wrong pin is refused and TVM (which would dlopen lib.so) was
    never even imported."""
    script = textwrap.dedent(
        f"""
        import sys
        import mbcompile
        from mbcompile import runtime
        try:
            runtime.load({str(tiny_qa_artifact)!r}, expected_sha256="ab" * 32)
        except mbcompile.ArtifactError as err:
            print("refused:", err)
        print("tvm imported:", "tvm" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "refused:" in done.stdout and "ab" * 32 in done.stdout
    assert "tvm imported: False" in done.stdout
