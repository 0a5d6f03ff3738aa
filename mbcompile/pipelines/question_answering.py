"""Question answering: the answer span in a context, as transformers 4.x's pipeline.

    qa = mbcompile.pipeline("question-answering", compiled, tokenizer="path/to/checkpoint")
    qa(question="where is the cat ?", context=long_text)       # {score, start, end, answer}

Follows transformers 4.x's QuestionAnsweringPipeline (transformers 5 dropped it), including its
stride windows over contexts longer than the compiled ``seq_len``; the span maths is in
``spans.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mbcompile.errors import PipelineError, PipelineTypeError
from mbcompile.pipelines.base import (
    Pipeline,
    _check_positive,
    _check_unicode,
    _is_int,
    _is_stream,
)
from mbcompile.pipelines.spans import _char_span, _select_starts_ends


class QuestionAnsweringPipeline(Pipeline):
    """Extract the answer span from a context, as transformers 4.x's QuestionAnsweringPipeline.

    Returns {score, start, end, answer} (character offsets into the context), or a list of
    ``top_k`` of them. A context longer than the compiled ``seq_len`` is read in overlapping
    windows of ``max_seq_len`` tokens (default: ``seq_len``) that overlap by ``doc_stride`` tokens
    (default: half a window, at most 128), and the best span of all windows wins.
    """

    task = "question-answering"
    heads = ("question-answering",)
    needs_fast_tokenizer = True

    def __call__(
        self,
        question: str | list[str] | dict | list[dict] | None = None,
        context: str | list[str] | None = None,
        *,
        top_k: int = 1,
        doc_stride: int | None = None,
        max_answer_len: int = 15,
        max_seq_len: int | None = None,
        handle_impossible_answer: bool = False,
        align_to_words: bool = True,
        batch_size: int | None = None,
    ) -> dict[str, Any] | list | Iterator:
        if _is_stream(question):  # of {"question", "context"} dicts
            return self._stream(question, batch_size, lambda chunk: self(
                list(chunk), top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len,
                max_seq_len=max_seq_len, handle_impossible_answer=handle_impossible_answer,
                align_to_words=align_to_words, batch_size=batch_size))
        top_k = _check_positive("top_k", top_k)
        # no answer is longer than the context: a larger bound changes nothing (and numpy's
        # span mask cannot be built for 2**70)
        max_answer_len = min(_check_positive("max_answer_len", max_answer_len), 1 << 20)
        if max_seq_len is None:
            max_seq_len = min(self.seq_len, self.tokenizer.model_max_length)
        max_seq_len = _check_positive("max_seq_len", max_seq_len)
        if max_seq_len > self.seq_len:
            raise PipelineError(
                f"question-answering: max_seq_len={max_seq_len} exceeds the compiled "
                f"seq_len={self.seq_len}"
            )
        if doc_stride is not None and (not _is_int(doc_stride) or doc_stride < 0):
            raise PipelineError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
        examples, single = self._examples(question, context)
        results = [
            self._answer(q, c, top_k, doc_stride, max_answer_len, max_seq_len,
                         handle_impossible_answer, align_to_words, batch_size)
            for q, c in examples
        ]
        return results[0] if single else results

    @staticmethod
    def _examples(question, context) -> tuple[list[tuple[str, str]], bool]:
        if isinstance(question, dict):
            question, context = question.get("question"), question.get("context")
        if isinstance(question, str) or isinstance(context, str) and question is None:
            pairs, single = [(question, context)], True
        elif isinstance(question, (list, tuple)) and question and all(
            isinstance(q, dict) for q in question
        ):
            pairs, single = [(q.get("question"), q.get("context")) for q in question], False
        elif isinstance(question, (list, tuple)):
            contexts = [context] * len(question) if isinstance(context, str) else context
            if not isinstance(contexts, (list, tuple)) or len(contexts) != len(question):
                raise PipelineError(
                    "question-answering: give as many contexts as questions (or one context)"
                )
            pairs, single = list(zip(question, contexts)), False
        else:
            raise PipelineTypeError(
                "question-answering: expected question= and context= strings, a dict "
                "{'question': ..., 'context': ...} or a list of them"
            )
        if not pairs:
            raise PipelineError("question-answering: at least one question is required")
        for q, c in pairs:
            for name, value in (("question", q), ("context", c)):
                if not isinstance(value, str):
                    raise PipelineTypeError(f"question-answering: {name} must be a string, got {value!r}")
                if not value.strip():
                    raise PipelineError(f"question-answering: {name} cannot be empty")
                _check_unicode("question-answering", name, value)
        return pairs, single

    def _answer(self, question, context, top_k, doc_stride, max_answer_len, max_seq_len,
                handle_impossible_answer, align_to_words, batch_size=None):
        tok = self.tokenizer
        question_first = tok.padding_side == "right"
        q_len = len(self._tokenize(question, add_special_tokens=False)["input_ids"])
        room = max_seq_len - q_len - tok.num_special_tokens_to_add(pair=True)
        if room < 1:
            raise PipelineError(
                f"question-answering: the question is {q_len} tokens long; with the special "
                f"tokens it leaves no room for the context in max_seq_len={max_seq_len} "
                f"(compiled seq_len {self.seq_len}); shorten the question or recompile with a "
                f"larger seq_len"
            )
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128, room - 1)
        elif doc_stride >= room:
            raise PipelineError(
                f"question-answering: doc_stride={doc_stride} must be smaller than the {room} "
                f"context tokens that fit in one window beside this question"
            )
        enc = self._tokenize(
            question if question_first else context,
            context if question_first else question,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_token_type_ids=True,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        windows = len(enc["input_ids"])
        context_index = 1 if question_first else 0
        rows = []
        for w in range(windows):
            ids = enc["input_ids"][w]
            allowed = np.array([s == context_index for s in enc.sequence_ids(w)])
            # The [CLS] token stays a candidate: some models use it for "no answer".
            allowed[np.asarray(ids) == tok.cls_token_id] = True
            rows.append(
                {
                    "input_ids": ids,
                    "attention_mask": enc["attention_mask"][w],
                    "token_type_ids": enc["token_type_ids"][w],
                    "allowed": allowed & (np.asarray(enc["attention_mask"][w]) == 1),
                }
            )

        min_null_score = 1000000.0  # large and positive, as transformers starts it
        answers = []
        done = 0
        for batch in self._batches(rows, batch_size):
            out = self._run(batch)
            for b, row in enumerate(batch):
                n = len(row["input_ids"])
                starts, ends, scores, min_null_score = _select_starts_ends(
                    out.start_logits[b, :n], out.end_logits[b, :n], row["allowed"],
                    min_null_score, top_k, handle_impossible_answer, max_answer_len,
                )
                encoding = enc.encodings[done + b]
                for s, e, score in zip(starts, ends, scores):
                    start, end = _char_span(encoding, int(s), int(e), context_index, align_to_words)
                    answers.append(
                        {"score": float(score), "start": start, "end": end,
                         "answer": context[start:end]}
                    )
            done += len(batch)
        if handle_impossible_answer:
            answers.append({"score": float(min_null_score), "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers
