"""PruneMaskedLMHead: the MLM transform and vocabulary projection run on the masked rows only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tester import TOL, Tester, bind, run, tiny_model
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import PruneMaskedLMHead, resolve_passes

RNG = np.random.default_rng(0)
EMB = RNG.standard_normal((5, 6)).astype("float32")  # 5 words, tied with the decoder
W = RNG.standard_normal((6, 6)).astype("float32")
B = RNG.standard_normal(6).astype("float32")
G = (1 + 0.3 * RNG.standard_normal(6)).astype("float32")
BE = RNG.standard_normal(6).astype("float32")
VB = RNG.standard_normal(5).astype("float32")
MASK = 3  # the [MASK] token id in these small tests


@I.ir_module
class TinyMLM:
    """Embedding, then an output that reads the encoder output h too (as PreTraining's pooler
    does), then the MLM head as the importer writes it: transform, tied vocabulary projection."""

    @R.function
    def main(
        input_ids: R.Tensor((1, 4), "int64"),
        emb: R.Tensor((5, 6), "float32"),
        w: R.Tensor((6, 6), "float32"),
        b: R.Tensor((6,), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
        vb: R.Tensor((5,), "float32"),
    ):
        with R.dataflow():
            lv0 = R.astype(input_ids, "int32")
            lv1 = R.reshape(lv0, R.shape([4]))
            lv2 = R.take(emb, lv1, axis=0, mode="clip")
            h = R.reshape(lv2, R.shape([1, 4, 6]))
            first = R.take(h, R.const(0, "int64"), axis=1, mode="clip")
            lv3 = R.reshape(h, R.shape([4, 6]))
            lv4 = R.permute_dims(w, axes=[1, 0])
            lv5 = R.matmul(lv3, lv4, out_dtype="float32")
            lv6 = R.add(b, lv5)
            lv7 = R.reshape(lv6, R.shape([1, 4, 6]))
            lv8 = R.nn.relu(lv7)
            lv9 = R.nn.layer_norm(lv8, g, be, axes=[-1], epsilon=1e-12)
            lv10 = R.permute_dims(emb, axes=[1, 0])
            lv11 = R.reshape(lv9, R.shape([4, 6]))
            lv12 = R.matmul(lv11, lv10, out_dtype="float32")
            lv13 = R.reshape(lv12, R.shape([1, 4, 5]))
            lv14 = R.add(lv13, vb)
            gv = (lv14, first)
            R.output(gv)
        return gv


@I.ir_module
class TinyMLMPruned:
    """K = 2 slots. The rewriter emits each new value's operands depth first, so the position
    logic interleaves with the head; the comments name the values of the pass docstring."""

    @R.function
    def main(
        input_ids: R.Tensor((1, 4), "int64"),
        masked_positions: R.Tensor((1, 2), "int64"),
        emb: R.Tensor((5, 6), "float32"),
        w: R.Tensor((6, 6), "float32"),
        b: R.Tensor((6,), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
        vb: R.Tensor((5,), "float32"),
        slots: R.Tensor((1, 2), "int64"),  # 0 .. K-1
        ranks: R.Tensor((1, 2, 1), "int64"),  # 1 .. K
        index: R.Tensor((1, 1, 4), "int64"),  # 0 .. S-1
        offsets: R.Tensor((1, 1), "int64"),  # b·S
    ):
        with R.dataflow():
            lv0 = R.astype(input_ids, "int32")
            lv1 = R.reshape(lv0, R.shape([4]))
            lv2 = R.take(emb, lv1, axis=0, mode="clip")
            h = R.reshape(lv2, R.shape([1, 4, 6]))
            first = R.take(h, R.const(0, "int64"), axis=1, mode="clip")
            lv4 = R.permute_dims(w, axes=[1, 0])
            lv10 = R.permute_dims(emb, axes=[1, 0])
            asked = R.greater_equal(masked_positions, R.const(0, "int64"))
            asked_int = R.astype(asked, "int64")
            any_asked = R.max(asked_int, axis=[1], keepdims=True)
            explicit = R.greater(any_asked, R.const(0, "int64"))
            hit = R.equal(input_ids, R.const(MASK, "int64"))
            hits = R.astype(hit, "int64")
            total = R.sum(hits, axis=[1], keepdims=True)
            found_ok = R.less(slots, total)
            ok = R.where(explicit, asked, found_ok)
            ok3 = R.expand_dims(ok, axis=[-1])
            rows = R.reshape(h, R.shape([4, 6]))
            low = R.maximum(masked_positions, R.const(0, "int64"))
            chosen = R.minimum(low, R.const(3, "int64"))
            hit3 = R.expand_dims(hit, axis=[1])
            count = R.cumsum(hits, axis=1)
            count3 = R.expand_dims(count, axis=[1])
            is_rank = R.equal(count3, ranks)
            is_slot = R.logical_and(hit3, is_rank)
            at = R.where(is_slot, index, R.const(0, "int64"))
            found = R.sum(at, axis=[2], keepdims=False)
            pos = R.where(explicit, chosen, found)
            flat2 = R.add(pos, offsets)
            flat = R.reshape(flat2, R.shape([2]))
            picked = R.take(rows, flat, axis=0, mode="clip")
            lv24 = R.matmul(picked, lv4, out_dtype="float32")
            lv25 = R.add(b, lv24)
            lv26 = R.nn.relu(lv25)
            lv27 = R.nn.layer_norm(lv26, g, be, axes=[-1], epsilon=1e-12)
            lv28 = R.matmul(lv27, lv10, out_dtype="float32")
            lv29 = R.add(lv28, vb)
            lv30 = R.reshape(lv29, R.shape([1, 2, 5]))
            logits = R.where(ok3, lv30, R.const(float("nan"), "float32"))
            positions = R.where(ok, pos, R.const(-1, "int64"))
            gv = (logits, first, positions)
            R.output(gv)
        return gv


@I.ir_module
class ProjectionAlsoReturned:
    """The projection's output is returned on its own too: the head is needed at every row."""

    @R.function
    def main(input_ids: R.Tensor((1, 4), "int64"), emb: R.Tensor((5, 6), "float32")):
        with R.dataflow():
            lv0 = R.astype(input_ids, "int32")
            lv1 = R.reshape(lv0, R.shape([4]))
            lv2 = R.take(emb, lv1, axis=0, mode="clip")
            lv10 = R.permute_dims(emb, axes=[1, 0])
            lv12 = R.matmul(lv2, lv10, out_dtype="float32")
            lv13 = R.reshape(lv12, R.shape([1, 4, 5]))
            gv = (lv13, lv12)
            R.output(gv)
        return gv


