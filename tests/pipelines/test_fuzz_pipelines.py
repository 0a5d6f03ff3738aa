"""Fuzzing the pipelines (issue 14, points 2 and 5): any text (all of unicode, lone surrogates,
control characters, empty, very long), list of texts, or non-text (None, numbers, bytes) given to
fill-mask, text-classification, token-classification or question-answering gives a result or a
PipelineError, never another exception; so does any value of their options and a damaged
tokenizer file.

The models here have a trained [PAD] row (``helpers.trained_pad_row``) and are compiled for
batches of 2, so texts of different lengths share a compiled call, padded to the longest: the
results equal each text alone, and transformers' pipeline on the eager model (point 2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TOL, make_model, trained_pad_row
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pipeline_helpers import LONG_CONTEXT, SEQ, WORDS, assert_same, config
from test_question_answering import qa_reference
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.errors import PipelineError

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TIE = 1e-5  # two candidates this close may rank either way between a batch and a text alone
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
HEADS = {
    "fill-mask": ("masked-lm", {}),
    "text-classification": (
        "sequence-classification",
        {"num_labels": 3, "id2label": {0: "negative", 1: "neutral", 2: "positive"}},
    ),
    "token-classification": ("token-classification", {"id2label": NER_LABELS,
                                                      "initializer_range": 0.12}),
    "question-answering": ("question-answering", {"initializer_range": 0.15}),
}


@pytest.fixture(scope="module")
def models():
    """task → (eager model with a trained [PAD] row, its compiled form for batches of 2)."""
    built = {}
    for task, (head, overrides) in HEADS.items():
        model = trained_pad_row(make_model(head, config(**overrides), seed=2))
        built[task] = model, mbcompile.compile(model, seq_len=SEQ, batch_size=2)
    return built


@pytest.fixture(scope="module")
def pipes(models, tok):
    return {task: mbcompile.pipeline(task, compiled, tokenizer=tok)
            for task, (_, compiled) in models.items()}


# -- strategies --------------------------------------------------------------------------------

SPECIAL = ["[MASK]", "[UNK]", "[PAD]", "[CLS]", "[SEP]", "##s", "'"]
ODD_TEXTS = [
    "", " ", "\x00", "\t\n\r\x0b\x0c", "\u200b\ufeff\u00ad", "\ud800", "a\udfffb", "🙂" * 5,
    "e\u0301" * 3, "[MASK]" * 40, " " * 5000, "the " * 600, "\u202e the cat", "ǅ İ ß ﬁ",
]
words = st.lists(st.sampled_from(WORDS + SPECIAL), max_size=40).map(" ".join)
unicode_text = st.text(
    alphabet=st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=40
)
control_text = st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=10)
texts = st.one_of(words, words, unicode_text, control_text, st.sampled_from(ODD_TEXTS))
masked_texts = st.tuples(texts, words).map(lambda pair: f"{pair[0]} [MASK] {pair[1]}")
not_text = st.one_of(
    st.none(), st.integers(), st.floats(), st.binary(max_size=4), st.booleans(),
    st.sampled_from([[], [[]], [None], ["a", None], [3], {"text": None}, {"x": "a"}, ("a",)]),
)


def inputs(text_strategy):
    """A text, a list of texts of different lengths, or something that is not text."""
    return st.one_of(
        text_strategy,
        st.lists(text_strategy, min_size=1, max_size=5),
        not_text,
        st.lists(st.one_of(text_strategy, not_text), min_size=1, max_size=3),
    )


# -- the property ------------------------------------------------------------------------------


def result_or_pipeline_error(run, *args, **kwargs):
    """The pipeline's result, or None if it raised PipelineError; anything else fails."""
    try:
        return run(*args, **kwargs)
    except PipelineError:
        return None
    except Exception as err:  # noqa: BLE001 - the property under test
        raise AssertionError(f"raw {type(err).__name__} instead of a PipelineError: {err}") from err


def _dicts(result):
    """Every result dict in a nested list result."""
    if isinstance(result, dict):
        return [result]
    assert isinstance(result, list), type(result)
    return [d for item in result for d in _dicts(item)]


def _check_scores(result) -> None:
    for d in _dicts(result):
        assert isinstance(d["score"], float) and math.isfinite(d["score"]), d
        assert -TOL <= d["score"] <= 1 + TOL, d


def assert_close(ours, ref, where="result") -> None:
    """Same nesting, keys and values; scores within TOL; two candidates whose scores are within
    TIE may take each other's place."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), (where, ours, ref)
        others = [k for k in ref if k != "score"]
        if "score" in ref and any(ours[k] != ref[k] for k in others):
            assert abs(ours["score"] - ref["score"]) <= TIE, (where, ours, ref)
            return
        for key in ref:
            assert_close(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref), (where, ours, ref)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(ref, float):
        assert abs(ours - ref) <= TOL, (where, ours, ref)
    else:
        assert ours == ref, (where, ours, ref)


def _a_batch(value) -> bool:
    return isinstance(value, list) and len(value) > 1 and all(isinstance(t, str) for t in value)


# -- text fuzz, one test per task ---------------------------------------------------------------


def _scored_and_each_text_alone_agrees(run, value, **options) -> None:
    """A result (scores in [0, 1]) or a PipelineError; a batch gives each text's own result."""
    result = result_or_pipeline_error(run, value, **options)
    if result is None:
        return
    _check_scores(result)
    if _a_batch(value):
        for text, got in zip(value, result):
            assert_close(got, run(text, **options))


