"""token-classification (alias "ner"): entities equal transformers' TokenClassificationPipeline
on the eager model for every aggregation strategy, also over long texts read in stride windows."""

from __future__ import annotations

import pytest
from helpers import make_model
from pipeline_helpers import LONG_CONTEXT, SEQ, assert_same, config, make_tokenizer
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.pipelines import PipelineError

NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


@pytest.fixture(scope="module")
def tagger():
    # Tags of all five kinds, B-I runs that "simple" merges, and every top-2 margin > 1e-3.
    cfg = config(id2label=NER_LABELS, initializer_range=0.12)
    model = make_model("token-classification", cfg, seed=2)
    return model, mbcompile.compile(model, seq_len=SEQ)


TAGGED = ["john smithson lives in londonville , england .", "mary works at the xylophone"]


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
@pytest.mark.parametrize("ignore_labels", [None, []])
def test_token_classification_matches_transformers(tagger, tok, strategy, ignore_labels):
    model, compiled = tagger
    params = {"aggregation_strategy": strategy, "ignore_labels": ignore_labels}
    ours = mbcompile.pipeline("ner", compiled, tokenizer=tok)(TAGGED, **params)
    ref = hf_pipeline("token-classification", model=model, tokenizer=tok)(TAGGED, **params)
    assert_same(ours, ref)
    assert ours[0] and ours[1]
    if strategy == "simple":  # adjacent B-/I- tokens became one entity
        assert any(" " in e["word"] for e in ours[0] + ours[1])
    assert_same(mbcompile.pipeline("ner", compiled, tokenizer=tok)(TAGGED[0], **params), ref[0])


def test_token_classification_reads_a_long_text_in_stride_windows(tagger, vocab_dir):
    model, compiled = tagger
    tok = make_tokenizer(vocab_dir, model_max_length=SEQ)  # transformers' window length
    assert len(tok(LONG_CONTEXT)["input_ids"]) > SEQ
    tag = mbcompile.pipeline("token-classification", compiled, tokenizer=tok)
    for strategy in ("simple", "max"):
        params = {"aggregation_strategy": strategy, "stride": 8}
        ours = tag(LONG_CONTEXT, **params)
        reference = hf_pipeline("token-classification", model=model, tokenizer=tok)
        ref = reference(LONG_CONTEXT, **params)
        assert ours and ours[-1]["end"] > len(LONG_CONTEXT) // 2
        assert_same(ours, ref)
    with pytest.raises(PipelineError, match="seq_len=32.*stride=n"):
        tag(LONG_CONTEXT)
    with pytest.raises(ValueError, match="aggregation_strategy other than 'none'"):
        tag(LONG_CONTEXT, stride=8)
