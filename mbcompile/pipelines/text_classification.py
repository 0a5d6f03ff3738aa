"""Text classification: labels and scores for texts or text pairs, as transformers' pipeline
(also under the name "sentiment-analysis")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mbcompile.errors import PipelineError, PipelineTypeError
from mbcompile.pipelines.base import (
    Pipeline,
    _check_positive,
    _id2label,
    _is_stream,
    _sigmoid,
    _softmax,
)

_LEGACY = object()  # top_k not given: transformers' single-best output shape


class TextClassificationPipeline(Pipeline):
    """Classify texts or text pairs, as transformers' TextClassificationPipeline.

    Labels come from the config's ``id2label``. Scores: sigmoid for one label or
    ``multi_label_classification``, softmax for several labels, none for ``regression`` (or
    ``function_to_apply="sigmoid" | "softmax" | "none"``). A text gives ``[{label, score}]`` (the
    best label); a pair is given as ``{"text": ..., "text_pair": ...}``; ``top_k=n`` gives the
    ``n`` best labels per input, ``top_k=None`` all of them. ``truncation=True`` (and
    ``max_length``) cuts longer inputs to the compiled length, as transformers' tokenizer
    arguments do; without it they are refused.
    """

    task = "text-classification"
    heads = ("sequence-classification",)

    def __call__(
        self,
        inputs: str | dict | list[str] | list[dict],
        *,
        top_k: Any = _LEGACY,
        function_to_apply: str | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> list | dict | Iterator:
        if _is_stream(inputs):
            return self._stream(inputs, batch_size, lambda chunk: self(
                chunk, top_k=top_k, function_to_apply=function_to_apply, truncation=truncation,
                max_length=max_length, batch_size=batch_size))
        legacy = top_k is _LEGACY
        if not legacy and top_k is not None:
            top_k = _check_positive("top_k", top_k)
        function = self._function(function_to_apply)
        cut = self._truncation(truncation, max_length)
        if not isinstance(inputs, (str, dict, list, tuple)):
            raise PipelineTypeError(
                f"text-classification: expected a text, a {{'text', 'text_pair'}} dict or a list "
                f"of them, got {type(inputs).__name__}"
            )
        items = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
        if not items:
            raise PipelineError("text-classification: at least one input is required")
        rows = []
        for i, item in enumerate(items):
            what = f"input {i}" if len(items) > 1 else "the input"
            if isinstance(item, dict):
                unknown = set(item) - {"text", "text_pair"}
                if "text" not in item or unknown:
                    raise PipelineError(
                        f"text-classification: a pair is {{'text': ..., 'text_pair': ...}}, got "
                        f"keys {sorted(item)}"
                    )
                rows.append(self._encode(item["text"], item.get("text_pair"), what=what, **cut))
            else:
                rows.append(self._encode(item, what=what, **cut))
        logits = np.concatenate(
            [self._run(b).logits for b in self._batches(rows, batch_size)], axis=0
        )
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
            if not isinstance(name, str):
                raise PipelineTypeError(
                    f"function_to_apply: expected 'sigmoid', 'softmax' or 'none', got {name!r}"
                )
            name = name.lower()
            if name not in ("sigmoid", "softmax", "none"):
                raise PipelineError(
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
