"""next-sentence-prediction: labels and scores equal the eager model's softmax, on the
next-sentence head and on the (pruned) pretraining head."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, make_model
from pipeline_helpers import SEQ, config

import mbcompile


@pytest.fixture(scope="module")
def next_sentence():
    model = make_model("next-sentence", config(), seed=4)
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.mark.parametrize("head", ["next-sentence", "pretraining"])
def test_next_sentence_prediction_matches_eager(request, head, tok):
    fixture = "next_sentence" if head == "next-sentence" else "pruned_pretraining"
    model, compiled = request.getfixturevalue(fixture)
    nsp = mbcompile.pipeline("next-sentence-prediction", compiled, tokenizer=tok)
    pairs = [("john lives in paris .", "he works there ."), ("the cat sat .", "berlin is big .")]
    out = nsp([a for a, _ in pairs], [b for _, b in pairs])
    assert len(out) == 2
    for (a, b), got in zip(pairs, out):
        enc = tok(a, b, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc)
        logits = ref.logits if head == "next-sentence" else ref.seq_relationship_logits
        probs = logits.softmax(-1)[0]
        label = "is_next" if probs[0] >= probs[1] else "not_next"
        assert got["label"] == label
        assert abs(got["score"] - float(probs.max())) <= TOL
    assert nsp(*pairs[0]) == out[0]
