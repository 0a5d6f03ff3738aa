"""feature-extraction (transformers' output: each token's hidden state) and sentence-embedding
(mean or [CLS] pooling, normalised or not), against the eager model, on an artifact that holds
every length up to the model's maximum (each text runs the shortest program that fits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model
from pipeline_helpers import config
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.errors import PipelineError

TEXTS = ["the cat sat on the mat .", "paris is the capital of france", "who ?"]


@pytest.fixture(scope="module")
def encoder(tok):
    model = make_model("base", config(initializer_range=0.02), seed=4)  # states of order 1
    compiled = mbcompile.compile(model, max_seq_len=32)
    return model, mbcompile.pipeline("feature-extraction", compiled, tokenizer=tok)


def _eager_states(model, tok, text) -> np.ndarray:
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state[0].numpy()


def test_token_states_equal_transformers_feature_extraction(encoder, tok):
    model, pipe = encoder
    reference = hf_pipeline("feature-extraction", model=model, tokenizer=tok)
    for text in TEXTS:
        got, want = np.array(pipe(text)), np.array(reference(text))
        assert got.shape == want.shape == (1, len(tok(text)["input_ids"]), 64)
        assert np.abs(got - want).max() <= 1e-4
    batch = pipe(TEXTS)  # padded together to the longest: each text's own states
    for text, got in zip(TEXTS, batch):
        assert np.abs(np.array(got)[0] - _eager_states(model, tok, text)).max() <= 1e-4


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [False, True])
def test_sentence_embeddings_pool_the_eager_states(encoder, tok, pooling, normalize):
    model, pipe = encoder
    sentences = mbcompile.pipeline("sentence-embedding", pipe.model, tokenizer=tok)
    got = sentences(TEXTS, pooling=pooling, normalize=normalize, return_tensors=True)
    for text, vector in zip(TEXTS, got):
        states = _eager_states(model, tok, text)
        want = states.mean(axis=0) if pooling == "mean" else states[0]
        if normalize:
            want = want / np.linalg.norm(want)
            assert abs(float(np.linalg.norm(vector)) - 1.0) <= 1e-5
        assert vector.shape == (64,)
        assert np.abs(vector - want).max() <= 1e-4


def test_sentence_embedding_pools_by_mean_unless_told(encoder, tok):
    _, pipe = encoder
    sentences = mbcompile.pipeline("sentence-embedding", pipe.model, tokenizer=tok)
    assert np.allclose(sentences(TEXTS[0]), pipe(TEXTS[0], pooling="mean"))


def test_bad_pooling_options_are_refused(encoder):
    _, pipe = encoder
    with pytest.raises(PipelineError, match="pooling must be one of"):
        pipe("the cat", pooling="max")
    with pytest.raises(PipelineError, match="normalize=True needs pooling"):
        pipe("the cat", normalize=True)


def test_feature_extraction_refuses_a_model_with_a_head(tok):
    model = make_model("sequence-classification", config())
    compiled = mbcompile.compile(model, seq_len=16, passes=())
    with pytest.raises(PipelineError, match="needs a model with head \\['base'\\]"):
        mbcompile.pipeline("feature-extraction", compiled, tokenizer=tok)
