"""Fixtures shared by the tests: a tiny compiled model and its saved artifact."""

from __future__ import annotations

import pytest
from helpers import make_model, tiny_config


@pytest.fixture(scope="session")
def tiny_qa():
    """A tiny question-answering model and its compiled form (seq 16, batch 1)."""
    import mbcompile

    model = make_model("question-answering", tiny_config())
    return model, mbcompile.compile(model, seq_len=16, passes=())


@pytest.fixture(scope="session")
def tiny_qa_artifact(tiny_qa, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifacts") / "qa.mbc"
    tiny_qa[1].save(path)
    return path
