"""All passes together: a sweep of variants and heads, the matmul count, the pass list."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tester import Tester, tiny_model

import mbcompile.passes
from mbcompile.passes import (
    DEFAULT_PASSES,
    FoldAttentionMaskRows,
    FoldAttentionScale,
    FoldNoNorm,
    FuseAttention,
    MergeSharedInputLinears,
    RemoveLayoutNoise,
    RemoveLinearReshapes,
    count_matmuls,
    resolve_passes,
)

# (id, model class, config overrides, sequence length, merges per layer)
VARIANTS = [
    ("no_norm_2_layers_masked_lm", "MobileBertForMaskedLM", {"num_hidden_layers": 2}, 8, 2),
    ("layer_norm", "MobileBertModel", {"normalization_type": "layer_norm"}, 8, 2),
    (
        "no_trigram_sequence_classification",
        "MobileBertForSequenceClassification",
        {"trigram_input": False, "embedding_size": 32},  # no embedding transformation at all
        8,
        2,
    ),
    ("no_bottleneck_qa", "MobileBertForQuestionAnswering", {"use_bottleneck": False}, 8, 1),
    ("bottleneck_attention", "MobileBertModel", {"use_bottleneck_attention": True}, 8, 1),
    (
        "key_query_not_shared_qa",
        "MobileBertForQuestionAnswering",
        # HF sizes query and key by true_hidden_size but feeds them the layer input here, so
        # this variant only runs with the bottleneck as wide as the hidden size.
        {"key_query_shared_bottleneck": False, "intra_bottleneck_size": 32},
        8,
        1,  # bottleneck input, query, key and value all read the layer input
    ),
    (
        "one_ffn_gelu_sequence_classification",
        "MobileBertForSequenceClassification",
        {"num_feedforward_networks": 1, "hidden_act": "gelu"},
        8,
        2,
    ),
    ("three_ffns", "MobileBertModel", {"num_feedforward_networks": 3}, 8, 2),
    (
        "odd_sizes_masked_lm",
        "MobileBertForMaskedLM",
        {
            "hidden_size": 30,
            "embedding_size": 10,
            "intra_bottleneck_size": 15,
            "num_attention_heads": 3,
            "intermediate_size": 21,
            "vocab_size": 53,
            "type_vocab_size": 3,
        },
        7,
        2,
    ),
]


@pytest.mark.parametrize(
    "class_name, overrides, seq_len, merges_per_layer",
    [pytest.param(*v[1:], id=v[0]) for v in VARIANTS],
)
def test_every_variant_and_head_matches_eager_after_all_passes(
    class_name, overrides, seq_len, merges_per_layer
):
    model = tiny_model(class_name, **overrides)
    tester = Tester.from_model(model, seq_len=seq_len).run_passes("default")
    layers = model.config.num_hidden_layers
    assert tester.fired["MergeSharedInputLinears"] == merges_per_layer * layers, tester.fired
    assert tester.fired["FoldAttentionScale"] == 2 * layers, tester.fired
    tester.check_fired("RemoveLinearReshapes")
    if model.config.normalization_type == "no_norm":
        tester.check_fired("FoldNoNorm")
    else:
        tester.check_fired("FoldNoNorm", 0)
    tester.check_matches_eager(pad=3)


def test_default_one_layer_model_drops_from_17_to_13_matmuls_per_layer():
    from transformers import MobileBertConfig, MobileBertModel

    torch.manual_seed(0)
    model = MobileBertModel(MobileBertConfig(num_hidden_layers=1)).eval()
    tester = Tester.from_model(model, seq_len=16)
    outside_layers = 2  # the embedding transformation and the pooler
    assert count_matmuls(tester.mod) == 17 + outside_layers
    tester.run_passes("default")
    # 3 → 1 (bottleneck input, bottleneck attention, value), 2 → 1 (query, key) and the two
    # batched attention matmuls → one fused attention kernel.
    assert count_matmuls(tester.mod) == 13 + outside_layers
    assert tester.fired == {
        "FoldNoNorm": 4,
        "FoldAttentionScale": 2,
        "MergeSharedInputLinears": 2,
        # the embedding transformation, attention output, 4 FFNs × 2 and the output linear
        "RemoveLinearReshapes": 11,
        "RemoveLayoutNoise": tester.fired["RemoveLayoutNoise"],
        "FoldAttentionMaskRows": 1,  # transformers' (1, 1, S, S) mask → (1, 1, 1, S)
        "FuseAttention": 1,
    }
    tester.check_fired("RemoveLayoutNoise").check_not(["relax.broadcast_to"])


def test_default_passes_reach_a_fixed_point(tiny_base):
    once = tiny_base.fresh().run_passes("default")
    Tester(once.mod).run_passes("default").check_unchanged()


def test_default_passes_run_folds_before_merges_and_attention_last():
    assert (
        FoldNoNorm,
        FoldAttentionScale,
        MergeSharedInputLinears,
        RemoveLinearReshapes,
        RemoveLayoutNoise,
        FoldAttentionMaskRows,
        FuseAttention,
    ) == DEFAULT_PASSES
    assert [p.name for p in resolve_passes("default")] == [c.__name__ for c in DEFAULT_PASSES]


def test_passes_resolve_from_instances_classes_and_names():
    fold = FoldNoNorm()
    resolved = resolve_passes([fold, MergeSharedInputLinears, "RemoveLayoutNoise"])
    assert resolved[0] is fold
    assert [type(p) for p in resolved] == [FoldNoNorm, MergeSharedInputLinears, RemoveLayoutNoise]
    assert resolve_passes(None) == [] and resolve_passes(()) == []


def test_unknown_pass_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown pass 'FoldLayerNorm'; known: \[.*'FoldNoNorm'"):
        resolve_passes(["FoldLayerNorm"])


def test_the_passes_folder_refuses_to_load_under_another_name():
    """``import passes`` from the repository root would load a second pass registry."""
    init = Path(mbcompile.passes.__file__)
    spec = importlib.util.spec_from_file_location("passes", init)
    with pytest.raises(ImportError, match=r"import mbcompile\.passes, not passes: "):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))



def test_a_pass_reads_the_graph_the_pass_before_left_and_prepare_forgets_them(tiny_base, monkeypatch):
    """A function a pass leaves as it is was just read by that pass's last round: the next
    pass reads the same Graph instead of building it again (the passes only read a Graph);
    ``forget_graphs`` drops them, as ``compiler.prepare`` does after its passes."""
    from mbcompile import compiler
    from mbcompile.options import CompileOptions
    from mbcompile.passes import base
    from mbcompile.passes.graph import Graph

    built = []
    original = Graph.__init__

    def counting(self, func):
        built.append(func)
        original(self, func)

    monkeypatch.setattr(Graph, "__init__", counting)
    base.forget_graphs()
    mod, fired = FoldAttentionMaskRows()(tiny_base.fresh().mod)
    assert fired == 1 and len(built) == 2  # a round that rewrote, a round that found nothing
    again, fired = FoldAttentionMaskRows()(mod)
    assert fired == 0 and again.same_as(mod) and len(built) == 2  # the kept Graph read
    base.forget_graphs()
    FoldAttentionMaskRows()(mod)
    assert len(built) == 3
    options = CompileOptions(seq_len=8, passes="default")
    compiler.prepare(tiny_model("MobileBertModel"), options)
    assert base._GRAPHS == {}
