"""Optimum-style classes: a compiled MobileBERT behind transformers' model interface, run by
transformers' own pipelines, saved and loaded with save_pretrained / from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model
from pipeline_helpers import config
from transformers import pipeline as hf_pipeline

from mbcompile.errors import ModelError
from mbcompile.transformers import (
    MBCModel,
    MBCModelForMaskedLM,
    MBCModelForSequenceClassification,
    MBCModelForTokenClassification,
)

TEXTS = ["the cat sat on the [MASK] .", "paris is the [MASK] of france"]


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory, vocab_dir):
    folder = tmp_path_factory.mktemp("mlm-ckpt")
    model = make_model("masked-lm", config(), seed=7)
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    return folder, model


def test_fill_mask_through_transformers_pipeline_equals_the_pytorch_model(mlm_checkpoint, tok, tmp_path):
    folder, model = mlm_checkpoint
    compiled = MBCModelForMaskedLM.from_pretrained(folder, max_seq_len=32)
    assert compiled.config.vocab_size == model.config.vocab_size
    got = hf_pipeline("fill-mask", model=compiled, tokenizer=tok)(TEXTS, top_k=3)
    want = hf_pipeline("fill-mask", model=model, tokenizer=tok)(TEXTS, top_k=3)
    for g_row, w_row in zip(got, want):
        assert [g["token"] for g in g_row] == [w["token"] for w in w_row]
        assert np.allclose([g["score"] for g in g_row], [w["score"] for w in w_row], atol=1e-5)
    # saved and loaded back: no compile, the same answers
    compiled.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.mbc"]
    again = MBCModelForMaskedLM.from_pretrained(tmp_path / "saved")
    assert again.compiled.signature.lengths == compiled.compiled.signature.lengths
    assert hf_pipeline("fill-mask", model=again, tokenizer=tok)(TEXTS, top_k=3) == got


@pytest.mark.parametrize(
    "cls, head, task, field",
    [
        (MBCModelForSequenceClassification, "sequence-classification", "text-classification", "score"),
        (MBCModelForTokenClassification, "token-classification", "token-classification", "score"),
        (MBCModel, "base", "feature-extraction", None),
    ],
)
def test_other_heads_through_transformers_pipelines(cls, head, task, field, tok, tmp_path):
    model = make_model(head, config(num_labels=3, initializer_range=0.02), seed=2)
    model.save_pretrained(tmp_path)
    compiled = cls.from_pretrained(tmp_path, seq_len=16)
    text = "john smith lives in paris"
    got = hf_pipeline(task, model=compiled, tokenizer=tok)(text)
    want = hf_pipeline(task, model=model, tokenizer=tok)(text)
    if field is None:
        assert np.abs(np.array(got) - np.array(want)).max() <= 1e-4
    else:
        flat_g = got if isinstance(got, list) else [got]
        flat_w = want if isinstance(want, list) else [want]
        assert [{k: v for k, v in g.items() if k != "score"} for g in flat_g] == [
            {k: v for k, v in w.items() if k != "score"} for w in flat_w
        ]
        assert np.allclose([g[field] for g in flat_g], [w[field] for w in flat_w], atol=1e-5)


def test_forward_returns_the_heads_model_output_with_torch_tensors(mlm_checkpoint):
    folder, model = mlm_checkpoint
    compiled = MBCModelForMaskedLM.from_pretrained(folder, seq_len=16)
    ids = torch.tensor([[2, 9, 4, 12, 3]])
    out = compiled(input_ids=ids)
    assert type(out).__name__ == "MaskedLMOutput" and isinstance(out.logits, torch.Tensor)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert float((out.logits - ref).abs().max()) <= 1e-4
    assert isinstance(compiled(input_ids=ids, return_dict=False), tuple)


def test_a_class_for_another_head_or_a_pruned_artifact_is_refused(mlm_checkpoint, tmp_path):
    folder, _ = mlm_checkpoint
    with pytest.raises(ModelError, match="runs a 'sequence-classification' model"):
        MBCModelForSequenceClassification(
            MBCModelForMaskedLM.from_pretrained(folder, seq_len=16).config,
            MBCModelForMaskedLM.from_pretrained(folder, seq_len=16).compiled,
        )
    with pytest.raises(ModelError, match="logits_for='masked'"):
        MBCModelForMaskedLM.from_pretrained(folder, seq_len=16, logits_for="masked", mask_token_id=4)
