"""fill-mask: the compiled model's predictions equal transformers' FillMaskPipeline on the eager
model, including on the pruned pretraining head (``logits_for="masked"``)."""

from __future__ import annotations

import pytest
from helpers import make_model
from pipeline_helpers import assert_same, config
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.pipelines import PipelineError


@pytest.mark.parametrize(
    "inputs, params",
    [
        ("the cat [MASK] on the mat .", {}),
        ("[MASK] is the capital of france .", {"top_k": 3}),
        ("the [MASK] sat on the [MASK] .", {"top_k": 2}),
        (["the cat [MASK] on the mat .", "john [MASK] in paris ."], {}),
        (["where does mary [MASK] ?"], {}),
        ("the [MASK] is big .", {"targets": ["cat", "dog", "river"]}),
    ],
)
def test_fill_mask_matches_transformers(mlm, tok, inputs, params):
    model, compiled = mlm
    ours = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)(inputs, **params)
    ref = hf_pipeline("fill-mask", model=model, tokenizer=tok)(inputs, **params)
    assert_same(ours, ref)


def test_fill_mask_on_the_pruned_pretraining_head_matches_transformers(pruned_pretraining, tok):
    pretraining, compiled = pruned_pretraining
    # transformers' fill-mask needs a MaskedLM: one with the pretraining model's weights.
    mlm = make_model("masked-lm", config())
    missing, _ = mlm.load_state_dict(pretraining.state_dict(), strict=False)
    assert missing == []
    fill = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    reference = hf_pipeline("fill-mask", model=mlm, tokenizer=tok)
    for text in ["the cat [MASK] on the mat .", "[MASK] lives in [MASK] ."]:
        assert_same(fill(text, top_k=4), reference(text, top_k=4))
    # Batches of two (the compiled batch size), rows with one or two masks.
    texts = ["[MASK] lives in [MASK] .", "the cat [MASK] .", "john [MASK] in paris , [MASK] ."]
    assert_same(fill(texts, top_k=3), reference(texts, top_k=3))
    with pytest.raises(PipelineError, match="3 mask tokens.*max_masked=2"):
        fill("[MASK] [MASK] [MASK] .")


def test_fill_mask_input_errors_name_the_problem(mlm, tok):
    _, compiled = mlm
    fill = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    with pytest.raises(PipelineError, match=r"no mask token \(\[MASK\]\) in input 1"):
        fill(["the [MASK] sat .", "the cat sat ."])
    too_long = "the cat sat on the mat . " * 6 + "[MASK]"
    with pytest.raises(PipelineError, match=r"is 45 tokens long.*seq_len=32"):
        fill(too_long)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        fill("the [MASK] .", top_k=0)


def test_a_checkpoint_compiled_for_fill_mask_prunes_at_its_own_tokenizers_mask(tmp_path, tok):
    """``pipeline("fill-mask", FOLDER)`` compiles the pruned head (logits at [MASK] only) at the
    [MASK] id of the checkpoint's tokenizer (4 here, in a vocabulary of fewer than 103 words),
    not the uncased default 103; a tokenizer given to the pipeline decides instead."""
    from pipeline_helpers import VOCAB, write_vocab

    folder = write_vocab(tmp_path / "checkpoint")
    model = make_model("masked-lm", config(), seed=6)
    model.save_pretrained(folder)
    assert VOCAB.index("[MASK]") == 4 < len(VOCAB) < 103
    fill = mbcompile.pipeline("fill-mask", folder, max_seq_len=32)
    assert fill.model.signature.mask_token_id == 4
    text = "the cat [MASK] on the mat ."
    assert_same(fill(text), hf_pipeline("fill-mask", model=model, tokenizer=tok)(text))
    ids = tok(text, return_tensors="np")["input_ids"]
    assert fill.model(input_ids=ids, return_dict=True).masked_positions[0, 0] == 3

    other = write_vocab(tmp_path / "other", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "w", "[MASK]"])
    again = mbcompile.pipeline("fill-mask", folder, tokenizer=other, max_seq_len=32)
    assert again.model.signature.mask_token_id == 5
