"""Texts longer than the compiled length, as users have them (long reviews, documents):
refused by default, cut with transformers' ``truncation=True`` (text-classification,
fill-mask's ``tokenizer_kwargs``, feature-extraction, next-sentence, ``--truncation`` on the
command line), equal to transformers' pipelines cutting at the same length."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_model
from pipeline_helpers import LONG_CONTEXT, SEQ, assert_same, config
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.errors import PipelineError, PipelineTypeError

LONG = LONG_CONTEXT + " " + LONG_CONTEXT  # ~90 tokens, SEQ is 32


@pytest.fixture(scope="module")
def classifier(tok, tmp_path_factory):
    """The model, its pipeline with transformers' tokenizer, and the same pipeline saved and
    loaded (mbcompile's own tokenizer from the artifact)."""
    model = make_model("sequence-classification", config(num_labels=3), seed=6)
    ours = mbcompile.pipeline("text-classification", mbcompile.compile(model, seq_len=SEQ),
                              tokenizer=tok)
    path = ours.save(tmp_path_factory.mktemp("tc") / "tc.mbc")
    return model, ours, mbcompile.pipeline("text-classification", path)


@pytest.mark.parametrize("which", ["transformers tokenizer", "saved tokenizer"])
@pytest.mark.parametrize(
    "inputs, truncation",
    [
        (LONG, True),
        ([LONG, "the cat sat ."], "longest_first"),
        ({"text": "who lives in paris ?", "text_pair": LONG}, "only_second"),
        ({"text": LONG, "text_pair": "it is new ."}, "only_first"),
        ({"text": LONG, "text_pair": LONG}, True),
    ],
)
def test_truncated_classification_equals_transformers_cutting_at_the_compiled_length(
    classifier, tok, which, inputs, truncation
):
    model, with_tok, saved = classifier
    run = with_tok if which == "transformers tokenizer" else saved
    ours = run(inputs, truncation=truncation, top_k=None)
    ref = hf_pipeline("text-classification", model=model, tokenizer=tok)(
        inputs, truncation=truncation, max_length=SEQ, top_k=None
    )
    assert_same(ours, ref)
    # a shorter max_length cuts there, as transformers does
    ours = run(inputs, truncation=truncation, max_length=20, top_k=None)
    ref = hf_pipeline("text-classification", model=model, tokenizer=tok)(
        inputs, truncation=truncation, max_length=20, top_k=None
    )
    assert_same(ours, ref)


def test_without_truncation_a_long_text_is_refused_naming_the_option(classifier):
    _, run, _ = classifier
    with pytest.raises(PipelineError, match="tokens long.*compiled for at most seq_len=32"):
        run(LONG)
    with pytest.raises(PipelineError, match="tokens long"):
        run(LONG, truncation=True, max_length=SEQ + 8)  # cut, but still longer than compiled


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"truncation": "sideways"}, PipelineError, "truncation must be True, False or one of"),
        ({"max_length": 16}, PipelineError, "max_length=16 applies with truncation=True"),
        ({"truncation": True, "max_length": 0}, PipelineError, "max_length must be a positive"),
        ({"truncation": True, "max_length": "16"}, PipelineError, "max_length must be a positive"),
    ],
)
def test_bad_truncation_arguments_are_refused_by_name(classifier, kwargs, error, match):
    _, run, _ = classifier
    with pytest.raises(error, match=match):
        run("the cat sat .", **kwargs)


def test_fill_mask_takes_transformers_tokenizer_kwargs(mlm, tok):
    model, compiled = mlm
    fill = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    text = "the [MASK] sat on the mat . " + LONG
    ours = fill(text, tokenizer_kwargs={"truncation": True}, top_k=3)
    ref = hf_pipeline("fill-mask", model=model, tokenizer=tok)(
        text, tokenizer_kwargs={"truncation": True, "max_length": SEQ}, top_k=3
    )
    assert_same(ours, ref)
    assert_same(fill(text, truncation=True, top_k=3), ref)
    with pytest.raises(PipelineError, match="no mask token"):  # the mask was cut off
        fill(LONG + " the [MASK] .", truncation=True)
    with pytest.raises(PipelineError, match="'truncation' and 'max_length' only, got \\['padding'\\]"):
        fill(text, tokenizer_kwargs={"padding": True})
    with pytest.raises(PipelineError, match="given both in tokenizer_kwargs and on its own"):
        fill(text, tokenizer_kwargs={"truncation": True}, truncation=True)
    with pytest.raises(PipelineTypeError, match="tokenizer_kwargs must be a dict"):
        fill(text, tokenizer_kwargs=["truncation"])


def test_feature_extraction_truncates_as_transformers(tok):
    model = make_model("base", config(initializer_range=0.02), seed=8)  # states of order 1
    compiled = mbcompile.compile(model, seq_len=SEQ)
    fe = mbcompile.pipeline("feature-extraction", compiled, tokenizer=tok)
    ours = fe([LONG, "the cat sat ."], truncation=True)
    ref = hf_pipeline("feature-extraction", model=model, tokenizer=tok)(
        [LONG, "the cat sat ."], truncation=True, tokenize_kwargs={"max_length": SEQ}
    )
    assert len(ours[0][0]) == SEQ
    assert_same(ours, ref)
    again = fe([LONG, "the cat sat ."], tokenize_kwargs={"truncation": True, "max_length": SEQ})
    assert_same(again, ref)


def test_next_sentence_cuts_the_second_text(tok):
    model = make_model("next-sentence", config(), seed=9)
    nsp = mbcompile.pipeline("next-sentence-prediction", mbcompile.compile(model, seq_len=SEQ),
                             tokenizer=tok)
    first = "john smith lives in paris ."
    out = nsp(first, LONG, truncation="only_second")
    enc = tok(first, LONG, truncation="only_second", max_length=SEQ, return_tensors="pt")
    assert enc["input_ids"].shape[-1] == SEQ
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0].double(), -1).numpy()
    best = int(np.argmax(probs))
    assert out["label"] == ("is_next", "not_next")[best]
    assert abs(out["score"] - probs[best]) <= 1e-4


def test_the_command_line_truncates_with_its_flag(classifier, tmp_path, capsys):
    from mbcompile.cli import main

    model, _, saved = classifier
    path = saved.save(tmp_path / "tc.mbc")
    assert main(["text-classification", str(path), LONG]) == 2
    assert "tokens long" in capsys.readouterr().err
    assert main(["text-classification", str(path), LONG, "--truncation", "--top-k", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert_same(printed, saved(LONG, truncation=True, top_k=3))