@FUZZ
@given(value=inputs(st.one_of(masked_texts, texts)), top_k=st.integers(1, 6))
@example(value="\ud800 [MASK]", top_k=1)
@example(value=None, top_k=1)
@example(value=3, top_k=1)
def test_fill_mask_gives_a_result_or_a_pipeline_error(pipes, value, top_k):
    _scored_and_each_text_alone_agrees(pipes["fill-mask"], value, top_k=top_k)


@FUZZ
@given(value=inputs(texts))
@example(value="\ud800")
@example(value=None)
@example(value=3.5)
def test_text_classification_gives_a_result_or_a_pipeline_error(pipes, value):
    _scored_and_each_text_alone_agrees(pipes["text-classification"], value, top_k=None)


@FUZZ
@given(
    value=inputs(texts),
    strategy=st.sampled_from(["none", "simple", "first", "average", "max"]),
    stride=st.one_of(st.none(), st.integers(0, 12)),
)
@example(value="\ud800", strategy="simple", stride=None)
@example(value=None, strategy="simple", stride=None)
@example(value=7, strategy="none", stride=None)
def test_token_classification_gives_a_result_or_a_pipeline_error(pipes, value, strategy, stride):
    tag = pipes["token-classification"]
    options = {"aggregation_strategy": strategy, "stride": stride, "ignore_labels": []}
    result = result_or_pipeline_error(tag, value, **options)
    if result is None:
        return
    _check_scores(result)
    several = not isinstance(value, str)
    for text, found in zip(value if several else [value], result if several else [result]):
        for entity in found:
            assert 0 <= entity["start"] <= entity["end"] <= len(text), (text, entity)
    if _a_batch(value):
        for text, got in zip(value, result):
            assert_close(got, tag(text, **options))


questions = st.one_of(texts, not_text)
contexts = st.one_of(texts, st.just(LONG_CONTEXT), st.just(LONG_CONTEXT * 3), not_text)


@FUZZ
@given(
    call=st.one_of(
        st.tuples(questions, contexts).map(lambda qc: ((), {"question": qc[0], "context": qc[1]})),
        st.tuples(questions, contexts).map(lambda qc: (({"question": qc[0], "context": qc[1]},), {})),
        st.tuples(st.lists(questions, max_size=3), contexts).map(
            lambda qc: ((), {"question": qc[0], "context": qc[1]})
        ),
        st.tuples(questions).map(lambda q: ((), {"question": q[0]})),
        st.tuples(not_text).map(lambda v: ((v,), {})),
    ),
    top_k=st.integers(1, 3),
)
@example(call=((), {"question": "\ud800", "context": "the cat sat ."}), top_k=1)
@example(call=((), {"question": "where ?", "context": "\ud800"}), top_k=1)
def test_question_answering_gives_a_result_or_a_pipeline_error(pipes, call, top_k):
    answer = pipes["question-answering"]
    args, kwargs = call
    result = result_or_pipeline_error(answer, *args, top_k=top_k, **kwargs)
    if result is None:
        return
    _check_scores(result)
    context = kwargs.get("context") if kwargs else args[0]["context"]
    if not isinstance(context, str):
        return
    for d in _dicts(result):
        assert context[d["start"] : d["end"]] == d["answer"], d
    asked = kwargs.get("question")
    if _a_batch(asked):
        for question, got in zip(asked, result):
            assert_close(got, answer(question=question, context=context, top_k=top_k))


# -- options fuzz ------------------------------------------------------------------------------

OPTION_VALUES = [
    0, -1, 1, 2, 1.5, "3", "simple", "sigmoid", True, False, None, 10**9, 2**70, np.int64(2),
    float("nan"), float("inf"), [1], ["the"], [], "", "\ud800", {"a": 1},
]
OPTIONS = {
    "fill-mask": (("the [MASK] sat .",), {}, ["top_k", "targets"]),
    "text-classification": (("the cat sat .",), {}, ["top_k", "function_to_apply"]),
    "token-classification": (  # stride needs an aggregation
        ("john smith lives in paris .",), {"aggregation_strategy": "simple"},
        ["aggregation_strategy", "ignore_labels", "stride"],
    ),
    "question-answering": (
        (), {"question": "where does john live ?", "context": "john lives in paris ."},
        ["top_k", "doc_stride", "max_answer_len", "max_seq_len", "handle_impossible_answer",
         "align_to_words"],
    ),
}


