"""Fixtures for the pipeline tests: the tokenizer and the compiled models more than one task's
tests use (compiled once per session); ``pipeline_helpers.py`` beside this holds the vocabulary
and ``assert_same``."""

from __future__ import annotations

import pytest
from helpers import make_model
from pipeline_helpers import SEQ, config, make_tokenizer, write_vocab

import mbcompile


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def tok(vocab_dir):
    return make_tokenizer(vocab_dir)


@pytest.fixture(scope="session")
def mlm():
    model = make_model("masked-lm", config())
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.fixture(scope="session")
def pruned_pretraining(tok):
    model = make_model("pretraining", config(), seed=3)
    compiled = mbcompile.compile(
        model, seq_len=SEQ, batch_size=2, logits_for="masked", max_masked=2,
        mask_token_id=tok.mask_token_id,
    )
    return model, compiled


@pytest.fixture(scope="session")
def qa():
    # 0.15: start/end scores neither saturated (ties at 1.0) nor flat (ties at 1/n²)
    model = make_model("question-answering", config(initializer_range=0.15))
    return model, mbcompile.compile(model, seq_len=SEQ)

