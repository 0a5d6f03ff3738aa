"""Undoing the runtime's padding on the way out: outputs cut to the caller's batch, length and
masked positions, and multiple-choice rows grouped by the compiled ``num_choices`` on the way
in and back on the way out."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mbcompile.runtime.inputs import Prepared
from mbcompile.signature import Signature


def cut(arr: np.ndarray, spec, batch: int, per_row: int, length: int, positions) -> np.ndarray:
    """Drop batch padding, sequence padding and unused masked-position slots.

    ``per_row``: rows of axis 0 per input row (``num_choices`` for the multiple-choice head's
    hidden states and attentions, which HF returns flattened to batch·choices; else 1)."""
    index: list[Any] = [slice(None)] * arr.ndim
    index[0] = slice(0, batch * per_row)
    for axis in spec.seq_axes:
        index[axis] = slice(0, length)
    if spec.masked_axis is not None:
        index[spec.masked_axis] = slice(0, positions.shape[1])
    return arr[tuple(index)]


def group_choices(inp: Prepared, real: np.ndarray, k: int) -> tuple[Prepared, np.ndarray]:
    """(B, C, S) inputs as (B·G, k, S): the compiled ``num_choices`` = k per row, C padded up to
    G·k with dummy choices. HF scores each choice on its own (they are rows of one batch inside
    the model), so grouping them differently changes no score."""
    batch, choices, seq = inp.input_ids.shape
    groups = -(-choices // k)

    def regroup(arr: np.ndarray, fill: int) -> np.ndarray:
        out = np.full((batch, groups * k) + arr.shape[2:], fill, dtype=arr.dtype)
        out[:, :choices] = arr
        return out.reshape((batch * groups, k) + arr.shape[2:])

    grouped = dataclasses.replace(
        inp,
        input_ids=regroup(inp.input_ids, 0),
        attention_mask=regroup(inp.attention_mask, 1),
        token_type_ids=regroup(inp.token_type_ids, 0),
    )
    return grouped, regroup(real, seq)


def ungroup_choices(arr: np.ndarray, spec, sig: Signature, choices: int) -> np.ndarray:
    """An output of the grouped call (see ``group_choices``) for the caller's ``choices``."""
    k = sig.num_choices
    groups = -(-choices // k)
    if spec.name == "logits":  # (B·G, k): one score per choice
        return arr.reshape((arr.shape[0] // groups, groups * k))[:, :choices]
    # hidden states and attentions: HF flattens them to (batch · choices, ...)
    batch = arr.shape[0] // (groups * k)
    by_row = arr.reshape((batch, groups * k) + arr.shape[1:])[:, :choices]
    return by_row.reshape((batch * choices,) + arr.shape[1:])


def blank_unused(arr: np.ndarray, spec, positions: np.ndarray) -> np.ndarray:
    """NaN where a row has fewer masked tokens than the batch's largest count (position -1)."""
    if spec.masked_axis is None or (positions >= 0).all():
        return arr
    arr = arr.copy()
    arr[positions < 0] = np.nan
    return arr
