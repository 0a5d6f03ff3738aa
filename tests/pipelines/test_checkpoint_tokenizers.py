"""Tokenizer files as checkpoints ship them beside ``vocab.txt`` (no ``tokenizer.json``):
special tokens renamed in ``special_tokens_map.json``, ``model_max_length`` and added tokens in
``tokenizer_config.json``. The tokenizer mbcompile saves with a compiled checkpoint reads them
as transformers' ``AutoTokenizer`` does: the same tokens, and the same pipeline answers."""

from __future__ import annotations

import json

import pytest
from helpers import make_model, tiny_config
from pipeline_helpers import VOCAB, assert_same
from transformers import AutoTokenizer
from transformers import pipeline as hf_pipeline

import mbcompile
from mbcompile.errors import PipelineError

RENAMED = {"[MASK]": "<mask>", "[CLS]": "<s>", "[SEP]": "</s>"}


def _folder(tmp_path, head, *, vocab=VOCAB, config=None, special=None, seed=3):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, **(config or {})})
    )
    if special is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
    model = make_model(head, tiny_config(vocab_size=len(vocab), initializer_range=0.2), seed=seed)
    model.save_pretrained(folder)
    return folder, model


def test_special_tokens_renamed_in_special_tokens_map_are_read(tmp_path):
    vocab = [RENAMED.get(w, w) for w in VOCAB]
    special = {"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>",
               "unk_token": "[UNK]", "pad_token": "[PAD]"}
    folder, model = _folder(tmp_path, "masked-lm", vocab=vocab, special=special)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    fill = mbcompile.pipeline("fill-mask", mbcompile.compile(str(folder), seq_len=16))
    for text in ("the cat sat on the <mask> .", "who <mask> there ?"):
        ids = fill.tokenizer(text)["input_ids"]
        assert ids == theirs(text)["input_ids"]
        assert fill.tokenizer.convert_ids_to_tokens(ids)[0] == "<s>"
        assert_same(fill(text, top_k=3), hf_pipeline("fill-mask", model=model, tokenizer=theirs)(
            text, top_k=3))
    pair = fill.tokenizer("the cat", "sat on")["input_ids"]
    assert pair == theirs("the cat", "sat on")["input_ids"]


def test_a_vocabulary_without_its_separator_tokens_is_refused(tmp_path):
    """Without [CLS]/[SEP] in the vocabulary (and nothing naming others), every text would start
    and end with the id of another token: refused, naming what is missing."""
    vocab = [w for w in VOCAB if w not in ("[CLS]", "[SEP]")]
    folder, model = _folder(tmp_path, "sequence-classification", vocab=vocab)
    compiled = mbcompile.compile(model, seq_len=16)
    with pytest.raises(PipelineError, match=r"vocab.txt has no \[CLS\] or \[SEP\]"):
        mbcompile.pipeline("text-classification", compiled, tokenizer=str(folder))


def test_truncation_cuts_at_the_tokenizers_model_max_length(tmp_path):
    """transformers' ``truncation=True`` cuts at the tokenizer's ``model_max_length`` (12 here),
    shorter than the compiled 32."""
    folder, model = _folder(tmp_path, "sequence-classification", config={"model_max_length": 12})
    theirs = AutoTokenizer.from_pretrained(str(folder))
    ours = mbcompile.pipeline("text-classification", str(folder), max_seq_len=32)
    text = "the cat sat on the mat in the old red house of john smith and mary in paris ."
    assert len(theirs(text)["input_ids"]) > 12
    ref = hf_pipeline("text-classification", model=model, tokenizer=theirs)
    assert_same(ours(text, truncation=True, top_k=None), ref(text, truncation=True, top_k=None))
    assert_same(ours(text, top_k=None), ref(text, top_k=None))  # no truncation: all 21 tokens


def test_tokens_added_in_tokenizer_config_stay_whole(tmp_path):
    decoder = {str(i): {"content": w, "special": True} for i, w in enumerate(VOCAB[:5])}
    decoder[str(len(VOCAB))] = {"content": "newtok", "special": False, "normalized": True}
    folder, _ = _folder(tmp_path, "base", config={"added_tokens_decoder": decoder})
    theirs = AutoTokenizer.from_pretrained(str(folder))
    model = make_model("base", tiny_config(vocab_size=len(VOCAB) + 1, initializer_range=0.02))
    fe = mbcompile.pipeline("feature-extraction", mbcompile.compile(model, seq_len=16),
                            tokenizer=str(folder))
    assert fe.tokenizer("the newtok sat")["input_ids"] == theirs("the newtok sat")["input_ids"]
    assert "newtok" in fe.tokenizer.convert_ids_to_tokens(fe.tokenizer("the newtok sat")["input_ids"])


def test_compile_prunes_at_the_saved_tokenizers_mask_and_accuracy_finds_it(tmp_path):
    """``compile(folder, logits_for="masked")`` and the accuracy report's top-1 agreement at
    [MASK] positions use the [MASK] of the checkpoint's tokenizer (id 4), not 103."""
    folder, _ = _folder(tmp_path, "masked-lm")
    pruned = mbcompile.compile(str(folder), seq_len=16, logits_for="masked", max_masked=2)
    assert pruned.signature.mask_token_id == VOCAB.index("[MASK]") == 4
    full = mbcompile.compile(str(folder), seq_len=16)
    report = full.accuracy(["the cat [MASK] on the mat .", "[MASK] is the [MASK] of france ."])
    logits = report["outputs"]["logits"]
    assert logits["top1_positions"] == 3, logits  # the three [MASK] tokens, not every token
