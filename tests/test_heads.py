"""Every head compiles and equals PyTorch eager: tiny models here, full size in test_full_size."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_eager, make_model, random_inputs, tiny_config

import mbcompile
from mbcompile.heads import HEADS

SEQ = 12


@pytest.fixture(scope="module", params=list(HEADS))
def compiled_head(request):
    # question answering needs exactly two labels (start, end); the others take any number.
    config = tiny_config(num_labels=2 if request.param == "question-answering" else 3)
    model = make_model(request.param, config)
    return model, mbcompile.compile(model, seq_len=SEQ, batch_size=2, passes=())


def _shape(compiled, batch, seq):
    if compiled.signature.num_choices is not None:
        return (batch, compiled.signature.num_choices, seq)
    return (batch, seq)


def test_head_matches_eager_with_padding_and_two_segments(compiled_head):
    model, compiled = compiled_head
    ids, mask, types = random_inputs(model.config, _shape(compiled, 2, SEQ), pad=4)
    assert_matches_eager(compiled, model, ids, mask, types)


def test_shorter_input_is_padded_and_cut_back(compiled_head):
    model, compiled = compiled_head
    ids, mask, types = random_inputs(model.config, _shape(compiled, 2, 7), pad=2)
    out = assert_matches_eager(compiled, model, ids, mask, types)
    for name, spec_value in out.items():
        if name in ("start_logits", "end_logits", "last_hidden_state"):
            assert spec_value.shape[1] == 7


def test_omitted_mask_and_types_take_hf_defaults(compiled_head):
    model, compiled = compiled_head
    ids, _, _ = random_inputs(model.config, _shape(compiled, 1, SEQ))
    assert_matches_eager(compiled, model, ids)


def test_batch_larger_than_compiled_runs_in_chunks(compiled_head):
    model, compiled = compiled_head
    ids, mask, types = random_inputs(model.config, _shape(compiled, 3, 9), pad=1, seed=5)
    assert_matches_eager(compiled, model, ids, mask, types)


def test_numpy_in_gives_numpy_out_and_names_follow_hf(compiled_head):
    model, compiled = compiled_head
    ids, mask, types = random_inputs(model.config, _shape(compiled, 2, SEQ))
    out = compiled(ids.numpy(), mask.numpy(), types.numpy())
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert list(out.keys()) == list(ref.keys())
    first = out[0]
    assert type(first).__module__ == "numpy"
    assert getattr(out, next(iter(ref.keys()))) is first
    torch_out = compiled(ids, mask, types)
    assert isinstance(torch_out[0], torch.Tensor)
    as_tuple = compiled(ids, mask, types, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(ref.to_tuple())


@pytest.mark.parametrize("not_mobilebert", ["linear", "bert"])
def test_a_model_that_is_not_mobilebert_is_refused(not_mobilebert):
    from transformers import BertConfig, BertModel

    from mbcompile import ModelError

    model = (
        torch.nn.Linear(4, 4)
        if not_mobilebert == "linear"
        else BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=50))
    )
    with pytest.raises(ModelError, match="expected a transformers MobileBERT model"):
        mbcompile.compile(model, seq_len=8)


def test_sequence_longer_than_the_position_table_is_refused_at_compile_time():
    model = make_model("base", tiny_config())
    with pytest.raises(ValueError, match="seq_len=65 exceeds the model's max_position_embeddings=64"):
        mbcompile.compile(model, seq_len=65)
