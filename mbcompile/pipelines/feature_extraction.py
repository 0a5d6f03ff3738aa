"""Feature extraction: each token's hidden state, as transformers' "feature-extraction" pipeline,
or one embedding per text ("sentence-embedding": mean or [CLS] pooling, normalised or not)."""

from __future__ import annotations

import numpy as np

from mbcompile.errors import PipelineError, PipelineTypeError
from mbcompile.pipelines.base import Pipeline, _is_stream, _texts, _truncation_args

POOLINGS = ("mean", "cls")


class FeatureExtractionPipeline(Pipeline):
    """The encoder's last hidden state for texts (a ``MobileBertModel`` artifact).

    Without ``pooling``, as transformers' FeatureExtractionPipeline: per text a nested list of
    shape ``[1, tokens, hidden]`` (special tokens included). ``pooling="mean"`` (the mean over
    the text's tokens, special tokens included, as sentence-transformers does) or ``"cls"`` (the
    first token's state) gives one vector per text; ``normalize=True`` scales it to unit L2
    norm. ``return_tensors=True`` gives numpy arrays instead of lists. One text gives one
    result, a list of texts a list. ``truncation=True`` (or transformers'
    ``tokenize_kwargs={"truncation": True}``) cuts longer texts to the compiled length.
    """

    task = "feature-extraction"
    heads = ("base",)
    default_pooling: str | None = None

    def __call__(
        self,
        inputs: str | list[str],
        *,
        pooling: str | None = "default",
        normalize: bool = False,
        return_tensors: bool = False,
        tokenize_kwargs: dict | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ):
        if _is_stream(inputs):
            return self._stream(inputs, batch_size, lambda chunk: self(
                chunk, pooling=pooling, normalize=normalize, return_tensors=return_tensors,
                tokenize_kwargs=tokenize_kwargs, truncation=truncation, max_length=max_length,
                batch_size=batch_size))
        pooling = self.default_pooling if pooling == "default" else pooling
        if pooling is not None and pooling not in POOLINGS:
            raise PipelineError(
                f"{self.task}: pooling must be one of {list(POOLINGS)} or None, got {pooling!r}"
            )
        if not isinstance(normalize, bool):
            raise PipelineTypeError(f"{self.task}: normalize must be True or False")
        if normalize and pooling is None:
            raise PipelineError(f"{self.task}: normalize=True needs pooling='mean' or 'cls'")
        cut = self._truncation(*_truncation_args(self.task, "tokenize_kwargs", tokenize_kwargs,
                                                 truncation, max_length))
        texts = _texts(inputs, self.task)
        rows = [self._encode(t, what=f"input {i}", **cut) for i, t in enumerate(texts)]
        results = []
        for batch in self._batches(rows, batch_size):
            hidden = self._run(batch).last_hidden_state
            for row, states in zip(batch, hidden):
                n = len(row["input_ids"])
                results.append(self._finish(np.asarray(states[:n]), pooling, normalize))
        out = results if return_tensors else [r.tolist() for r in results]
        return out[0] if isinstance(inputs, str) else out

    @staticmethod
    def _finish(states: np.ndarray, pooling: str | None, normalize: bool) -> np.ndarray:
        if pooling is None:
            return states[None]  # [1, tokens, hidden], as transformers
        vector = states.mean(axis=0) if pooling == "mean" else states[0]
        if normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector


class SentenceEmbeddingPipeline(FeatureExtractionPipeline):
    """One embedding per text: ``FeatureExtractionPipeline`` with ``pooling="mean"`` by default."""

    task = "sentence-embedding"
    default_pooling = "mean"
