"""multiple-choice: choices ranked and scored as the eager model's softmax over them."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, make_model
from pipeline_helpers import SEQ, config

import mbcompile
from mbcompile.pipelines import PipelineError


@pytest.fixture(scope="module")
def three_choices():
    model = make_model("multiple-choice", config())
    return model, mbcompile.compile(model, seq_len=SEQ, num_choices=3)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_multiple_choice_matches_eager_with_any_number_of_choices(tok, three_choices, count):
    """Compiled for 3 choices; 2 and 4 work too (choices are scored on their own)."""
    model, compiled = three_choices
    choose = mbcompile.pipeline("multiple-choice", compiled, tokenizer=tok)
    prompt = "john lives in paris ."
    choices = ["he is there .", "the cat sat .", "it is big", "paris is a city in france"][:count]
    out = choose(prompt, choices)
    enc = tok([prompt] * count, choices, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**{k: v[None] for k, v in enc.items()}).logits.softmax(-1)[0]
    assert [d["index"] for d in out] == torch.argsort(probs, descending=True).tolist()
    for d in out:
        assert d["choice"] == choices[d["index"]]
        assert abs(d["score"] - float(probs[d["index"]])) <= TOL
    with pytest.raises(PipelineError, match="at least one choice"):
        choose(prompt, [])

