"""Tokenizer-based pipelines over a compiled MobileBERT, shaped like transformers' ``pipeline``.

    fill = mbcompile.pipeline("fill-mask", "mlm.mbc")        # the artifact holds its tokenizer
    fill("the capital of france is [MASK] .")                # [{score, token, token_str, sequence}]
    qa = mbcompile.pipeline("question-answering", compiled, tokenizer="path/to/checkpoint")
    qa(question="where is the cat ?", context=long_text)       # {score, start, end, answer}

Each pipeline returns what transformers' pipeline of the same task returns (keys, order, nesting;
scores as Python floats) and computes it the same way, so a compiled model and its eager original
agree to the model's 1e-4 tolerance. Question answering follows transformers 4.x's
QuestionAnsweringPipeline (transformers 5 dropped it), including its stride windows over contexts
longer than the compiled ``seq_len``.

The model runs with numpy and TVM (no torch); the tokenizer is a transformers tokenizer object, a
local folder of tokenizer files, or (default) the tokenizer saved in the artifact. Nothing is
downloaded: folders load with ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .errors import MbcompileError
from .runtime import CompiledModel, load


class PipelineError(MbcompileError, ValueError):
    """A pipeline cannot serve this input or model: wrong task for the head, no mask token,
    missing tokenizer, text longer than the compiled sequence length."""


# -- helpers shared by the tasks --------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _id2label(config: dict, width: int) -> dict[int, str]:
    """The config's id2label (its keys are strings once saved as JSON); LABEL_i where missing."""
    labels = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return {i: labels.get(i, f"LABEL_{i}") for i in range(width)}


