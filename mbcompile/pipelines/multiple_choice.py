"""Multiple choice: which of the compiled number of choices best continues a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mbcompile.errors import PipelineError
from mbcompile.pipelines.base import Pipeline, _softmax


class MultipleChoicePipeline(Pipeline):
    """Score any number of choices as continuations of a prompt: a list of {choice, index,
    score} (softmax over the choices), best first."""

    task = "multiple-choice"
    heads = ("multiple-choice",)

    def __call__(self, prompt: str, choices: Sequence[str]) -> list[dict[str, Any]]:
        choices = list(choices)
        if not choices:
            raise PipelineError("multiple-choice: give at least one choice")
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
        arrays.update(self._lengths([[len(r["input_ids"]) for r in rows]]))
        probs = _softmax(self.model(**arrays, return_dict=True).logits[0])
        ranked = [
            {"choice": c, "index": i, "score": float(p)}
            for i, (c, p) in enumerate(zip(choices, probs))
        ]
        return sorted(ranked, key=lambda d: d["score"], reverse=True)
