"""Checkpoints named by Hugging Face hub id, resolved from a hub cache laid out on disk, offline:
``compile``, the CLI, ``demo --checkpoint`` and ``pipeline`` take the id, and the metadata
records the resolved revision. Each case runs in a subprocess whose environment points the hub
cache at the test's folder (huggingface_hub reads it at import) with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import make_model, tiny_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "testorg/tiny-mobilebert-mlm"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(206)]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding REPO at COMMIT, as huggingface_hub lays it out (refs/main names the
    snapshot; files may be plain files in the snapshot folder)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    model = make_model("masked-lm", tiny_config(), seed=5)
    model.save_pretrained(snapshot)
    (snapshot / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return cache, model


def _run(cache, code: str, *args: str, offline: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HOME=str(cache / "home"))
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_compile_takes_a_hub_id_from_the_cache_and_records_the_revision(hub_cache, tmp_path):
    cache, model = hub_cache
    code = f"""
import json, mbcompile, numpy as np, torch
c = mbcompile.compile({REPO!r}, head="masked-lm", seq_len=16)
print(json.dumps({{"source": c.metadata.source, "tokenizer": sorted(c.tokenizer_files),
                  "head": c.signature.head}}))
c.save({str(tmp_path / "m.mbc")!r})
"""
    proc = _run(cache, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["source"] == {"name_or_path": REPO, "revision": COMMIT}
    assert "vocab.txt" in result["tokenizer"]
    assert result["head"] == "masked-lm"
    # the weights are the cached checkpoint's
    import numpy as np
    import torch

    import mbcompile

    compiled = mbcompile.load(tmp_path / "m.mbc")
    assert compiled.metadata.source["revision"] == COMMIT
    ids = np.array([[2, 7, 4, 9, 3]])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(compiled(input_ids=ids).logits - ref).max() <= 1e-4


def test_the_cli_compiles_a_hub_id_and_refuses_one_missing_offline_in_one_line(hub_cache, tmp_path):
    cache, _ = hub_cache
    out = tmp_path / "cli.mbc"
    proc = _run(cache, "", "-m", "mbcompile.cli", "compile", REPO, "--seq-len", "16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()
    proc = _run(cache, "", "-m", "mbcompile.cli", "compile", "testorg/absent", "--seq-len", "16",
                "-o", str(tmp_path / "x.mbc"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "testorg/absent: not a local folder" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr


def test_pipeline_compiles_a_hub_id_for_its_task(hub_cache):
    cache, _ = hub_cache
    code = f"""
import json, mbcompile
fill = mbcompile.pipeline("fill-mask", {REPO!r})
print(json.dumps({{"lengths": fill.model.signature.lengths,
                  "answers": [a["token_str"] for a in fill("w3 [MASK] w5", top_k=2)],
                  "revision": fill.model.metadata.source["revision"]}}))
"""
    proc = _run(cache, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["revision"] == COMMIT
    assert len(result["answers"]) == 2
    assert result["lengths"][0] == 8  # every length up to the model's maximum


def test_a_non_mobilebert_checkpoint_by_hub_id_is_refused(tmp_path):
    from transformers import BertConfig

    cache = tmp_path / "hub"
    snapshot = cache / "models--testorg--bert" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (cache / "models--testorg--bert" / "refs").mkdir()
    (cache / "models--testorg--bert" / "refs" / "main").write_text(COMMIT)
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=37).save_pretrained(snapshot)
    proc = _run(cache, "import mbcompile; mbcompile.compile('testorg/bert', seq_len=16)")
    assert proc.returncode != 0
    assert "ModelError: testorg/bert: model_type is 'bert', not 'mobilebert'" in proc.stderr
