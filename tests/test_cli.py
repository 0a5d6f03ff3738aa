"""The mbcompile command: compile from a checkpoint folder or a named config, info, run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_model, tiny_config

import mbcompile
from mbcompile.capture import load_checkpoint
from mbcompile.cli import main
from mbcompile.errors import ModelError


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


def test_fill_mask_command_prints_the_pipeline_result_as_json(tmp_path, capsys):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    model = make_model("masked-lm", tiny_config(vocab_size=len(words), initializer_range=0.2))
    compiled = mbcompile.compile(model, seq_len=16)
    path = compiled.save(tmp_path / "mlm.mbc")
    assert main(["fill-mask", str(path), "the cat [MASK] ."]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["add-tokenizer", str(path), str(tmp_path)]) == 0
    assert "vocab.txt" in capsys.readouterr().out
    assert main(["fill-mask", str(path), "the cat [MASK] .", "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    ref = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)("the cat [MASK] .", top_k=2)
    assert [d["token_str"] for d in out] == [d["token_str"] for d in ref]
    assert [d["score"] for d in out] == pytest.approx([d["score"] for d in ref], abs=1e-6)
    assert main(["question-answering", str(path), "--question", "a", "--context", "b"]) == 2
    assert "needs a model with head ['question-answering']" in capsys.readouterr().err


def test_compile_with_logits_for_masked_builds_the_pruned_head(tmp_path, capsys):
    model = make_model("masked-lm", tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "fill.mbc"
    assert main(["compile", str(tmp_path / "ckpt"), "--seq-len", "16", "--logits-for", "masked",
                 "--max-masked", "2", "-o", str(out)]) == 0
    compiled = mbcompile.load(out)
    assert compiled.signature.max_masked == 2
    assert "PruneMaskedLMHead" in [row["pass"] for row in compiled.report()["passes"]]


def test_demo_checks_against_pytorch_and_times_both_interleaved(checkpoint):
    from mbcompile.demo import run_demo

    lines = []
    result = run_demo(str(checkpoint[0]), seq_len=16, repeats=3, settle=0.01, log=lines.append)
    assert set(result.max_abs_error) == {"logits"}
    assert max(result.max_abs_error.values()) <= 1e-4
    assert len(result.compiled_ms) == len(result.torch_ms) == 3
    assert all(t > 0 for t in result.compiled_ms + result.torch_ms)
    assert "0.01 s apart" in lines[-1] and "mbcompile" in lines[-1]
    # the demo says where its kernel schedules come from: a tiny model's matmuls are in no
    # shipped database, but on Zen 4 its gathers and reshapes of every length are
    said = [line for line in lines if line.startswith("kernel schedules: ")]
    assert len(said) == 1, lines
    assert re.fullmatch(r"kernel schedules: (\d+ from the tuning database \S+|untuned \(.+\))",
                        said[0]), said


def test_demo_compiles_every_length_and_checks_each_length_asked(checkpoint):
    from mbcompile.demo import run_demo

    lines = []
    result = run_demo(str(checkpoint[0]), lengths=(5, 40), repeats=2, settle=0.0, log=lines.append)
    assert sorted(result.by_length) == [5, 40]
    assert all(err <= 1e-4 for err, _, _ in result.by_length.values())
    assert "5 tokens (runs the 8-token program):" in lines
    assert "40 tokens (runs the 64-token program):" in lines


def test_compile_shows_progress_on_a_terminal_only(checkpoint, tmp_path, monkeypatch, capsys):
    from mbcompile.cli import main

    out = tmp_path / "p.mbc"
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert main(["compile", str(checkpoint[0]), "--seq-len", "16", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    for stage in ("loading", "capture: torch.export", "passes: FoldNoNorm (1/", "build: done in",
                  "link: done in"):
        assert stage in err, (stage, err)
    assert main(["compile", str(checkpoint[0]), "--seq-len", "16", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert main(["compile", str(checkpoint[0]), "--seq-len", "16", "-o", str(out)]) == 0
    assert capsys.readouterr().err == ""
