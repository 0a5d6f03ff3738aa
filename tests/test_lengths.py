"""One artifact for every input length: a function per compiled length, the shortest that fits
runs, and the outputs equal PyTorch eager on the unpadded input at every length and batch, with
the padding id's embedding row not zero (as in trained checkpoints)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from helpers import (
    assert_matches_eager,
    make_model,
    random_inputs,
    tiny_config,
    trained_pad_row,
)

import mbcompile
from mbcompile.errors import InputError, OptionError
from mbcompile.options import SEQ_LENS, CompileOptions

# The tiny config's max_position_embeddings: its default artifact holds 8, 16, 32 and 64.
LONGEST = 64


class _Spy:
    """A program that records the length of every call and runs the real one."""

    def __init__(self, program):
        self.program, self.lengths = program, []

    def run(self, arrays):
        self.lengths.append(arrays[0].shape[-1])
        return self.program.run(arrays)

    def close(self):
        self.program.close()


def _spied(compiled):
    spy = _Spy(compiled.program)
    return compiled.with_program(spy), spy


@pytest.fixture(scope="module")
def encoder():
    model = trained_pad_row(make_model("base", tiny_config()))
    return model, mbcompile.compile(model)


def test_the_default_artifact_compiles_every_standard_length_up_to_the_models_maximum(encoder):
    _, compiled = encoder
    assert compiled.signature.lengths == (8, 16, 32, 64)
    assert compiled.signature.seq_len == LONGEST
    assert compiled.metadata.options["max_seq_len"] is None


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 16, 17, 31, 33, 63, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_length_equals_eager_on_the_unpadded_input(encoder, length, batch):
    model, compiled = encoder
    ids, mask, types = random_inputs(model.config, (batch, length), pad=length // 4, seed=length)
    spied, spy = _spied(compiled)
    assert_matches_eager(spied, model, ids, mask, types)
    fitting = next(n for n in (8, 16, 32, 64) if n >= length)
    assert set(spy.lengths) == {fitting}, "the shortest compiled length that fits must run"


def test_rows_of_different_lengths_padded_together_equal_each_row_alone(encoder):
    model, compiled = encoder
    lengths = [5, 20, 11]
    ids, mask, types = random_inputs(model.config, (3, 20))
    for i, n in enumerate(lengths):
        ids[i, n:] = model.config.pad_token_id
        mask[i, n:] = 0
        types[i, n:] = 0
    out = compiled(ids, mask, types, lengths=np.array(lengths))
    for i, n in enumerate(lengths):
        with torch.no_grad():
            ref = model(input_ids=ids[i : i + 1, :n], token_type_ids=types[i : i + 1, :n])
        got = out.last_hidden_state[i, :n]
        assert float(np.abs(got - ref.last_hidden_state[0].numpy()).max()) <= 1e-4


def test_longer_than_the_longest_length_names_the_limit_and_the_option(encoder):
    _, compiled = encoder
    ids = np.ones((1, LONGEST + 1), dtype=np.int64)
    with pytest.raises(InputError, match=r"length 65 exceeds .*\(max_seq_len=64\).*max_seq_len>=65"):
        compiled(input_ids=ids)


def test_the_weights_are_stored_once():
    """Four lengths in one library cost little more than the longest alone: the functions share
    the constants (weights); only the kernels are per length. (Weights stored per function
    would add three copies of them.)"""
    model = make_model("base", tiny_config(vocab_size=20000))
    compiled = mbcompile.compile(model, passes=())
    single = mbcompile.compile(model, seq_len=LONGEST, passes=())
    weights = sum(p.numel() * 4 for p in model.parameters())
    extra = len(compiled.library_bytes) - len(single.library_bytes)
    assert compiled.signature.lengths == (8, 16, 32, 64)
    assert extra < weights / 2, (extra, weights)


def test_a_saved_artifact_runs_every_length(encoder, tmp_path):
    model, compiled = encoder
    loaded = mbcompile.load(compiled.save(tmp_path / "m.mbc"))
    assert loaded.signature.lengths == compiled.signature.lengths
    for length in (3, 40):
        ids, mask, types = random_inputs(model.config, (1, length))
        assert_matches_eager(loaded, model, ids, mask, types)


def _with_metadata(path, out, edit):
    """A copy of the artifact at ``path`` whose metadata.json ``edit`` changed in place."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "metadata.json":
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    return out


