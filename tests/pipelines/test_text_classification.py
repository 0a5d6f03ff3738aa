"""text-classification (and its alias "sentiment-analysis"): labels and scores equal
transformers' TextClassificationPipeline on the eager model."""

from __future__ import annotations

import pytest
from helpers import make_model
from pipeline_helpers import SEQ, assert_same, config, make_tokenizer
from transformers import pipeline as hf_pipeline

import mbcompile


@pytest.fixture(scope="module")
def classifier():
    model = make_model(
        "sequence-classification",
        config(num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"}),
    )
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.mark.parametrize(
    "inputs, params",
    [
        ("the cat sat on the mat .", {}),
        ({"text": "john lives in paris .", "text_pair": "he is there ."}, {}),
        (["the dog is big .", "mary works in berlin ."], {}),
        ("the river is red .", {"top_k": None}),
        (["the river is red .", "it was new"], {"top_k": 2}),
        ({"text": "who is it ?", "text_pair": "it is john ."}, {"top_k": 1}),
        ("the cat sat .", {"function_to_apply": "sigmoid", "top_k": None}),
        ("the cat sat .", {"function_to_apply": "none"}),
    ],
)
def test_text_classification_matches_transformers(classifier, tok, inputs, params):
    model, compiled = classifier
    ours = mbcompile.pipeline("text-classification", compiled, tokenizer=tok)(inputs, **params)
    ref = hf_pipeline("text-classification", model=model, tokenizer=tok)(inputs, **params)
    assert_same(ours, ref)


def test_multi_label_classifier_from_a_checkpoint_folder_uses_sigmoid_and_its_tokenizer(
    tmp_path, vocab_dir
):
    from mbcompile.capture import load_checkpoint

    folder = tmp_path / "checkpoint"
    cfg = config(num_labels=3, problem_type="multi_label_classification")
    make_model("sequence-classification", cfg, seed=2).save_pretrained(folder)
    (folder / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    model = load_checkpoint(folder)
    compiled = mbcompile.compile(model, seq_len=SEQ)
    classify = mbcompile.pipeline("sentiment-analysis", compiled)  # tokenizer from the folder
    texts = ["the cat sat on the mat .", "paris is big"]
    ours = classify(texts, top_k=None)
    ref = hf_pipeline("text-classification", model=model, tokenizer=make_tokenizer(vocab_dir))(
        texts, top_k=None
    )
    assert_same(ours, ref)
    assert abs(sum(d["score"] for d in ours[0]) - 1.0) > 1e-3  # sigmoid: not a distribution


def test_an_empty_pair_is_read_as_transformers_reads_it(classifier, tok, tmp_path, capsys):
    """``{"text_pair": ""}`` (and ``--pair ""``): transformers' tokenizer reads an empty second
    text as none; the tokenizer saved in the artifact does too."""
    import json

    from mbcompile.cli import main

    model, compiled = classifier
    pair = {"text": "the cat sat .", "text_pair": ""}
    ref = hf_pipeline("text-classification", model=model, tokenizer=tok)(pair)
    path = mbcompile.pipeline("text-classification", compiled, tokenizer=tok).save(tmp_path / "tc.mbc")
    saved = mbcompile.pipeline("text-classification", path)
    assert_same(saved(pair), ref)
    assert saved.tokenizer("the cat sat .", "")["input_ids"] == tok("the cat sat .", "")["input_ids"]
    assert main(["text-classification", str(path), "the cat sat .", "--pair", ""]) == 0
    assert_same(json.loads(capsys.readouterr().out), ref)