def _load_tokenizer_folder(folder: Path):
    """A transformers tokenizer from local files only (MobileBERT's tokenizer is BERT's)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if (folder / "tokenizer_config.json").is_file() or (folder / "config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (ValueError, OSError, KeyError):
            pass  # e.g. a config without a tokenizer class: BERT's tokenizer below
    if (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file():
        return BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    raise PipelineError(
        f"tokenizer: {folder} holds no tokenizer files "
        f"(looked for {list(artifact.TOKENIZER_FILES)})"
    )


def _tokenizer_from_files(files: dict[str, bytes], config: dict | None):
    """Load a tokenizer from file contents (e.g. an artifact's tokenizer/ members)."""
    with tempfile.TemporaryDirectory(prefix="mbcompile-tokenizer-") as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        if "config.json" not in files:
            # AutoTokenizer finds the tokenizer class through the model type.
            (folder / "config.json").write_text(json.dumps(config or {"model_type": "mobilebert"}))
        return _load_tokenizer_folder(folder)


def _files_of_tokenizer(tokenizer) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for a tokenizer object, by name."""
    with tempfile.TemporaryDirectory(prefix="mbcompile-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _checkpoint_tokenizer_files(compiled: CompiledModel) -> dict[str, bytes]:
    """Tokenizer files beside the checkpoint the model was compiled from, if that folder is here
    (for artifacts saved before compile recorded them)."""
    source = (compiled.metadata.get("config") or {}).get("_name_or_path") or ""
    return artifact.tokenizer_files(source) if source else {}


# -- the pipelines ----------------------------------------------------------------------------


class Pipeline:
    """A compiled MobileBERT and its tokenizer; subclasses implement one task's ``__call__``."""

    task: str = ""
    heads: tuple[str, ...] = ()  # the compiled heads this task can use
    needs_fast_tokenizer = False  # character offsets come from a fast (Rust) tokenizer only

    def __init__(self, model: CompiledModel, tokenizer, *, tokenizer_files: dict | None = None):
        self.check_head(model)
        if tokenizer is None:
            raise PipelineError(f"{self.task}: a tokenizer is required")
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise TypeError(
                f"tokenizer: expected a transformers tokenizer or a local folder path, got "
                f"{type(tokenizer).__name__}"
            )
        sig = model.signature
        if len(tokenizer) > sig.vocab_size:
            raise PipelineError(
                f"tokenizer: its vocabulary has {len(tokenizer)} tokens, the model's vocab_size "
                f"is {sig.vocab_size}: this tokenizer does not belong to this model"
            )
        if self.needs_fast_tokenizer and not getattr(tokenizer, "is_fast", False):
            raise PipelineError(
                f"{self.task}: needs a fast tokenizer (character offsets), got "
                f"{type(tokenizer).__name__}; load one with AutoTokenizer.from_pretrained(folder)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self._tokenizer_files = tokenizer_files
        self._config: dict = dict(model.metadata.get("config") or {})

    @classmethod
    def check_head(cls, model: CompiledModel) -> None:
        if not isinstance(model, CompiledModel):
            raise TypeError(
                f"model: expected a CompiledModel or an artifact path, got {type(model).__name__}"
            )
        head = model.signature.head
        if head not in cls.heads:
            fitting = [t for t, c in TASKS.items() if head in c.heads]
            hint = f"; for this model use {fitting}" if fitting else ""
            raise PipelineError(
                f"task {cls.task!r} needs a model with head {list(cls.heads)}, this one is "
                f"{model.signature.model_class} (head {head!r}){hint}"
            )

    @property
    def seq_len(self) -> int:
        return self.model.signature.seq_len

    def save(self, path: str | os.PathLike) -> Path:
        """Save the compiled model with this tokenizer in one artifact (written atomically), so
        that ``mbcompile.pipeline(task, path)`` needs no tokenizer argument."""
        files = self._tokenizer_files or _files_of_tokenizer(self.tokenizer)
        return self.model.save(path, tokenizer_files=files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}, tokenizer={type(self.tokenizer).__name__})"

    # -- shared steps ---------------------------------------------------------------------------
    def _encode(self, text: str, pair: str | None = None, *, what: str = "input", **kwargs):
        """Tokenize one text (or pair) without truncation; refuse it if longer than seq_len."""
        for value in (text, pair) if pair is not None else (text,):
            if not isinstance(value, str):
                raise TypeError(
                    f"{self.task}: {what} must be a string, got {type(value).__name__}"
                )
        enc = self.tokenizer(text, pair, **kwargs)
        n = len(enc["input_ids"])
        if n > self.seq_len:
            raise PipelineError(
                f"{self.task}: {what} is {n} tokens long (special tokens included), the model "
                f"was compiled for seq_len={self.seq_len}; shorten it or recompile with "
                f"seq_len>={n}"
            )
        return enc

    def _run(self, rows: Sequence, **kwargs):
        """Run the model on token rows (dicts of lists), right-padded to the longest row."""
        length = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((len(rows), length), pad, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        types = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = r["input_ids"]
            mask[i, :n] = r.get("attention_mask", 1)
            if r.get("token_type_ids") is not None:
                types[i, :n] = r["token_type_ids"]
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types, **kwargs)

    def _width(self, field: str) -> int:
        """The last dimension of an output field (e.g. the number of labels of ``logits``)."""
        return next(o.shape[-1] for o in self.model.signature.outputs if o.name == field)

    def _batches(self, items: list) -> list[list]:
        """Groups of the compiled batch size: one compiled call each."""
        size = self.model.signature.batch_size
        return [items[i : i + size] for i in range(0, len(items), size)]


def _texts(inputs, task: str) -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise ValueError(f"{task}: at least one input is required")
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"{task}: inputs must be strings, got {type(t).__name__}")
    return texts


