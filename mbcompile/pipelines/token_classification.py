"""Token classification (named entities, alias "ner"), as transformers' pipeline.

Each token gets the label of its best score; ``entity_grouping.py`` then makes sub-words agree
and groups B-/I- runs into entities. A text longer than the compiled ``seq_len`` is read in
windows (``stride=n``) whose overlapping entities are merged as transformers merges them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mbcompile.errors import PipelineError, PipelineTypeError
from mbcompile.pipelines.base import (
    Pipeline,
    _id2label,
    _is_int,
    _is_stream,
    _softmax,
    _texts,
)
from mbcompile.pipelines.entity_grouping import _AGGREGATIONS, _aggregate, _merge_overlapping


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
        batch_size: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]] | Iterator:
        if _is_stream(inputs):
            return self._stream(inputs, batch_size, lambda chunk: self(
                chunk, aggregation_strategy=aggregation_strategy, ignore_labels=ignore_labels,
                stride=stride, batch_size=batch_size))
        strategy = str(aggregation_strategy).lower()
        if strategy not in _AGGREGATIONS:
            raise PipelineError(
                f"aggregation_strategy: unknown {aggregation_strategy!r}; "
                f"known: {list(_AGGREGATIONS)}"
            )
        if ignore_labels is not None and (
            isinstance(ignore_labels, str)
            or not isinstance(ignore_labels, (list, tuple, set))
            or not all(isinstance(label, str) for label in ignore_labels)
        ):
            raise PipelineTypeError(
                f"ignore_labels: expected a list of label names, got {ignore_labels!r}"
            )
        ignore = ["O"] if ignore_labels is None else list(ignore_labels)
        texts = _texts(inputs, self.task)
        max_len = min(self.seq_len, self.tokenizer.model_max_length)
        if stride is not None:
            if strategy == "none":
                raise PipelineError(
                    "token-classification: stride reads long texts in windows and needs an "
                    "aggregation_strategy other than 'none' (e.g. 'simple')"
                )
            room = max_len - self.tokenizer.num_special_tokens_to_add(pair=False)
            if not _is_int(stride) or not 0 <= stride < room:
                raise PipelineError(
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
                    raise PipelineTypeError(f"{self.task}: inputs must be strings")
                enc = self._tokenize(
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
        for batch in self._batches(rows, batch_size):
            logits = self._run(batch).logits
            for b, row in enumerate(batch):
                i = owner[done + b]
                n = len(row["input_ids"])
                scores = _softmax(logits[b, :n])
                pre = self._gather(texts[i], row, scores, strategy)
                grouped = _aggregate(pre, strategy, self._labels, self.tokenizer)
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
