"""transformers' ``batch_size`` and generator inputs, as users write them:
``pipeline(task, model, batch_size=8)``, ``pipe(texts, batch_size=8)``, ``for out in
pipe(texts())``. Texts are grouped ``batch_size`` at a time into one model call each (padded to
the group's longest, which changes no result, also with a trained [PAD] row); a generator gives
a generator of results, computed a group at a time. Every result equals transformers' pipeline
on the same text."""

from __future__ import annotations

import pytest
from helpers import make_model, trained_pad_row
from pipeline_helpers import SEQ, assert_same, config
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.errors import PipelineError

TEXTS = [
    "the cat sat .",
    "john smith lives in paris , the capital of france .",
    "mary works .",
    "the old river is red and the small house is new .",
    "who lives there ?",
    "it is big .",
    "berlin is a city in germany .",
]


@pytest.fixture(scope="module")
def models():
    """Each task's model, with a trained (non-zero) [PAD] row: padding a short text to a longer
    one in its group must still not change its result."""
    return {
        task: trained_pad_row(make_model(head, config(**extra), seed=seed))
        for task, head, extra, seed in [
            ("text-classification", "sequence-classification", {"num_labels": 3}, 4),
            ("fill-mask", "masked-lm", {}, 5),
            ("token-classification", "token-classification", {"num_labels": 5}, 6),
            ("feature-extraction", "base", {"initializer_range": 0.02}, 7),  # states of order 1
            ("question-answering", "question-answering", {"initializer_range": 0.15}, 8),
        ]
    }


@pytest.fixture(scope="module")
def pipes(models, tok):
    return {task: mbcompile.pipeline(task, mbcompile.compile(m, seq_len=SEQ), tokenizer=tok)
            for task, m in models.items()}


def _inputs(task: str) -> list:
    if task == "fill-mask":
        return [t.replace(" is ", " [MASK] ", 1) if " is " in t else t + " [MASK] ."
                for t in TEXTS]
    if task == "question-answering":
        return [{"question": "where does he live ?", "context": t} for t in TEXTS]
    return TEXTS


def _counting(pipe, monkeypatch) -> list[int]:
    """Rows of every model call the pipeline makes."""
    calls: list[int] = []
    run = pipe._run

    def counted(rows, **kwargs):
        calls.append(len(rows))
        return run(rows, **kwargs)

    monkeypatch.setattr(pipe, "_run", counted)
    return calls


TASKS = ["text-classification", "fill-mask", "token-classification", "feature-extraction",
         "question-answering"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_groups_the_calls_and_changes_no_result(pipes, models, tok, task, batch_size,
                                                          monkeypatch):
    pipe = pipes[task]
    inputs = _inputs(task)
    calls = _counting(pipe, monkeypatch)
    ours = pipe(inputs, batch_size=batch_size)
    if task != "question-answering":  # question answering groups the windows of one question
        assert calls == [min(batch_size, len(inputs) - i)
                         for i in range(0, len(inputs), batch_size)]
    if task == "question-answering":  # transformers 5 has no question-answering pipeline
        assert_same(ours, [pipe(x) for x in inputs])  # test_question_answering checks those
        return
    reference = hf_pipeline(task, model=models[task], tokenizer=tok)
    assert_same(ours, reference(inputs))  # transformers batch_size 1: each text unpadded


@pytest.mark.parametrize("task", TASKS)
def test_a_generator_gives_a_generator_of_the_same_results(pipes, task, monkeypatch):
    pipe = pipes[task]
    inputs = _inputs(task)
    expected = pipe(inputs)
    calls = _counting(pipe, monkeypatch)
    results = pipe((x for x in inputs), batch_size=3)
    assert calls == []  # nothing runs before the first result is asked for
    first = next(results)
    assert len(calls) == (3 if task == "question-answering" else 1)  # QA: a call per question
    assert_same([first, *results], expected)
    if task != "question-answering":
        assert calls == [3, 3, 1]
    # one at a time (the compiled batch size, 1): a fill-mask result is not unwrapped twice
    assert_same(list(pipe(iter(inputs))), expected)


def test_the_pipeline_batch_size_is_the_default_and_a_call_overrides_it(models, tok, monkeypatch):
    pipe = mbcompile.pipeline(
        "text-classification", mbcompile.compile(models["text-classification"], seq_len=SEQ),
        tokenizer=tok, batch_size=4,
    )
    assert pipe.batch_size == 4
    calls = _counting(pipe, monkeypatch)
    pipe(TEXTS)
    assert calls == [4, 3]
    calls.clear()
    pipe(TEXTS, batch_size=7)
    assert calls == [7]


@pytest.mark.parametrize("bad", [0, -2, 2.5, "8", True])
def test_a_bad_batch_size_is_refused_by_name(pipes, models, tok, bad):
    pipe = pipes["text-classification"]
    with pytest.raises(PipelineError, match="batch_size must be a positive integer"):
        pipe(TEXTS, batch_size=bad)
    with pytest.raises(PipelineError, match="batch_size must be a positive integer"):
        pipe(iter(TEXTS), batch_size=bad)  # at the call, not at the first result
    with pytest.raises(PipelineError, match="batch_size must be a positive integer"):
        mbcompile.pipeline("text-classification", pipe.model, tokenizer=tok, batch_size=bad)


def test_next_sentence_takes_batch_size(tok, monkeypatch):
    model = make_model("next-sentence", config(), seed=9)
    pipe = mbcompile.pipeline("next-sentence-prediction", mbcompile.compile(model, seq_len=SEQ),
                              tokenizer=tok)
    calls = _counting(pipe, monkeypatch)
    firsts, seconds = TEXTS[:5], TEXTS[2:7]
    grouped = pipe(firsts, seconds, batch_size=2)
    assert calls == [2, 2, 1]
    alone = [pipe(a, b) for a, b in zip(firsts, seconds)]
    assert_same(grouped, alone)
    assert all(0.5 <= r["score"] <= 1.0 for r in grouped)
