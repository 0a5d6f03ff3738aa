"""Fill-mask: the tokens a masked language model predicts at the mask token.

    fill = mbcompile.pipeline("fill-mask", "mlm.mbc")        # the artifact holds its tokenizer
    fill("the capital of france is [MASK] .")                # [{score, token, token_str, sequence}]

Returns what transformers' FillMaskPipeline returns (keys, order, nesting; scores as Python
floats), computed the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from mbcompile.errors import PipelineError, PipelineTypeError
from mbcompile.pipelines.base import (
    Pipeline,
    _check_positive,
    _check_unicode,
    _is_stream,
    _softmax,
    _texts,
    _truncation_args,
)
from mbcompile.runtime import CompiledModel


class FillMaskPipeline(Pipeline):
    """Predict the tokens at the tokenizer's mask token, as transformers' FillMaskPipeline.

    One mask: a list of ``top_k`` dicts {score, token, token_str, sequence}; several masks in a
    text: one such list per mask. A list of texts gives one result per text (a list of one text
    gives that text's result, as transformers does). Works with the pruned build
    (``logits_for="masked"``): the mask positions are passed to it explicitly.
    ``tokenizer_kwargs={"truncation": True}`` (transformers' form) or ``truncation=True``
    cuts longer texts to the compiled length (a mask cut off is then reported missing).
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
        tokenizer_kwargs: dict | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> list[dict[str, Any]] | list[list] | Iterator:
        if _is_stream(inputs):
            def run(chunk: list) -> list:
                out = self(chunk, top_k=top_k, targets=targets, tokenizer_kwargs=tokenizer_kwargs,
                           truncation=truncation, max_length=max_length, batch_size=batch_size)
                return [out] if len(chunk) == 1 else out  # one input's result comes unwrapped

            return self._stream(inputs, batch_size, run)
        top_k = _check_positive("top_k", top_k)
        cut = self._truncation(*_truncation_args(self.task, "tokenizer_kwargs", tokenizer_kwargs,
                                                 truncation, max_length))
        texts = _texts(inputs, self.task)
        target_ids = None if targets is None else self._target_ids(targets)
        mask_id = self.tokenizer.mask_token_id
        sig = self.model.signature
        rows, positions = [], []
        for i, text in enumerate(texts):
            what = f"input {i}" if len(texts) > 1 else "the input"
            enc = self._encode(text, what=what, **cut)
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
        for batch in self._batches(list(zip(rows, positions)), batch_size):
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
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise PipelineTypeError(f"targets: expected a word or a list of words, got {targets!r}")
        for target in targets:
            _check_unicode("fill-mask", "a target", target)
        vocab = self.tokenizer.get_vocab()
        ids = set()
        for target in targets:
            if target in vocab:
                ids.add(vocab[target])
                continue
            pieces = self._tokenize(target, add_special_tokens=False)["input_ids"]
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
