"""Bad inputs raise InputError naming the input and what was expected, before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbcompile import InputError


def _ids(n=10, value=5):
    return np.full((1, n), value, dtype=np.int64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": np.zeros((1, 10), dtype=np.float32)}, "input_ids: expected an integer dtype"),
        ({"input_ids": np.zeros((10,), dtype=np.int64)}, "add a batch axis"),
        ({"input_ids": np.zeros((1, 1, 10), dtype=np.int64)}, "expected rank 2"),
        ({"input_ids": _ids(17)}, "sequence length 17 exceeds the longest this model was compiled for (seq_len=16)"),
        ({"input_ids": _ids(value=211)}, "token id 211 is outside [0, 211)"),
        ({"input_ids": _ids(value=-1)}, "token id -1 is outside"),
        (
            {"input_ids": _ids(), "attention_mask": np.full((1, 10), 2)},
            "attention_mask: values must be 0 or 1",
        ),
        (
            {"input_ids": _ids(), "attention_mask": np.ones((1, 9), dtype=np.int64)},
            "attention_mask: expected shape (1, 10)",
        ),
        (
            {"input_ids": _ids(), "token_type_ids": np.full((1, 10), 2)},
            "type id 2 is outside [0, 2) (type_vocab_size)",
        ),
        (
            {"input_ids": _ids(), "token_type_ids": np.zeros((1, 10), dtype=np.float64)},
            "token_type_ids: expected an integer dtype",
        ),
        ({"input_ids": "hello"}, "input_ids: expected a numpy array or torch tensor"),
        ({"input_ids": None}, "input_ids is required"),
        ({"input_ids": np.zeros((1, 0), dtype=np.int64)}, "empty batch or sequence"),
        ({"input_ids": []}, "input_ids: empty batch or sequence, shape (0,)"),
        ({"input_ids": [[]]}, "input_ids: empty batch or sequence, shape (1, 0)"),
        (
            {"input_ids": _ids(), "attention_mask": np.full((1, 10), 1 + 1e-9)},
            "attention_mask: values must be 0 or 1, got 1.000000001",
        ),
    ],
)
def test_bad_input_raises_input_error_naming_it(tiny_qa, kwargs, message):
    _, compiled = tiny_qa
    with pytest.raises(InputError) as info:
        compiled(**kwargs)
    assert message in str(info.value)


def test_unknown_keyword_input_is_refused(tiny_qa):
    _, compiled = tiny_qa
    with pytest.raises(TypeError, match="inputs_embeds"):
        compiled(input_ids=_ids(), inputs_embeds=np.zeros((1, 10, 32), dtype=np.float32))


def test_int32_ids_bool_mask_and_float_mask_are_accepted(tiny_qa):
    model, compiled = tiny_qa
    ids = torch.randint(0, 211, (1, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 12:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).start_logits.numpy()
    for m in (mask.numpy().astype(bool), mask.numpy().astype(np.float32)):
        out = compiled(input_ids=ids.numpy().astype(np.int32), attention_mask=m)
        assert np.abs(out.start_logits - ref).max() <= 1e-4


def test_fully_masked_row_matches_eager(tiny_qa):
    model, compiled = tiny_qa
    ids = torch.randint(0, 211, (1, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 16, dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    out = compiled(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out.start_logits).all()
    assert (out.start_logits - ref.start_logits).abs().max() <= 1e-4
