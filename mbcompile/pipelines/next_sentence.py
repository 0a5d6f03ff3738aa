"""Next-sentence prediction: does the second text follow the first (MobileBERT's NSP head)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mbcompile.errors import PipelineError
from mbcompile.pipelines.base import Pipeline, _softmax, _texts


class NextSentencePredictionPipeline(Pipeline):
    """Does ``text_pair`` follow ``text``? {label: "is_next" | "not_next", score} per pair
    (MobileBERT's next-sentence head: logit 0 is "is next"). ``truncation=True`` (or a
    strategy such as ``"only_second"``) cuts a longer pair to the compiled length."""

    task = "next-sentence-prediction"
    heads = ("next-sentence", "pretraining")

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | list[str],
        *,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        cut = self._truncation(truncation, max_length)
        single = isinstance(text, str)
        texts = _texts(text, self.task)
        pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
        if len(pairs) != len(texts):
            raise PipelineError(f"{self.task}: give one text_pair per text ({len(texts)} texts)")
        rows = [
            self._encode(a, b, what=f"pair {i}" if len(texts) > 1 else "the pair", **cut)
            for i, (a, b) in enumerate(zip(texts, pairs))
        ]
        pretraining = self.model.signature.head == "pretraining"
        field = "seq_relationship_logits" if pretraining else "logits"
        logits = np.concatenate(
            [self._run(b)[field] for b in self._batches(rows, batch_size)], axis=0
        )
        probs = _softmax(logits)
        results = [
            {"label": "is_next", "score": float(p[0])}
            if p[0] >= p[1]
            else {"label": "not_next", "score": float(p[1])}
            for p in probs
        ]
        return results[0] if single else results