def tiny_mlm():
    return bind(TinyMLM, emb=EMB, w=W, b=B, g=G, be=BE, vb=VB)


def prune(k: int = 2) -> PruneMaskedLMHead:
    return PruneMaskedLMHead(max_masked=k, mask_token_id=MASK)


def test_head_runs_on_the_gathered_masked_rows_and_returns_their_positions():
    expected = bind(
        TinyMLMPruned,
        emb=EMB,
        w=W,
        b=B,
        g=G,
        be=BE,
        vb=VB,
        slots=np.arange(2, dtype="int64").reshape(1, 2),
        ranks=np.arange(1, 3, dtype="int64").reshape(1, 2, 1),
        index=np.arange(4, dtype="int64").reshape(1, 1, 4),
        offsets=np.zeros((1, 1), dtype="int64"),
    )
    (
        Tester(tiny_mlm())
        .run_passes([prune()])
        .check_fired("PruneMaskedLMHead", 1)
        .check_structurally_equal(expected)
    )


def test_a_module_without_vocabulary_logits_comes_back_unchanged(tiny_base):
    # MobileBertModel: its outputs are hidden states, no (B, S, vocab) logits.
    tester = tiny_base.fresh().run_passes([prune()]).check_unchanged()
    assert tester.refusals("PruneMaskedLMHead") == []


