"""Weights in float16 or bfloat16, as many hub checkpoints store them (transformers 5 loads them
in the stored dtype) and as a user's ``.half()``-ed model holds them: mbcompile compiles, and
checks against, a float32 copy, and leaves the user's model as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_eager, make_model, random_inputs, tiny_config, trained_pad_row

import mbcompile
from mbcompile import compiler
from mbcompile.options import CompileOptions

DTYPES = [torch.float16, torch.bfloat16]


def _half_model(dtype, head="sequence-classification"):
    """A tiny model (trained [PAD] row) whose weights are ``dtype``."""
    return trained_pad_row(make_model(head, tiny_config(), seed=4)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_a_checkpoint_stored_in_half_precision_compiles_and_equals_its_float32_weights(
    dtype, tmp_path
):
    from transformers import MobileBertForSequenceClassification

    _half_model(dtype).save_pretrained(tmp_path)
    compiled = mbcompile.compile(str(tmp_path), max_seq_len=32)
    reference = MobileBertForSequenceClassification.from_pretrained(
        tmp_path, dtype=torch.float32
    ).eval()
    ids, mask, types = random_inputs(reference.config, (2, 11), pad=4)
    assert_matches_eager(compiled, reference, ids, mask, types)
    checked = compiled.metadata.report["accuracy"]["outputs"]["logits"]
    assert checked["max_abs_error"] <= 1e-4, checked


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_a_half_precision_model_is_compiled_from_a_float32_copy_and_left_as_it_was(dtype):
    model = _half_model(dtype, head="base")
    lines: list[str] = []
    compiled = mbcompile.compile(model, seq_len=16, log=lines.append)
    assert all(p.dtype == dtype for p in model.parameters()), "the user's model was converted"
    said = [line for line in lines if "float32 copy" in line]
    assert said and str(dtype).removeprefix("torch.") in said[0], lines
    ids, mask, types = random_inputs(model.config, (1, 9), pad=2)
    assert_matches_eager(compiled, model.float(), ids, mask, types)
    # the accuracy check compares with the float32 copy, not the half model (fp16 error ~1e-3)
    report = compiled.accuracy({"input_ids": ids, "attention_mask": mask})
    assert report["outputs"]["last_hidden_state"]["max_abs_error"] <= 1e-4, report


def test_tuning_captures_a_half_precision_model_as_float32():
    """``tune`` prepares the model as ``compile`` does (the same capture and passes)."""
    model = _half_model(torch.bfloat16, head="base")
    options = CompileOptions.pick(
        {"target": "host", "seq_len": 8, "max_seq_len": None, "batch_size": 1,
         "num_choices": None, "passes": "default", "logits_for": "all", "max_masked": 8,
         "mask_token_id": None, "precision": "fp32"}
    )
    prepared = compiler.prepare(model, options)
    text = prepared.mod.script(show_meta=False)
    assert "float32" in text and "float16" not in text  # nor bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
