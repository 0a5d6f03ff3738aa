"""Results never depend on padding: the runtime's own (up to seq_len and batch_size) and the
pipelines' (texts of different lengths batched together), also when the padding id's
embedding row is not zero, as in trained checkpoints. MobileBERT's trigram input mixes each
token's embedding with its neighbours', which is where such a row used to leak in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TOL,
    assert_matches_eager,
    make_model,
    max_abs_errors,
    random_inputs,
    tiny_config,
    trained_pad_row,
)

import mbcompile
from mbcompile.heads import HEADS

SEQ = 16


@pytest.fixture(scope="module", params=list(HEADS))
def compiled_head(request):
    config = tiny_config(num_labels=2 if request.param == "question-answering" else 3)
    model = trained_pad_row(make_model(request.param, config))
    return model, mbcompile.compile(model, seq_len=SEQ, batch_size=2)


def _shape(compiled, batch, seq):
    if compiled.signature.num_choices is not None:
        return (batch, compiled.signature.num_choices, seq)
    return (batch, seq)


def _row(value, i):
    return value[i : i + 1] if not isinstance(value, tuple) else tuple(v[i : i + 1] for v in value)


@pytest.mark.parametrize("length", [1, 5, SEQ - 1])
def test_a_short_input_equals_eager_on_the_unpadded_input(compiled_head, length):
    model, compiled = compiled_head
    ids, mask, types = random_inputs(model.config, _shape(compiled, 1, length))
    assert_matches_eager(compiled, model, ids, mask, types)


def test_rows_padded_together_with_lengths_equal_each_row_alone(compiled_head):
    """What the pipelines do: right-pad texts to the longest, pass each row's real length."""
    model, compiled = compiled_head
    lengths = [3, 9, 6]
    shape = _shape(compiled, len(lengths), max(lengths))
    ids, mask, types = random_inputs(model.config, shape)
    real = np.zeros(shape[:-1], dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, ..., n:] = model.config.pad_token_id
        mask[i, ..., n:] = 0
        types[i, ..., n:] = 0
        real[i] = n
    out = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types, lengths=real)
    # lengths alone: the mask is taken from them (it was all ones: past a row's length too)
    without_mask = compiled(input_ids=ids, token_type_ids=types, lengths=real)
    for name, value in out.items():
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in
                          (value, without_mask[name]))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    for i, n in enumerate(lengths):
        with torch.no_grad():
            ref = model(
                input_ids=ids[i : i + 1, ..., :n],
                attention_mask=mask[i : i + 1, ..., :n],
                token_type_ids=types[i : i + 1, ..., :n],
            )
        alone = compiled(
            input_ids=ids[i : i + 1, ..., :n],
            attention_mask=mask[i : i + 1, ..., :n],
            token_type_ids=types[i : i + 1, ..., :n],
        )
        for name in ref.keys():  # noqa: SIM118 - ModelOutput
            got = _row(out[name], i)
            if got is None or (isinstance(got, tuple) and not got):
                continue
            # compare the real positions only: cut the sequence axis where the field has one
            spec = [o for o in compiled.signature.outputs if o.name == name]
            if spec and spec[0].seq_axes:
                axis = spec[0].seq_axes[0]
                index = [slice(None)] * got.ndim
                index[axis] = slice(0, n)
                got = got[tuple(index)]
            errors = max_abs_errors({name: got}, {name: ref[name]})
            assert errors[name] <= TOL, (i, name, errors)
            assert max_abs_errors({name: got}, {name: torch.from_numpy(
                np.asarray(alone[name]))})[name] <= TOL


def test_padding_the_caller_gives_stays_hugging_faces(compiled_head):
    """Without ``lengths`` every given position is real, as in Hugging Face: a caller's own
    padded batch gives what the PyTorch model gives on that same batch."""
    model, compiled = compiled_head
    ids, mask, types = random_inputs(model.config, _shape(compiled, 2, 10), pad=3)
    ids[..., -3:] = model.config.pad_token_id
    assert_matches_eager(compiled, model, ids, mask, types)


def test_lengths_are_checked(compiled_head):
    model, compiled = compiled_head
    ids, _, _ = random_inputs(model.config, _shape(compiled, 2, 6))
    with pytest.raises(mbcompile.InputError, match="lengths: expected shape"):
        compiled(input_ids=ids, lengths=np.array([6], dtype=np.int64))
    with pytest.raises(mbcompile.InputError, match=r"lengths: 7 is outside \[1, 6\]"):
        compiled(input_ids=ids, lengths=np.full(ids.shape[:-1], 7))
    with pytest.raises(mbcompile.InputError, match="lengths: expected an integer dtype"):
        compiled(input_ids=ids, lengths=np.full(ids.shape[:-1], 2.0))
    # a mask that says a position past its row's length is real contradicts the lengths
    with pytest.raises(mbcompile.InputError,
                       match=r"attention_mask: row .*marks position 4 real \(1\), past its "
                             r"length 4 in lengths"):
        compiled(input_ids=ids, attention_mask=np.ones_like(ids),
                 lengths=np.full(ids.shape[:-1], 4))
    # zeros within a row's length (left padding, holes) are the mask's to say
    left = np.ones_like(ids)
    left[..., :2] = 0
    compiled(input_ids=ids, attention_mask=left, lengths=np.full(ids.shape[:-1], 6))