def test_an_artifact_from_before_lengths_still_loads_and_runs(tmp_path):
    """Artifacts made before this format have no ``seq_lens``: one function, ``main``."""
    model = make_model("base", tiny_config())
    path = mbcompile.compile(model, seq_len=16, passes=()).save(tmp_path / "one.mbc")
    def as_before(meta):
        assert meta["signature"].pop("seq_lens") == []
        meta["options"].pop("max_seq_len")

    old = _with_metadata(path, tmp_path / "old.mbc", as_before)
    loaded = mbcompile.load(old)
    assert loaded.signature.lengths == (16,)
    ids, mask, types = random_inputs(model.config, (2, 9))
    assert_matches_eager(loaded, model, ids, mask, types)


def test_metadata_whose_lengths_do_not_end_at_seq_len_is_refused(encoder, tmp_path):
    _, compiled = encoder
    path = compiled.save(tmp_path / "m.mbc")
    bad = _with_metadata(
        path, tmp_path / "bad.mbc", lambda meta: meta["signature"].update(seq_lens=[8, 16, 128])
    )
    with pytest.raises(mbcompile.ArtifactError, match="seq_lens"):
        mbcompile.load(bad)


def test_max_seq_len_bounds_the_lengths_and_is_one_of_them():
    options = CompileOptions(max_seq_len=100)
    assert options.seq_lens(512) == (8, 16, 32, 64, 100)
    assert CompileOptions().seq_lens(512) == SEQ_LENS
    assert CompileOptions(seq_len=40).seq_lens(512) == (40,)
    assert CompileOptions(logits_for="masked", max_masked=10).seq_lens(64) == (16, 32, 64)
    with pytest.raises(OptionError, match="max_seq_len=600 exceeds the model's max_position_emb"):
        CompileOptions(max_seq_len=600).seq_lens(512)
    with pytest.raises(OptionError, match="not both"):
        CompileOptions(max_seq_len=64, seq_len=32)
    with pytest.raises(OptionError, match="max_seq_len must be a positive integer"):
        CompileOptions(max_seq_len=0)


@pytest.fixture(scope="module")
def fill_mask():
    model = trained_pad_row(make_model("masked-lm", tiny_config()))
    compiled = mbcompile.compile(model, max_seq_len=32, logits_for="masked", max_masked=2)
    return model, compiled


@pytest.mark.parametrize("length", [3, 8, 12, 32])
def test_the_fill_mask_build_runs_the_shortest_length_and_equals_eager(fill_mask, length):
    model, compiled = fill_mask
    assert compiled.signature.lengths == (8, 16, 32)
    ids, mask, types = random_inputs(model.config, (2, length), seed=length)
    ids[:, length // 2] = compiled.signature.mask_token_id
    spied, spy = _spied(compiled)
    out = spied(ids, mask, types)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    got = out.logits[:, 0]
    assert np.abs(got - ref[:, length // 2]).max() <= 1e-4
    assert set(spy.lengths) == {next(n for n in (8, 16, 32) if n >= length)}


@pytest.fixture(scope="module")
def multiple_choice():
    model = trained_pad_row(make_model("multiple-choice", tiny_config()))
    return model, mbcompile.compile(model, max_seq_len=16)


@pytest.mark.parametrize("choices", [2, 3, 4, 5])
@pytest.mark.parametrize("length", [6, 16])
def test_multiple_choice_takes_any_number_of_choices_at_any_length(multiple_choice, choices, length):
    model, compiled = multiple_choice
    ids, mask, types = random_inputs(model.config, (2, choices, length), pad=2, seed=choices)
    assert_matches_eager(compiled, model, ids, mask, types)
