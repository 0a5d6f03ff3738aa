"""How far a compiled model's outputs are from PyTorch fp32 (or ONNX Runtime's, for a model
compiled from an ONNX file) on given inputs.

``CompiledModel.accuracy`` runs both on the same inputs and reports, for every output:

- ``max_abs_error``: the largest ``|compiled − reference|``;
- ``max_rel_error``: that, over the largest ``|reference|`` of the output (an element-wise ratio
  means nothing where a value crosses zero);
- ``min_cosine`` and ``mean_cosine``: cosine similarity of each vector along the last axis
  (a token's hidden state, a row of logits);
- ``top1_agreement`` for logits: the share of argmaxes that agree. Token-level logits count the
  real tokens only, MaskedLM logits the [MASK] positions (every real token when there is none),
  a fill-mask build's logits the positions it computed.

For the fill-mask build (``logits_for="masked"``) the reference's logits are taken at the
compiled ``masked_positions``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mbcompile.artifact import tokenizer_json
from mbcompile.errors import InputError, InputTypeError
from mbcompile.options import DEFAULT_MASK_TOKEN_ID

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def input_batches(inputs: Any, tokenizer_json: bytes | None, pad_id: int) -> list[dict]:
    """``inputs`` as a list of input dicts of numpy arrays: one dict (of arrays or tensors), a
    list of such dicts, or a list of texts (tokenized with the artifact's tokenizer.json)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not inputs:
        raise InputTypeError(
            "accuracy takes texts, a dict of input arrays (input_ids, attention_mask, "
            f"token_type_ids) or a list of such dicts; got {type(inputs).__name__}"
        )
    if all(isinstance(x, str) for x in inputs):
        return [_encode(list(inputs), tokenizer_json, pad_id)]
    batches = []
    for item in inputs:
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise InputTypeError(
                "accuracy: each input must be a dict holding at least input_ids, got "
                f"{type(item).__name__}"
            )
        unknown = sorted(set(item) - set(INPUT_NAMES))
        if unknown:
            raise InputError(f"accuracy: unknown inputs {unknown}; expected {list(INPUT_NAMES)}")
        batches.append({k: np.asarray(_numpy(v)) for k, v in item.items() if v is not None})
    return batches


def _numpy(value):
    return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value


def _encode(texts: list[str], tokenizer_json: bytes | None, pad_id: int) -> dict:
    if tokenizer_json is None:
        raise InputError(
            "accuracy: texts need the artifact's tokenizer, and this one has none (compile "
            "with tokenizer=FOLDER or run `mbcompile add-tokenizer`); or pass input arrays"
        )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    tokenizer.enable_padding(pad_id=pad_id)
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def report(compiled, inputs: Any, reference: Any) -> dict:
    """``CompiledModel.accuracy``: ``compiled`` against ``reference`` (a PyTorch model, a
    checkpoint folder or hub id, an ONNX file) on ``inputs``, with the precision."""
    if reference is None:
        raise InputError(
            "accuracy needs the PyTorch model to compare with: pass reference=MODEL (or a "
            "checkpoint folder or hub id); only a model compile() returned keeps its own"
        )
    metadata = compiled.metadata
    if isinstance(reference, (str, os.PathLike)):
        from mbcompile.capture import is_onnx_path, load_checkpoint, load_onnx

        loader = load_onnx if is_onnx_path(reference) else load_checkpoint
        reference = loader(reference, head=metadata.head)
    files = compiled.tokenizer_files
    batches = input_batches(
        inputs, files.get("tokenizer.json"), int(metadata.config.get("pad_token_id") or 0)
    )
    mask_token_id = metadata.options.get("mask_token_id")
    if mask_token_id is None:  # the saved tokenizer's [MASK], else uncased BERT's
        mask_token_id = tokenizer_json.mask_token_id(files)
    if mask_token_id is None:
        mask_token_id = DEFAULT_MASK_TOKEN_ID
    return {"precision": metadata.precision, **compare(compiled, reference, batches, mask_token_id)}


def reference_outputs(reference, batch: dict) -> dict[str, np.ndarray]:
    """The PyTorch model's outputs on ``batch``, as numpy arrays by name (an ONNX model's,
    computed by ONNX Runtime, when ``reference`` is one: ``mbcompile.capture.OnnxModel``)."""
    if hasattr(reference, "outputs_for"):
        return reference.outputs_for(batch)
    import torch

    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()},
                        return_dict=True)
    return {k: v.detach().float().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


class Totals:
    """Running metrics of one output over the batches (``add`` each pair of compiled and
    reference arrays, then ``report``): also how the tests score a peer backend the same way."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_ref = 0.0
        self.cosines: list[np.ndarray] = []
        self.agree = 0
        self.counted = 0

    def add(self, got: np.ndarray, ref: np.ndarray, where: np.ndarray | None, top1: bool) -> None:
        got, ref = got.astype(np.float64), ref.astype(np.float64)
        if where is not None:  # positions (all but the last axis) to count
            got, ref = got[where], ref[where]
        if got.size == 0:
            return
        self.max_abs = max(self.max_abs, float(np.max(np.abs(got - ref))))
        self.max_ref = max(self.max_ref, float(np.max(np.abs(ref))))
        if got.ndim >= 1 and got.shape[-1] > 1:
            g, r = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
            norms = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
            self.cosines.append(np.sum(g * r, axis=1) / np.maximum(norms, 1e-30))
            if top1:
                self.agree += int(np.sum(g.argmax(axis=1) == r.argmax(axis=1)))
                self.counted += g.shape[0]

    def report(self, top1: bool) -> dict[str, float]:
        out = {
            "max_abs_error": self.max_abs,
            "max_rel_error": self.max_abs / self.max_ref if self.max_ref else 0.0,
        }
        if self.cosines:
            cos = np.concatenate(self.cosines)
            out["min_cosine"], out["mean_cosine"] = float(cos.min()), float(cos.mean())
        if top1 and self.counted:
            out["top1_agreement"] = self.agree / self.counted
            out["top1_positions"] = self.counted
        return out


def _positions(name: str, got: np.ndarray, batch: dict, mask_token_id: int, masked_build: bool):
    """Which positions of output ``name`` to count (None: all), for token-level outputs."""
    ids = batch["input_ids"]
    if masked_build or got.ndim < ids.ndim + 1 or got.shape[: ids.ndim] != ids.shape:
        return None  # per sequence (a classifier), or already at the masked positions
    real = batch.get("attention_mask", np.ones_like(ids)).astype(bool)
    if name in ("logits", "prediction_logits") and np.any(ids == mask_token_id):
        return real & (ids == mask_token_id)
    return real


def compare(compiled, reference, batches: list[dict], mask_token_id: int) -> dict:
    """The metrics of the module doc, per output name, over ``batches``."""
    totals: dict[str, Totals] = {}
    rows = 0
    for batch in batches:
        got = dict(compiled(**batch, return_dict=True))
        ref = reference_outputs(reference, batch)
        positions = got.pop("masked_positions", None)
        rows += int(batch["input_ids"].shape[0])
        for name, value in got.items():
            if name not in ref:
                continue
            expected = ref[name]
            where = None
            if positions is not None and value.shape != expected.shape:
                rows_ = np.arange(positions.shape[0])[:, None]
                expected = expected[rows_, np.maximum(positions, 0)]
                where = positions >= 0
            else:
                where = _positions(name, value, batch, mask_token_id, positions is not None)
            totals.setdefault(name, Totals()).add(
                np.asarray(value), expected, where, top1="logits" in name
            )
    return {
        "reference": ("ONNX Runtime" if hasattr(reference, "outputs_for") else "PyTorch") + " fp32",
        "rows": rows,
        "outputs": {name: t.report("logits" in name) for name, t in totals.items()},
    }


def sample_inputs(signature, vocab_size: int, mask_token_id: int, seed: int = 0) -> dict:
    """Two random rows for the compile's own check: the longest compiled length up to 128, the
    second row a third shorter (attention-mask padding), two segments, a [MASK] token each."""
    rng = np.random.default_rng(seed)
    short = [n for n in signature.lengths if n <= 128]
    length = max(short) if short else min(signature.lengths)
    shape = (2, signature.num_choices, length) if signature.num_choices else (2, length)
    ids = rng.integers(1000, max(vocab_size, 1001), size=shape, dtype=np.int64) % vocab_size
    mask = np.ones(shape, dtype=np.int64)
    mask[1, ..., length - length // 3 :] = 0
    types = np.zeros(shape, dtype=np.int64)
    types[..., length // 2 :] = 1
    if 0 <= mask_token_id < vocab_size:
        ids[..., length // 4] = mask_token_id
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
