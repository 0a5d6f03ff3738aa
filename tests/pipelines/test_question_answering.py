"""question-answering: spans and scores equal transformers 4.x's QuestionAnsweringPipeline, which
is compared step by step on the eager model's logits with transformers' ``select_starts_ends``
(transformers 5 has no question-answering pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_helpers import LONG_CONTEXT, SEQ, assert_same
from transformers.pipelines.document_question_answering import select_starts_ends

import mbcompile
from mbcompile.pipelines import PipelineError


def qa_reference(model, tok, question, context, *, max_seq_len=SEQ, doc_stride, top_k=1,
                 handle_impossible_answer=False, max_answer_len=15):
    """transformers 4.x's QuestionAnsweringPipeline, step by step on the eager model."""
    enc = tok(question, context, truncation="only_second", max_length=max_seq_len,
              stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
              return_token_type_ids=True)
    min_null_score, answers = 1000000, []
    for w in range(len(enc["input_ids"])):
        inputs = {k: torch.tensor([enc[k][w]])
                  for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            out = model(**inputs)
        p_mask = np.array([s != 1 for s in enc.sequence_ids(w)])
        p_mask[0] = False  # [CLS] stays unmasked
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
            np.array(enc["attention_mask"][w]), min_null_score, top_k,
            handle_impossible_answer, max_answer_len,
        )
        encoding = enc.encodings[w]
        for s, e, score in zip(starts, ends, scores):
            # QuestionAnsweringPipeline.get_indices(align_to_words=True): whole words, else the
            # token offsets ([CLS] has no word).
            words = encoding.token_to_word(int(s)), encoding.token_to_word(int(e))
            if None in words:
                start, end = encoding.offsets[s][0], encoding.offsets[e][1]
            else:
                start = encoding.word_to_chars(words[0], sequence_index=1)[0]
                end = encoding.word_to_chars(words[1], sequence_index=1)[1]
            answers.append({"score": score.item(), "start": start, "end": end,
                            "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


QUESTION = "where does john smith live ?"
CONTEXT = "john smithson lives in londonville , the capital of england ."


@pytest.mark.parametrize(
    "params",
    [{}, {"top_k": 3}, {"top_k": 2, "handle_impossible_answer": True, "max_answer_len": 4}],
)
def test_question_answering_matches_transformers(qa, tok, params):
    model, compiled = qa
    ours = mbcompile.pipeline("question-answering", compiled, tokenizer=tok)(
        question=QUESTION, context=CONTEXT, **params
    )
    ref = qa_reference(model, tok, QUESTION, CONTEXT, doc_stride=SEQ // 2, **params)
    assert_same(ours, ref)
    for answer in ours if isinstance(ours, list) else [ours]:
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]


def test_question_answering_reads_a_long_context_in_stride_windows(qa, tok):
    model, compiled = qa
    windows = tok(QUESTION, LONG_CONTEXT, truncation="only_second", max_length=SEQ, stride=6,
                  return_overflowing_tokens=True)["input_ids"]
    assert len(windows) >= 3 and len(tok(LONG_CONTEXT)["input_ids"]) > SEQ
    answer = mbcompile.pipeline("question-answering", compiled, tokenizer=tok)
    for params in ({"doc_stride": 6}, {"doc_stride": 6, "top_k": 3}):
        ours = answer({"question": QUESTION, "context": LONG_CONTEXT}, **params)
        assert_same(ours, qa_reference(model, tok, QUESTION, LONG_CONTEXT, **params))
    # The default stride fits the question: the same windows as transformers' default stride.
    ours = answer(question=[QUESTION, "what is big ?"], context=LONG_CONTEXT)
    assert_same(ours[0], qa_reference(model, tok, QUESTION, LONG_CONTEXT, doc_stride=SEQ // 2))


def test_question_answering_refuses_what_cannot_fit(qa, tok):
    _, compiled = qa
    answer = mbcompile.pipeline("question-answering", compiled, tokenizer=tok)
    long_question = " ".join(["where does the big red cat live ?"] * 4)
    with pytest.raises(PipelineError, match=r"question is \d+ tokens long.*seq_len 32"):
        answer(question=long_question, context=CONTEXT)
    with pytest.raises(PipelineError, match="doc_stride=30 must be smaller than the 23"):
        answer(question=QUESTION, context=LONG_CONTEXT, doc_stride=30)
    with pytest.raises(PipelineError, match="max_seq_len=64 exceeds the compiled seq_len=32"):
        answer(question=QUESTION, context=CONTEXT, max_seq_len=64)
    with pytest.raises(ValueError, match="context cannot be empty"):
        answer(question=QUESTION, context=" ")
