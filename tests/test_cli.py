"""The mbcompile command: compile from a checkpoint folder or a named config, info, run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_model, tiny_config

import mbcompile
from mbcompile.cli import main
from mbcompile.errors import ModelError
from mbcompile.models import load_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A token-classification checkpoint saved by transformers into a local folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = make_model("token-classification", tiny_config(num_labels=4), seed=3)
    model.save_pretrained(folder)
    return folder, model


def test_checkpoint_loads_with_its_head_and_weights(checkpoint):
    folder, model = checkpoint
    loaded = load_checkpoint(folder)
    assert type(loaded).__name__ == "MobileBertForTokenClassification"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_compile_info_run_from_the_command_line(checkpoint, tmp_path, capsys):
    folder, model = checkpoint
    out = tmp_path / "tok.mbc"
    assert main(["compile", str(folder), "--seq-len", "12", "-o", str(out), "--passes", "none"]) == 0
    compiled = mbcompile.load(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert (compiled(ids).logits - ref).abs().max() <= 1e-4

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MobileBertForTokenClassification" in text
    assert "logits: float32 (1, 12, 4)" in text
    assert "target:     host" in text

    assert main(["run", str(out), "--ids", "1,2,3", "--repeats", "1"]) == 0
    assert "logits: shape (1, 3, 4)" in capsys.readouterr().out


def test_compile_named_config_with_random_init(tmp_path, capsys):
    out = tmp_path / "mlm.mbc"
    code = main(
        ["compile", "--config", "mobilebert-tiny", "--head", "masked-lm", "--random-init",
         "--seq-len", "8", "-o", str(out), "--passes", "none"]
    )
    assert code == 0
    compiled = mbcompile.load(out)
    assert compiled.signature.model_class == "MobileBertForMaskedLM"
    assert compiled(np.array([[101, 2023, 102]])).logits.shape == (1, 3, 30522)


def test_unknown_target_lists_the_known_ones(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    code = main(["compile", str(folder), "--target", "arm", "-o", str(tmp_path / "x.mbc")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Unknown target 'arm'" in err and "x86-64" in err and "aarch64" in err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "mbcompile.cli", "targets"], capture_output=True, text=True, check=True
    )
    assert "x86-64-avx512" in result.stdout


def test_explain_prints_each_pass_and_the_final_module(tmp_path, capsys):
    out = tmp_path / "base.mbc"
    code = main(
        ["compile", "--config", "mobilebert-tiny", "--random-init", "--seq-len", "8", "-o", str(out),
         "--explain"]
    )
    assert code == 0
    text = capsys.readouterr().out
    for name in ("imported", "FoldNoNorm", "MergeSharedInputLinears", "FuseAttention"):
        assert name in text
    assert "final module:" in text and "kernel calls" in text
    report = mbcompile.load(out).report()
    assert report["final"]["matmul_calls"] < report["imported"]["matmul_calls"]
