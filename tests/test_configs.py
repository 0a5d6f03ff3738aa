"""Every MobileBertConfig variant that transformers honours compiles and equals PyTorch eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_matches_eager, make_model, random_inputs, tiny_config

import mbcompile

SEQ = 10

# (id, head, config overrides): each variant on a head that exercises it.
VARIANTS = [
    ("layer_norm", "base", {"normalization_type": "layer_norm"}),
    ("no_trigram", "masked-lm", {"trigram_input": False}),
    ("no_bottleneck", "sequence-classification", {"use_bottleneck": False, "true_hidden_size": 64}),
    ("bottleneck_attention", "question-answering", {"use_bottleneck_attention": True}),
    ("kq_not_shared", "token-classification", {"key_query_shared_bottleneck": False, "use_bottleneck_attention": True}),
    ("ffn_1", "pretraining", {"num_feedforward_networks": 1}),
    ("ffn_2", "next-sentence", {"num_feedforward_networks": 2}),
    ("ffn_3", "base", {"num_feedforward_networks": 3}),
    ("gelu", "masked-lm", {"hidden_act": "gelu"}),
    ("gelu_layer_norm_1_layer", "base", {"hidden_act": "gelu", "normalization_type": "layer_norm", "num_hidden_layers": 1}),
    ("no_classifier_activation", "sequence-classification", {"classifier_activation": False, "num_labels": 5}),
    ("odd_sizes", "token-classification", {
        "hidden_size": 48, "embedding_size": 24, "intra_bottleneck_size": 40, "true_hidden_size": 40,
        "num_attention_heads": 5, "intermediate_size": 37, "num_labels": 7, "vocab_size": 97,
        "type_vocab_size": 3,
    }),
    ("three_layers_one_label", "sequence-classification", {"num_hidden_layers": 3, "num_labels": 1}),
    ("multiple_choice_no_bottleneck_attention_gelu", "multiple-choice", {"hidden_act": "gelu", "use_bottleneck": False, "true_hidden_size": 64}),
    ("hidden_states_and_attentions", "base", {"output_hidden_states": True, "output_attentions": True}),
]


@pytest.mark.parametrize("head, overrides", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_config_variant_matches_eager(head, overrides):
    config = tiny_config(**overrides)
    model = make_model(head, config)
    compiled = mbcompile.compile(
        model, seq_len=SEQ, num_choices=2 if head == "multiple-choice" else None, passes=()
    )
    shape = (1, 2, SEQ) if head == "multiple-choice" else (1, SEQ)
    ids, mask, types = random_inputs(config, shape, pad=3)
    types[..., -1] = config.type_vocab_size - 1
    assert_matches_eager(compiled, model, ids, mask, types)
    ids, mask, types = random_inputs(config, shape[:-1] + (6,), seed=7)
    assert_matches_eager(compiled, model, ids, mask, types)


def test_multiple_choice_hidden_states_keep_every_choice_of_every_row():
    """HF returns the multiple-choice head's hidden states flattened to (batch·choices, ...):
    cutting the compiled batch back must keep num_choices rows per input row."""
    config = tiny_config(output_hidden_states=True, output_attentions=True, num_hidden_layers=1)
    model = make_model("multiple-choice", config)
    compiled = mbcompile.compile(model, seq_len=SEQ, batch_size=2, num_choices=2, passes=())
    for batch in (1, 3):  # a padded chunk, and a full chunk then a padded one
        ids, mask, types = random_inputs(config, (batch, 2, 7), pad=2)
        out = assert_matches_eager(compiled, model, ids, mask, types)
        assert out.hidden_states[0].shape[0] == batch * 2


@pytest.fixture(scope="module")
def three_choices():
    config = tiny_config(output_hidden_states=True, num_hidden_layers=1)
    model = make_model("multiple-choice", config)
    return model, mbcompile.compile(model, seq_len=SEQ, batch_size=2, num_choices=3)


@pytest.mark.parametrize("choices", [1, 2, 3, 4, 5])
def test_multiple_choice_takes_any_number_of_choices(three_choices, choices):
    """transformers takes any number of choices; a model compiled for 3 scores 1 to 5 (grouped
    by 3, the last group padded: HF scores each choice on its own)."""
    model, compiled = three_choices
    ids, mask, types = random_inputs(model.config, (2, choices, 7), pad=2)
    out = assert_matches_eager(compiled, model, ids, mask, types)
    assert out.logits.shape == (2, choices)


def test_a_config_with_return_dict_false_gives_tuples_as_its_model_does(tmp_path):
    """Some checkpoints (and users tracing models) set ``return_dict: false``: the model then
    returns tuples; the compiled model follows the config as HF's does (saved and loaded too),
    ``return_dict=`` on the call wins, and the compile's own check still runs."""
    config = tiny_config(return_dict=False)
    model = make_model("question-answering", config)
    compiled = mbcompile.compile(model, max_seq_len=32)
    assert compiled.metadata.report["accuracy"]["outputs"]["start_logits"]["max_abs_error"] <= 1e-4
    ids, mask, types = random_inputs(config, (2, 9), pad=2)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert isinstance(ref, tuple)
    for run in (compiled, mbcompile.load(compiled.save(tmp_path / "qa.mbc"))):
        out = run(input_ids=ids, attention_mask=mask, token_type_ids=types)
        assert isinstance(out, tuple) and len(out) == len(ref) == 2
        start, end = out  # unpacks to arrays, as HF's tuple does
        assert max(np.abs(start - ref[0].numpy()).max(), np.abs(end - ref[1].numpy()).max()) <= 1e-4
        named = run(input_ids=ids, attention_mask=mask, token_type_ids=types, return_dict=True)
        assert list(named.keys()) == ["start_logits", "end_logits"]
    from mbcompile.transformers import MBCModelForQuestionAnswering

    model.save_pretrained(tmp_path / "checkpoint")
    wrapped = MBCModelForQuestionAnswering.from_pretrained(tmp_path / "checkpoint", seq_len=16)
    assert isinstance(wrapped(input_ids=ids, attention_mask=mask), tuple)
    assert not isinstance(wrapped(input_ids=ids, attention_mask=mask, return_dict=True), tuple)
    default = make_model("question-answering", tiny_config())
    assert not isinstance(mbcompile.compile(default, seq_len=16)(input_ids=ids), tuple)