@pytest.mark.parametrize("task", list(OPTIONS))
def test_any_option_value_gives_a_result_or_a_pipeline_error(pipes, task):
    """Every option of each task, with each of ``OPTION_VALUES`` (all collected, then shown)."""
    args, kwargs, names = OPTIONS[task]
    raw = []
    for name in names:
        for value in OPTION_VALUES:
            try:
                result_or_pipeline_error(pipes[task], *args, **{**kwargs, name: value})
            except AssertionError as err:
                raw.append(f"{task} {name}={value!r}: {err}")
    assert raw == [], f"{len(raw)} raw errors:\n" + "\n".join(raw)


# -- damaged tokenizer files -------------------------------------------------------------------

DAMAGED_TOKENIZERS = {
    "tokenizer.json": [b"{", b"[]", b"{}"],
    "tokenizer_config.json": [b"{", b"[1]"],
    "special_tokens_map.json": [b"{"],
    "added_tokens.json": [b"{"],
    "vocab.txt": [b"", bytes(range(256))],
}


@pytest.mark.parametrize(
    "name, data",
    [(name, data) for name, datas in DAMAGED_TOKENIZERS.items() for data in datas],
    ids=lambda v: v if isinstance(v, str) else repr(v[:8]),
)
def test_a_damaged_tokenizer_file_is_a_pipeline_error_naming_it(models, vocab_dir, tmp_path,
                                                                  name, data):
    _, compiled = models["question-answering"]
    files = {"vocab.txt": (vocab_dir / "vocab.txt").read_bytes(), name: data}
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_bytes(content)
    saved = compiled.save(tmp_path / "qa.mbc", tokenizer_files=files)
    for where, make in (
        ("a folder", lambda: mbcompile.pipeline("question-answering", compiled, tokenizer=folder)),
        ("the artifact", lambda: mbcompile.pipeline("question-answering", saved)),
    ):
        try:
            make()(question="where is the cat ?", context="the cat sat on the mat .")
        except PipelineError as err:
            assert name in str(err), f"from {where}: the message does not name {name}: {err}"
        except Exception as err:  # noqa: BLE001 - the property under test
            raise AssertionError(
                f"from {where}: raw {type(err).__name__} instead of a PipelineError: {err}"
            ) from err
        else:
            pytest.fail(f"from {where}: a damaged {name} ({data[:8]!r}) was accepted")


# -- the padding rule (point 2) ----------------------------------------------------------------

BATCH = [
    "the [MASK] .",
    "john smith lives in paris , the capital of [MASK] .",
    "[MASK]",
    "mary works in berlin , a big city in [MASK] . the old river is red and it is new .",
    "who [MASK] there ?",
]


def _lengths_differ(tok, texts):
    lengths = {len(tok(t)["input_ids"]) for t in texts}
    assert len(lengths) > 2, lengths  # rows of different lengths share compiled calls


@pytest.mark.parametrize(
    "task, params",
    [
        ("fill-mask", {"top_k": 3}),
        ("text-classification", {"top_k": None}),
        ("token-classification", {"ignore_labels": [], "aggregation_strategy": "none"}),
        ("token-classification", {"aggregation_strategy": "simple"}),
    ],
)
def test_texts_batched_together_give_each_texts_result_alone_and_transformers(
    models, pipes, tok, task, params
):
    model, _ = models[task]
    texts = BATCH if task == "fill-mask" else [t.replace("[MASK]", "paris") for t in BATCH]
    _lengths_differ(tok, texts)
    batched = pipes[task](texts, **params)
    reference = hf_pipeline(task, model=model, tokenizer=tok)  # the eager model, text by text
    for text, got in zip(texts, batched):
        assert_same(got, pipes[task](text, **params), f"{text!r} in a batch vs alone")
        assert_same(got, reference(text, **params), f"{text!r} vs transformers")


def test_question_answering_windows_batched_together_give_transformers_answers(models, pipes,
                                                                              tok):
    """A long context is read in windows; the last is shorter and shares a call with another."""
    model, _ = models["question-answering"]
    question = "where does john smith live ?"
    windows = tok(question, LONG_CONTEXT, truncation="only_second", max_length=SEQ, stride=6,
                  return_overflowing_tokens=True)["input_ids"]
    assert len({len(w) for w in windows}) > 1 and len(windows) >= 3
    for top_k in (1, 3):
        ours = pipes["question-answering"](question=question, context=LONG_CONTEXT, doc_stride=6,
                                           top_k=top_k)
        assert_same(ours, qa_reference(model, tok, question, LONG_CONTEXT, doc_stride=6,
                                       top_k=top_k))


def test_the_trained_pad_row_is_not_zero(models, tok):
    """Else the tests above could not see padding leak (PyTorch's init zeroes that row)."""
    for model, _ in models.values():
        row = model.get_input_embeddings().weight[tok.pad_token_id]
        assert float(row.abs().sum()) > 0
