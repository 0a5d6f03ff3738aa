"""The saved artifact: one file, verified on load, usable without torch or transformers.

(Moved from tests/test_artifact.py; the damaged-file, pinning, saving and metadata tests are
in the files beside this one.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

import mbcompile
from mbcompile import ArtifactError


def test_loaded_artifact_gives_the_same_outputs(tiny_qa, tiny_qa_artifact):
    model, compiled = tiny_qa
    again = mbcompile.load(tiny_qa_artifact)
    ids = np.random.default_rng(0).integers(0, 211, size=(1, 16))
    a, b = compiled(ids), again(ids)
    assert list(a.keys()) == list(b.keys()) == ["start_logits", "end_logits"]
    assert np.array_equal(a.start_logits, b.start_logits)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).end_logits.numpy()
    assert np.abs(b.end_logits - ref).max() <= 1e-4


def test_metadata_records_model_target_versions_and_hashes(tiny_qa_artifact):
    with zipfile.ZipFile(tiny_qa_artifact) as zf:
        meta = json.loads(zf.read("metadata.json"))
        lib = zf.read("lib.so")
    assert meta["format"] == "mbcompile-artifact"
    assert meta["model_class"] == "MobileBertForQuestionAnswering"
    assert meta["head"] == "question-answering"
    assert meta["config"]["hidden_size"] == 64
    assert meta["signature"]["seq_len"] == 16
    assert meta["target"]["name"] == "host"
    assert set(meta["versions"]) >= {"mbcompile", "tvm", "torch", "transformers"}
    import hashlib

    assert meta["members"]["lib.so"]["sha256"] == hashlib.sha256(lib).hexdigest()


def test_load_works_where_torch_and_transformers_cannot_be_imported(tiny_qa, tiny_qa_artifact):
    model, _ = tiny_qa
    ids = np.random.default_rng(1).integers(0, 211, size=(1, 11))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).start_logits.numpy()
    np.save(tiny_qa_artifact.parent / "ids.npy", ids)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None          # any import of torch now raises ImportError
        sys.modules["transformers"] = None
        import numpy as np
        import mbcompile
        compiled = mbcompile.load({str(tiny_qa_artifact)!r})
        out = compiled(np.load({str(tiny_qa_artifact.parent / "ids.npy")!r}))
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
        np.save({str(tiny_qa_artifact.parent / "out.npy")!r}, out.start_logits)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    out = np.load(tiny_qa_artifact.parent / "out.npy")
    assert np.abs(out - ref).max() <= 1e-4


def test_corrupt_artifact_is_refused(tiny_qa_artifact, tmp_path):
    data = bytearray(tiny_qa_artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside lib.so
    bad = tmp_path / "bad.mbc"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt|SHA-256"):
        mbcompile.load(bad)


def test_truncated_artifact_is_refused(tiny_qa_artifact, tmp_path):
    bad = tmp_path / "short.mbc"
    bad.write_bytes(tiny_qa_artifact.read_bytes()[:1000])
    with pytest.raises(ArtifactError):
        mbcompile.load(bad)


def test_foreign_zip_is_refused(tmp_path):
    foreign = tmp_path / "foreign.mbc"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("model.onnx", b"not ours")
    with pytest.raises(ArtifactError, match="not an mbcompile artifact"):
        mbcompile.load(foreign)


def test_foreign_file_is_refused(tmp_path):
    foreign = tmp_path / "weights.bin"
    foreign.write_bytes(os.urandom(4096))
    with pytest.raises(ArtifactError, match="not an mbcompile artifact"):
        mbcompile.load(foreign)


def test_newer_format_version_is_refused(tiny_qa_artifact, tmp_path):
    newer = tmp_path / "newer.mbc"
    with zipfile.ZipFile(tiny_qa_artifact) as src, zipfile.ZipFile(newer, "w") as dst:
        meta = json.loads(src.read("metadata.json"))
        meta["format_version"] = 99
        dst.writestr("metadata.json", json.dumps(meta))
        dst.writestr("lib.so", src.read("lib.so"))
    with pytest.raises(ArtifactError, match="format version 99"):
        mbcompile.load(newer)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        mbcompile.load(tmp_path / "nothing.mbc")


def test_save_is_atomic_and_leaves_no_temporary_files(tiny_qa, tmp_path):
    _, compiled = tiny_qa
    path = tmp_path / "out" / "qa.mbc"
    compiled.save(path)
    compiled.save(path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["qa.mbc"]
    assert mbcompile.load(path).signature == compiled.signature


def test_artifact_for_another_cpu_refuses_to_run_here(tiny_qa_artifact, tmp_path):
    other = tmp_path / "avx512.mbc"
    with zipfile.ZipFile(tiny_qa_artifact) as src, zipfile.ZipFile(other, "w") as dst:
        meta = json.loads(src.read("metadata.json"))
        meta["target"]["name"] = "x86-64-avx512"
        meta["target"]["features"] = ["avx512f", "no-such-feature"]
        dst.writestr("metadata.json", json.dumps(meta))
        dst.writestr("lib.so", src.read("lib.so"))
    compiled = mbcompile.load(other)
    with pytest.raises(mbcompile.TargetError, match="no-such-feature"):
        compiled(np.zeros((1, 4), dtype=np.int64))


# -- tokenizer files (optional member) ----------------------------------------------------------

TOKENIZER = {
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ncat\n",
    "tokenizer_config.json": b"{}",
}


def _with_tokenizer(src, tmp_path):
    from mbcompile import artifact

    path = tmp_path / "with_tokenizer.mbc"
    path.write_bytes(src.read_bytes())
    return artifact.add_tokenizer(path, TOKENIZER)


def _rewrite(src, dst, edit_meta=None, edit_members=None):
    """Copy an artifact zip, changing its metadata and/or member contents."""
    with zipfile.ZipFile(src) as zin:
        meta = json.loads(zin.read("metadata.json"))
        members = {n: zin.read(n) for n in zin.namelist() if n != "metadata.json"}
    if edit_meta:
        edit_meta(meta)
    if edit_members:
        edit_members(members)
    with zipfile.ZipFile(dst, "w") as zout:
        zout.writestr("metadata.json", json.dumps(meta))
        for name, data in members.items():
            zout.writestr(name, data)
    return dst


def test_tokenizer_files_are_stored_hashed_and_read_back(tiny_qa_artifact, tmp_path):
    import hashlib

    from mbcompile import artifact

    path = _with_tokenizer(tiny_qa_artifact, tmp_path)
    art = artifact.read(path)
    assert art.tokenizer == TOKENIZER
    assert art.lib == artifact.read(tiny_qa_artifact).lib
    assert artifact.read_tokenizer(path) == TOKENIZER
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("metadata.json"))
        assert zf.read("tokenizer/vocab.txt") == TOKENIZER["vocab.txt"]
    entry = meta["members"]["tokenizer/vocab.txt"]
    data = TOKENIZER["vocab.txt"]
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    again = mbcompile.load(path)  # the runtime reads it as before
    ids = np.arange(1, 9)[None]
    before = mbcompile.load(tiny_qa_artifact)(ids).start_logits
    assert np.array_equal(again(ids).start_logits, before)


def test_artifact_without_tokenizer_reads_with_none(tiny_qa_artifact):
    from mbcompile import artifact

    assert artifact.read(tiny_qa_artifact).tokenizer == {}
    assert artifact.read_tokenizer(tiny_qa_artifact) == {}


def test_corrupt_tokenizer_file_is_refused(tiny_qa_artifact, tmp_path):
    from mbcompile import artifact

    def flip(members):
        members["tokenizer/vocab.txt"] = members["tokenizer/vocab.txt"].replace(b"cat", b"dog")

    bad = _rewrite(
        _with_tokenizer(tiny_qa_artifact, tmp_path), tmp_path / "bad.mbc", edit_members=flip
    )
    with pytest.raises(ArtifactError, match="tokenizer/vocab.txt fails its SHA-256 check"):
        artifact.read(bad)
    with pytest.raises(ArtifactError, match="tokenizer/vocab.txt fails its SHA-256 check"):
        artifact.read_tokenizer(bad)


def test_member_listed_in_metadata_but_missing_is_refused(tiny_qa_artifact, tmp_path):
    from mbcompile import artifact

    def drop(members):
        del members["tokenizer/tokenizer_config.json"]

    bad = _rewrite(
        _with_tokenizer(tiny_qa_artifact, tmp_path), tmp_path / "bad.mbc", edit_members=drop
    )
    with pytest.raises(ArtifactError, match="'tokenizer/tokenizer_config.json' listed .* missing"):
        artifact.read(bad)


def test_tokenizer_file_names_must_be_bare(tiny_qa_artifact, tmp_path):
    from mbcompile import artifact

    with pytest.raises(ValueError, match="must be a bare file name"):
        artifact.write(tmp_path / "x.mbc", {}, b"lib", tokenizer={"../vocab.txt": b""})
    assert not (tmp_path / "x.mbc").exists()

    def escape(meta):
        meta["members"]["tokenizer/../evil"] = {"sha256": "0", "bytes": 0}

    def add(members):
        members["tokenizer/../evil"] = b""

    bad = _rewrite(tiny_qa_artifact, tmp_path / "bad.mbc", edit_meta=escape, edit_members=add)
    with pytest.raises(ArtifactError, match="bad tokenizer member name"):
        artifact.read(bad)