def test_a_projection_whose_output_has_another_user_is_refused():
    tester = Tester(bind(ProjectionAlsoReturned, emb=EMB)).run_passes([prune()])
    tester.check_unchanged()
    tester.check_refused("PruneMaskedLMHead", "has another user")


def test_max_masked_above_the_sequence_length_is_refused():
    tester = Tester(tiny_mlm()).run_passes([prune(k=5)]).check_unchanged()
    tester.check_refused("PruneMaskedLMHead", "exceeds the sequence length 4")


def test_the_pass_is_not_in_the_default_list():
    assert "PruneMaskedLMHead" not in [p.name for p in resolve_passes("default")]


NONE = [-1, -1]


@pytest.mark.parametrize(
    "ids, requested, positions",
    [
        ([1, MASK, 4, 0], NONE, [1, -1]),  # fewer masks than slots
        ([1, 2, 4, 0], NONE, [-1, -1]),  # none
        ([MASK, 2, MASK, MASK], NONE, [0, 2]),  # more: the first K
        ([MASK, 2, MASK, MASK], [3, -1], [3, -1]),  # a row that asks for positions
        ([1, 2, 4, 0], [9, 1], [3, 1]),  # clipped into [0, S)
    ],
    ids=["fewer", "zero", "more", "requested", "clipped"],
)
def test_pruned_logits_equal_the_full_logits_at_the_positions(ids, requested, positions):
    before = tiny_mlm()
    after = Tester(before).run_passes([prune()]).check_fired("PruneMaskedLMHead", 1).mod
    ids = np.array([ids], dtype="int64")
    full, first = run(before, [ids])
    logits, first_after, got = run(after, [ids, np.array([requested], dtype="int64")])
    assert got.tolist() == [positions]
    np.testing.assert_array_equal(first_after, first)
    for slot, p in enumerate(positions):
        if p < 0:
            assert np.isnan(logits[0, slot]).all()
        else:
            assert np.abs(logits[0, slot] - full[0, p]).max() <= TOL


# --------------------------------------------------------------------------- captured models


@pytest.mark.parametrize("class_name", ["MobileBertForMaskedLM", "MobileBertForPreTraining"])
def test_captured_head_is_pruned_and_equals_eager_at_the_masked_positions(class_name):
    from mbcompile.capture import capture

    model = tiny_model(class_name, num_hidden_layers=2)
    captured = capture(model, seq_len=8, batch_size=3)
    k = 3
    tester = Tester(captured.mod).run_passes([prune(k)]).check_fired("PruneMaskedLMHead", 1)
    tester.run_passes("default")  # the default passes apply to the pruned module too

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(MASK + 1, model.config.vocab_size, (3, 8), generator=gen)
    ids[0, [1, 6]] = MASK  # fewer than K
    ids[2, [0, 2, 3, 5, 7]] = MASK  # more than K: the first three
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # row 1: no mask token at all, padded
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    requested = np.full((3, k), -1, dtype="int64")
    lengths = np.full(ids.shape[:-1], ids.shape[-1], dtype=np.int64)
    outs = run(tester.mod, [ids.numpy(), mask.numpy(), types.numpy(), lengths, requested])
    name = "logits" if "logits" in ref else "prediction_logits"
    logits, positions = outs[0], outs[-1]
    assert positions.tolist() == [[1, 6, -1], [-1, -1, -1], [0, 2, 3]]
    for b, row in enumerate(positions):
        for slot, p in enumerate(row):
            if p < 0:
                assert np.isnan(logits[b, slot]).all()
            else:
                err = np.abs(logits[b, slot] - ref[name][b, p].numpy()).max()
                assert err <= TOL, (b, p, err)
    if "seq_relationship_logits" in ref:
        assert np.abs(outs[1] - ref.seq_relationship_logits.numpy()).max() <= TOL