class FillMaskPipeline(Pipeline):
    """Predict the tokens at the tokenizer's mask token, as transformers' FillMaskPipeline.

    One mask: a list of ``top_k`` dicts {score, token, token_str, sequence}; several masks in a
    text: one such list per mask. A list of texts gives one result per text (a list of one text
    gives that text's result, as transformers does). Works with the pruned build
    (``logits_for="masked"``): the mask positions are passed to it explicitly.
    """

    task = "fill-mask"
    heads = ("masked-lm", "pretraining")

    def __init__(self, model: CompiledModel, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise PipelineError("fill-mask: the tokenizer defines no mask token")
        fields = model.signature.fields
        self._logits = "logits" if "logits" in fields else "prediction_logits"

    def __call__(
        self,
        inputs: str | list[str],
        *,
        top_k: int = 5,
        targets: str | list[str] | None = None,
    ) -> list[dict[str, Any]] | list[list]:
        top_k = _check_positive("top_k", top_k)
        texts = _texts(inputs, self.task)
        target_ids = None if targets is None else self._target_ids(targets)
        mask_id = self.tokenizer.mask_token_id
        sig = self.model.signature
        rows, positions = [], []
        for i, text in enumerate(texts):
            what = f"input {i}" if len(texts) > 1 else "the input"
            enc = self._encode(text, what=what)
            pos = np.flatnonzero(np.asarray(enc["input_ids"]) == mask_id)
            if pos.size == 0:
                raise PipelineError(
                    f"fill-mask: no mask token ({self.tokenizer.mask_token}) in {what}: {text!r}"
                )
            if sig.max_masked is not None and pos.size > sig.max_masked:
                raise PipelineError(
                    f"fill-mask: {what} has {pos.size} mask tokens, the model was compiled with "
                    f"logits_for='masked', max_masked={sig.max_masked}"
                )
            rows.append(enc)
            positions.append(pos)

        results = []
        for batch in self._batches(list(zip(rows, positions))):
            if sig.max_masked is None:
                out = self._run([r for r, _ in batch])
                logits = [out[self._logits][b, pos] for b, (_, pos) in enumerate(batch)]
            else:  # pruned head: logits only at the positions asked for, in that order
                width = max(pos.size for _, pos in batch)
                asked = np.full((len(batch), width), -1, dtype=np.int64)
                for b, (_, pos) in enumerate(batch):
                    asked[b, : pos.size] = pos
                out = self._run([r for r, _ in batch], masked_positions=asked)
                logits = [out[self._logits][b, : pos.size] for b, (_, pos) in enumerate(batch)]
            for (enc, pos), lg in zip(batch, logits):
                results.append(self._postprocess(enc["input_ids"], pos, lg, top_k, target_ids))
        if isinstance(inputs, str) or len(results) == 1:
            return results[0]
        return results

    def _postprocess(self, input_ids, positions, logits, top_k, target_ids) -> list:
        probs = _softmax(logits)  # (masks, vocab)
        if target_ids is not None:
            probs = probs[:, target_ids]
        top_k = min(top_k, probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        single = len(positions) == 1
        pad = self.tokenizer.pad_token_id
        result = []
        for i, pos in enumerate(positions):
            row = []
            for p in order[i]:
                token = int(p if target_ids is None else target_ids[p])
                tokens = np.array(input_ids, dtype=np.int64)
                tokens[pos] = token
                if pad is not None:
                    tokens = tokens[tokens != pad]
                row.append(
                    {
                        "score": float(probs[i, p]),
                        "token": token,
                        "token_str": self.tokenizer.decode([token]),
                        # With several masks the other [MASK]s stay visible, as in transformers.
                        "sequence": self.tokenizer.decode(tokens, skip_special_tokens=single),
                    }
                )
            result.append(row)
        return result[0] if single else result

    def _target_ids(self, targets: str | list[str]) -> np.ndarray:
        """Vocabulary ids of ``targets``; a word not in the vocabulary counts as its first token."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        vocab = self.tokenizer.get_vocab()
        ids = set()
        for target in targets:
            if target in vocab:
                ids.add(vocab[target])
                continue
            pieces = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            if not pieces:
                warnings.warn(f"fill-mask: target {target!r} has no token; ignored", stacklevel=3)
                continue
            warnings.warn(
                f"fill-mask: target {target!r} is not in the vocabulary; using its first token "
                f"{self.tokenizer.convert_ids_to_tokens(pieces[0])!r}",
                stacklevel=3,
            )
            ids.add(pieces[0])
        if not ids:
            raise PipelineError(f"fill-mask: none of the targets {targets} is a token")
        return np.array(sorted(ids), dtype=np.int64)


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
    ) -> dict[str, Any] | list:
        top_k = _check_positive("top_k", top_k)
        max_answer_len = _check_positive("max_answer_len", max_answer_len)
        if max_seq_len is None:
            max_seq_len = min(self.seq_len, self.tokenizer.model_max_length)
        max_seq_len = _check_positive("max_seq_len", max_seq_len)
        if max_seq_len > self.seq_len:
            raise PipelineError(
                f"question-answering: max_seq_len={max_seq_len} exceeds the compiled "
                f"seq_len={self.seq_len}"
            )
        if doc_stride is not None and (isinstance(doc_stride, bool) or doc_stride < 0):
            raise ValueError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
        examples, single = self._examples(question, context)
        results = [
            self._answer(q, c, top_k, doc_stride, max_answer_len, max_seq_len,
                         handle_impossible_answer, align_to_words)
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
                raise ValueError(
                    "question-answering: give as many contexts as questions (or one context)"
                )
            pairs, single = list(zip(question, contexts)), False
        else:
            raise TypeError(
                "question-answering: expected question= and context= strings, a dict "
                "{'question': ..., 'context': ...} or a list of them"
            )
        if not pairs:
            raise ValueError("question-answering: at least one question is required")
        for q, c in pairs:
            for name, value in (("question", q), ("context", c)):
                if not isinstance(value, str):
                    raise TypeError(f"question-answering: {name} must be a string, got {value!r}")
                if not value.strip():
                    raise ValueError(f"question-answering: {name} cannot be empty")
        return pairs, single

    def _answer(self, question, context, top_k, doc_stride, max_answer_len, max_seq_len,
                handle_impossible_answer, align_to_words):
        tok = self.tokenizer
        question_first = tok.padding_side == "right"
        q_len = len(tok(question, add_special_tokens=False)["input_ids"])
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
        enc = tok(
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
        for batch in self._batches(rows):
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


def _select_starts_ends(start, end, allowed, min_null_score, top_k, handle_impossible_answer,
                        max_answer_len):
    """Span probabilities from start/end logits, as transformers' ``select_starts_ends``:
    softmax over the allowed tokens, P(span) = P(start)·P(end), end ≥ start, at most
    ``max_answer_len`` tokens."""
    start = _softmax(np.where(allowed, start, -10000.0))
    end = _softmax(np.where(allowed, end, -10000.0))
    if handle_impossible_answer:
        min_null_score = min(min_null_score, float(start[0] * end[0]))
    start[0] = end[0] = 0.0  # the [CLS] span is the null answer, counted above
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = candidates.ravel()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif flat.size <= top_k:
        order = np.argsort(-flat, kind="stable")
    else:
        part = np.argpartition(-flat, top_k)[:top_k]
        order = part[np.argsort(-flat[part], kind="stable")]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = allowed[starts] & allowed[ends]
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends], min_null_score


def _char_span(encoding, s: int, e: int, sequence_index: int, align_to_words: bool):
    """Character offsets of tokens s..e in the context: whole words by default, as transformers."""
    if align_to_words:
        start_word, end_word = encoding.token_to_word(s), encoding.token_to_word(e)
        if start_word is not None and end_word is not None:
            start = encoding.word_to_chars(start_word, sequence_index=sequence_index)
            end = encoding.word_to_chars(end_word, sequence_index=sequence_index)
            if start is not None and end is not None:
                return start[0], end[1]
    return encoding.offsets[s][0], encoding.offsets[e][1]


_LEGACY = object()  # top_k not given: transformers' single-best output shape


class TextClassificationPipeline(Pipeline):
    """Classify texts or text pairs, as transformers' TextClassificationPipeline.

    Labels come from the config's ``id2label``. Scores: sigmoid for one label or
    ``multi_label_classification``, softmax for several labels, none for ``regression`` (or
    ``function_to_apply="sigmoid" | "softmax" | "none"``). A text gives ``[{label, score}]`` (the
    best label); a pair is given as ``{"text": ..., "text_pair": ...}``; ``top_k=n`` gives the
    ``n`` best labels per input, ``top_k=None`` all of them.
    """

    task = "text-classification"
    heads = ("sequence-classification",)

    def __call__(
        self,
        inputs: str | dict | list[str] | list[dict],
        *,
        top_k: Any = _LEGACY,
        function_to_apply: str | None = None,
    ) -> list | dict:
        legacy = top_k is _LEGACY
        if not legacy and top_k is not None:
            top_k = _check_positive("top_k", top_k)
        function = self._function(function_to_apply)
        items = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
        if not items:
            raise ValueError("text-classification: at least one input is required")
        rows = []
        for i, item in enumerate(items):
            what = f"input {i}" if len(items) > 1 else "the input"
            if isinstance(item, dict):
                unknown = set(item) - {"text", "text_pair"}
                if "text" not in item or unknown:
                    raise ValueError(
                        f"text-classification: a pair is {{'text': ..., 'text_pair': ...}}, got "
                        f"keys {sorted(item)}"
                    )
                rows.append(self._encode(item["text"], item.get("text_pair"), what=what))
            else:
                rows.append(self._encode(item, what=what))
        logits = np.concatenate([self._run(b).logits for b in self._batches(rows)], axis=0)
        labels = _id2label(self._config, logits.shape[-1])
        scores = {"sigmoid": _sigmoid, "softmax": _softmax, "none": np.asarray}[function](logits)
        results = []
        for row in scores:
            if legacy:
                best = int(row.argmax())
                results.append({"label": labels[best], "score": float(row[best])})
                continue
            ranked = sorted(
                ({"label": labels[i], "score": float(s)} for i, s in enumerate(row)),
                key=lambda d: d["score"],
                reverse=True,
            )
            results.append(ranked if top_k is None else ranked[:top_k])
        if isinstance(inputs, str) and legacy:
            return results  # transformers: one text gives a list holding one dict
        return results[0] if isinstance(inputs, (str, dict)) else results

    def _function(self, name: str | None) -> str:
        if name is not None:
            name = name.lower()
            if name not in ("sigmoid", "softmax", "none"):
                raise ValueError(
                    f"function_to_apply: unknown {name!r}; known: ['sigmoid', 'softmax', 'none']"
                )
            return name
        problem = self._config.get("problem_type")
        num_labels = len(self._config.get("id2label") or {}) or self._width("logits")
        if problem == "regression":
            return "none"
        if problem == "multi_label_classification" or num_labels == 1:
            return "sigmoid"
        return "softmax"


_AGGREGATIONS = ("none", "simple", "first", "average", "max")


class TokenClassificationPipeline(Pipeline):
    """Label each token (e.g. named entities), as transformers' TokenClassificationPipeline.

    ``aggregation_strategy="none"``: one dict per token {entity, score, index, word, start, end};
    ``"simple"`` groups adjacent tokens of one entity (B-/I- tags) into {entity_group, score,
    word, start, end}; ``"first" | "average" | "max"`` first make the sub-words of a word agree.
    Labels in ``ignore_labels`` (default ["O"]) are dropped. A text longer than ``seq_len`` needs
    ``stride=n``: it is then read in windows overlapping by ``n`` tokens (not with "none").
    """

    task = "token-classification"
    heads = ("token-classification",)
    needs_fast_tokenizer = True

    def __call__(
        self,
        inputs: str | list[str],
        *,
        aggregation_strategy: str = "none",
        ignore_labels: list[str] | None = None,
        stride: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        strategy = str(aggregation_strategy).lower()
        if strategy not in _AGGREGATIONS:
            raise ValueError(
                f"aggregation_strategy: unknown {aggregation_strategy!r}; "
                f"known: {list(_AGGREGATIONS)}"
            )
        ignore = ["O"] if ignore_labels is None else list(ignore_labels)
        texts = _texts(inputs, self.task)
        max_len = min(self.seq_len, self.tokenizer.model_max_length)
        if stride is not None:
            if strategy == "none":
                raise ValueError(
                    "token-classification: stride reads long texts in windows and needs an "
                    "aggregation_strategy other than 'none' (e.g. 'simple')"
                )
            room = max_len - self.tokenizer.num_special_tokens_to_add(pair=False)
            if isinstance(stride, bool) or not 0 <= stride < room:
                raise ValueError(
                    f"stride must be in [0, {room}) (the tokens of one window of seq_len "
                    f"{max_len} less the special tokens), got {stride!r}"
                )
        # One row per window; a text without stride is one window.
        rows, owner = [], []
        for i, text in enumerate(texts):
            what = f"input {i}" if len(texts) > 1 else "the input"
            common = {"return_special_tokens_mask": True, "return_offsets_mapping": True}
            if stride is None:
                try:
                    enc = self._encode(text, what=what, **common)
                except PipelineError as err:
                    raise PipelineError(f"{err}, or pass stride=n to read it in windows") from None
                windows = [{k: enc[k] for k in enc}]
            else:
                if not isinstance(text, str):
                    raise TypeError(f"{self.task}: inputs must be strings")
                enc = self.tokenizer(
                    text, truncation=True, max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, **common,
                )
                keys = [k for k in enc if k != "overflow_to_sample_mapping"]
                windows = [{k: enc[k][w] for k in keys} for w in range(len(enc["input_ids"]))]
            rows.extend(windows)
            owner.extend([i] * len(windows))

        entities: list[list[dict]] = [[] for _ in texts]
        windows_of = [owner.count(i) for i in range(len(texts))]
        done = 0
        for batch in self._batches(rows):
            logits = self._run(batch).logits
            for b, row in enumerate(batch):
                i = owner[done + b]
                n = len(row["input_ids"])
                scores = _softmax(logits[b, :n])
                pre = self._gather(texts[i], row, scores, strategy)
                grouped = self._aggregate(pre, strategy)
                entities[i].extend(
                    e for e in grouped
                    if e.get("entity") not in ignore and e.get("entity_group") not in ignore
                )
            done += len(batch)
        results = [
            _merge_overlapping(found) if windows_of[i] > 1 else found
            for i, found in enumerate(entities)
        ]
        return results[0] if isinstance(inputs, str) else results

    @property
    def _labels(self) -> dict[int, str]:
        return _id2label(self._config, self._width("logits"))

    def _gather(self, sentence: str, row: dict, scores: np.ndarray, strategy: str) -> list[dict]:
        tok = self.tokenizer
        backend = getattr(tok, "_tokenizer", None)
        word_aware = bool(backend and getattr(backend.model, "continuing_subword_prefix", None))
        pre = []
        for idx, token_scores in enumerate(scores):
            if row["special_tokens_mask"][idx]:
                continue
            token_id = int(row["input_ids"][idx])
            word = tok.convert_ids_to_tokens(token_id)
            start, end = (int(x) for x in row["offset_mapping"][idx])
            word_ref = sentence[start:end]
            if word_aware:
                is_subword = len(word) != len(word_ref)
            else:  # transformers' fallback heuristic
                is_subword = start > 0 and " " not in sentence[start - 1 : start + 1]
            if token_id == tok.unk_token_id:
                word, is_subword = word_ref, False
            pre.append(
                {"word": word, "scores": token_scores, "start": start, "end": end,
                 "index": idx, "is_subword": is_subword}
            )
        return pre

    def _aggregate(self, pre: list[dict], strategy: str) -> list[dict]:
        labels = self._labels
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                best = int(p["scores"].argmax())
                entities.append(
                    {"entity": labels[best], "score": float(p["scores"][best]),
                     "index": p["index"], "word": p["word"], "start": p["start"], "end": p["end"]}
                )
            if strategy == "none":
                return entities
        else:
            entities = self._aggregate_words(pre, strategy)
        return self._group_entities(entities)

    def _aggregate_words(self, pre: list[dict], strategy: str) -> list[dict]:
        words, group = [], []
        for p in pre:
            if group and not p["is_subword"]:
                words.append(self._aggregate_word(group, strategy))
                group = []
            group.append(p)
        if group:
            words.append(self._aggregate_word(group, strategy))
        return words

    def _aggregate_word(self, group: list[dict], strategy: str) -> dict:
        if strategy == "first":
            scores = group[0]["scores"]
        elif strategy == "max":
            scores = max(group, key=lambda p: p["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
        best = int(scores.argmax())
        return {
            "entity": self._labels[best],
            "score": float(scores[best]),
            "word": self.tokenizer.convert_tokens_to_string([p["word"] for p in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        }

    def _group_entities(self, entities: list[dict]) -> list[dict]:
        groups, current = [], []
        for entity in entities:
            if current:
                bi, tag = _bio(entity["entity"])
                _, last_tag = _bio(current[-1]["entity"])
                if tag != last_tag or bi == "B":
                    groups.append(self._group(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._group(current))
        return groups

    def _group(self, entities: list[dict]) -> dict:
        return {
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([e["score"] for e in entities])),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }


def _bio(label: str) -> tuple[str, str]:
    """("B" | "I", tag) of a label; a label without B-/I- continues ("I")."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities found in overlapping windows: of those that overlap keep the longer (then the
    higher-scoring) one, as transformers does."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length = entity["end"] - entity["start"]
            previous_length = previous["end"] - previous["start"]
            if length > previous_length or (
                length == previous_length and entity["score"] > previous["score"]
            ):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged


class NextSentencePredictionPipeline(Pipeline):
    """Does ``text_pair`` follow ``text``? {label: "is_next" | "not_next", score} per pair
    (MobileBERT's next-sentence head: logit 0 is "is next")."""

    task = "next-sentence-prediction"
    heads = ("next-sentence", "pretraining")

    def __call__(
        self, text: str | list[str], text_pair: str | list[str]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        single = isinstance(text, str)
        texts = _texts(text, self.task)
        pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
        if len(pairs) != len(texts):
            raise ValueError(f"{self.task}: give one text_pair per text ({len(texts)} texts)")
        rows = [
            self._encode(a, b, what=f"pair {i}" if len(texts) > 1 else "the pair")
            for i, (a, b) in enumerate(zip(texts, pairs))
        ]
        pretraining = self.model.signature.head == "pretraining"
        field = "seq_relationship_logits" if pretraining else "logits"
        logits = np.concatenate([self._run(b)[field] for b in self._batches(rows)], axis=0)
        probs = _softmax(logits)
        results = [
            {"label": "is_next", "score": float(p[0])}
            if p[0] >= p[1]
            else {"label": "not_next", "score": float(p[1])}
            for p in probs
        ]
        return results[0] if single else results


class MultipleChoicePipeline(Pipeline):
    """Score the compiled number of choices as continuations of a prompt: a list of
    {choice, index, score} (softmax over the choices), best first."""

    task = "multiple-choice"
    heads = ("multiple-choice",)

    def __call__(self, prompt: str, choices: Sequence[str]) -> list[dict[str, Any]]:
        choices = list(choices)
        expected = self.model.signature.num_choices
        if len(choices) != expected:
            raise PipelineError(
                f"multiple-choice: {len(choices)} choices given, the model was compiled for "
                f"num_choices={expected}"
            )
        rows = [self._encode(prompt, c, what=f"choice {i}") for i, c in enumerate(choices)]
        length = max(len(r["input_ids"]) for r in rows)
        arrays = {}
        for key, fill in (("input_ids", self.tokenizer.pad_token_id or 0),
                          ("attention_mask", 0), ("token_type_ids", 0)):
            arr = np.full((1, len(rows), length), fill, dtype=np.int64)
            for i, r in enumerate(rows):
                if r.get(key) is not None:
                    arr[0, i, : len(r[key])] = r[key]
            arrays[key] = arr
        probs = _softmax(self.model(**arrays).logits[0])
        ranked = [
            {"choice": c, "index": i, "score": float(p)}
            for i, (c, p) in enumerate(zip(choices, probs))
        ]
        return sorted(ranked, key=lambda d: d["score"], reverse=True)


TASKS: dict[str, type[Pipeline]] = {
    cls.task: cls
    for cls in (
        FillMaskPipeline,
        QuestionAnsweringPipeline,
        TextClassificationPipeline,
        TokenClassificationPipeline,
        NextSentencePredictionPipeline,
        MultipleChoicePipeline,
    )
}
ALIASES = {"ner": "token-classification", "sentiment-analysis": "text-classification"}


def pipeline(
    task: str,
    model: CompiledModel | str | os.PathLike,
    tokenizer: Any = None,
) -> Pipeline:
    """A pipeline for ``task`` over a compiled model (or the path of a saved artifact).

    ``task``: "fill-mask", "question-answering", "text-classification" (alias
    "sentiment-analysis"), "token-classification" (alias "ner"), "next-sentence-prediction",
    "multiple-choice". ``tokenizer``: a transformers tokenizer, a local folder holding its files
    (vocab.txt, tokenizer.json, ...), or None: the tokenizer saved in the artifact (see
    ``Pipeline.save``), else the one beside the checkpoint the model was compiled from.
    """
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise PipelineError(f"Unknown task {task!r}; known: {sorted(TASKS) + sorted(ALIASES)}")
    cls = TASKS[name]
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        model = load(source)
    cls.check_head(model)

    files = None
    config = model.metadata.get("config")
    if tokenizer is None:
        # load() and compile() keep the artifact's (or the checkpoint's) tokenizer files.
        files = model.tokenizer_files or _checkpoint_tokenizer_files(model)
        if not files:
            where = f"the artifact {source}" if source is not None else "this compiled model"
            raise PipelineError(
                f"{name}: no tokenizer: {where} has none saved with it; pass tokenizer= (a "
                f"transformers tokenizer or a local folder with vocab.txt / tokenizer.json), or "
                f"save one into the artifact with mbcompile.pipeline(..., tokenizer=...).save(path)"
            )
        tokenizer = _tokenizer_from_files(files, config)
    elif isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer)
        if not folder.is_dir():
            raise PipelineError(f"tokenizer: {folder} is not a folder (give a local folder path)")
        files = artifact.tokenizer_files(folder)
        tokenizer = _load_tokenizer_folder(folder)
    return cls(model, tokenizer, tokenizer_files=files or None)
