"""The heads at full size (google/mobilebert-uncased architecture, 24 layers), seq 128: all
eight under MBCOMPILE_SOAK=1; otherwise MaskedLM and multiple choice (the encoder is in both;
question answering runs at full size on the emulated device, tests/targets/test_aarch64.py;
the other heads differ from these by their last linear, checked at small size in
tests/test_heads.py)."""

from __future__ import annotations

import pytest
from helpers import assert_matches_eager, random_inputs, soak

import mbcompile
from mbcompile.capture import named_config, random_model
from mbcompile.heads import HEADS

SEQ = 128


@pytest.mark.slow
@pytest.mark.parametrize(
    "head", soak(list(HEADS), ["masked-lm", "multiple-choice"])
)
def test_full_size_head_matches_eager_at_seq_128(head):
    config = named_config("mobilebert-uncased")
    model = random_model(config, head)
    compiled = mbcompile.compile(
        model, seq_len=SEQ, num_choices=2 if head == "multiple-choice" else None
    )
    shape = (1, 2, SEQ) if head == "multiple-choice" else (1, SEQ)
    ids, mask, types = random_inputs(config, shape, pad=28)
    assert_matches_eager(compiled, model, ids, mask, types)
