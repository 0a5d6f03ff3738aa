"""multiple-choice: choices ranked and scored as the eager model's softmax over them."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, make_model
from pipeline_helpers import SEQ, config

import mbcompile
from mbcompile.pipelines import PipelineError


def test_multiple_choice_matches_eager(tok):
    model = make_model("multiple-choice", config())
    compiled = mbcompile.compile(model, seq_len=SEQ, num_choices=3)
    choose = mbcompile.pipeline("multiple-choice", compiled, tokenizer=tok)
    prompt, choices = "john lives in paris .", ["he is there .", "the cat sat .", "it is big"]
    out = choose(prompt, choices)
    enc = tok([prompt] * 3, choices, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**{k: v[None] for k, v in enc.items()}).logits.softmax(-1)[0]
    assert [d["index"] for d in out] == torch.argsort(probs, descending=True).tolist()
    for d in out:
        assert d["choice"] == choices[d["index"]]
        assert abs(d["score"] - float(probs[d["index"]])) <= TOL
    with pytest.raises(PipelineError, match="2 choices given.*num_choices=3"):
        choose(prompt, choices[:2])
