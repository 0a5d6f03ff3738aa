"""FoldAttentionMaskRows: a mask the same for every query row becomes one row."""

from __future__ import annotations

import numpy as np
import torch
from tester import Tester, tiny_model
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import FoldAttentionMaskRows, fused_attention_calls


@I.ir_module
class Rows:
    """transformers 5's mask as exported: a query term that is always true, and'ed with the key
    mask, as a (1, 1, Sq, Sk) additive bias."""

    @R.function
    def main(
        s: R.Tensor((1, 2, 4, 4), "float32"), mask: R.Tensor((1, 1, 1, 4), "bool")
    ) -> R.Tensor((1, 2, 4, 4), "float32"):
        with R.dataflow():
            a = R.arange(0, 4, 1, dtype="int64")
            e = R.expand_dims(a, axis=[0, 1, 3])
            t = R.full(R.shape([]), R.const(True, "bool"), dtype="bool")
            q = R.bitwise_and(t, R.greater_equal(e, R.const(0, "int64")))
            both = R.bitwise_and(q, mask)
            bias = R.where(both, R.const(0.0, "float32"), R.const(float("-inf"), "float32"))
            b = R.add(s, bias)
            gv = R.nn.softmax(b, axis=-1)
            R.output(gv)
        return gv


@I.ir_module
class OneRow:
    @R.function
    def main(
        s: R.Tensor((1, 2, 4, 4), "float32"), mask: R.Tensor((1, 1, 1, 4), "bool")
    ) -> R.Tensor((1, 2, 4, 4), "float32"):
        with R.dataflow():
            both = R.bitwise_and(R.const(np.ones((1, 1, 1, 1), bool), "bool"), mask)
            bias = R.where(both, R.const(0.0, "float32"), R.const(float("-inf"), "float32"))
            b = R.add(s, bias)
            gv = R.nn.softmax(b, axis=-1)
            R.output(gv)
        return gv


@I.ir_module
class Causal:
    """A mask that depends on the query: key ≤ query."""

    @R.function
    def main(
        s: R.Tensor((1, 2, 4, 4), "float32"), mask: R.Tensor((1, 1, 1, 4), "bool")
    ) -> R.Tensor((1, 2, 4, 4), "float32"):
        with R.dataflow():
            a = R.arange(0, 4, 1, dtype="int64")
            rows = R.expand_dims(a, axis=[0, 1, 3])
            cols = R.expand_dims(a, axis=[0, 1, 2])
            both = R.bitwise_and(R.less_equal(cols, rows), mask)
            bias = R.where(both, R.const(0.0, "float32"), R.const(float("-inf"), "float32"))
            b = R.add(s, bias)
            gv = R.nn.softmax(b, axis=-1)
            R.output(gv)
        return gv


@I.ir_module
class UserMask:
    """A 4-D bias the caller passes: nothing shows its rows are equal."""

    @R.function
    def main(
        s: R.Tensor((1, 2, 4, 4), "float32"), bias: R.Tensor((1, 1, 4, 4), "float32")
    ) -> R.Tensor((1, 2, 4, 4), "float32"):
        with R.dataflow():
            b = R.add(s, R.multiply(bias, R.const(2.0, "float32")))
            gv = R.nn.softmax(b, axis=-1)
            R.output(gv)
        return gv


def _args(masked: tuple[int, ...] = (3,)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((1, 1, 1, 4), bool)
    mask[..., list(masked)] = False
    return [rng.standard_normal((1, 2, 4, 4)).astype(np.float32), mask]


def test_a_mask_true_for_every_query_becomes_one_row():
    (
        Tester(Rows)
        .run_passes([FoldAttentionMaskRows()])
        .check_fired("FoldAttentionMaskRows", 1)
        .check_structurally_equal(OneRow)
        .check_matches_unpassed(_args(), tol=0.0)
    )


def test_a_mask_of_one_row_already_comes_back_unchanged():
    tester = Tester(OneRow).run_passes([FoldAttentionMaskRows()]).check_unchanged()
    assert tester.refusals("FoldAttentionMaskRows") == []


def test_a_causal_mask_is_refused_because_its_rows_differ():
    (
        Tester(Causal)
        .run_passes([FoldAttentionMaskRows()])
        .check_unchanged()
        .check_refused("FoldAttentionMaskRows", "differs between query rows")
    )


def test_a_mask_the_caller_passes_is_refused_naming_what_hides_its_rows():
    (
        Tester(UserMask)
        .run_passes([FoldAttentionMaskRows()])
        .check_unchanged()
        .check_refused("FoldAttentionMaskRows", "cannot show the mask is the same for every query")
    )


def _bias_shapes(mod) -> set[tuple[int, ...]]:
    return {tuple(int(d) for d in call.args[1][3].ty.shape) for call in fused_attention_calls(mod)}


def test_captured_mobilebert_attention_reads_one_mask_row_and_matches_eager():
    model = tiny_model("MobileBertModel", num_hidden_layers=2)
    tester = (
        Tester.from_model(model, seq_len=12)
        .run_passes("default")
        .check_fired("FoldAttentionMaskRows", 2)  # once per layer
    )
    assert _bias_shapes(tester.mod) == {(1, 1, 1, 12)}
    first, second = fused_attention_calls(tester.mod)
    assert first.args[1][3].same_as(second.args[1][3])  # both layers read the one folded mask
    tester.check_matches_eager(pad=5)


def test_batch_of_two_with_their_own_masks_matches_eager():
    from mbcompile.capture import capture

    model = tiny_model("MobileBertForSequenceClassification")
    cap = capture(model, seq_len=10, batch_size=2)
    tester = Tester(cap.mod, model=model, signature=cap.signature).run_passes("default")
    tester.check_fired("FoldAttentionMaskRows", 1)
    assert _bias_shapes(tester.mod) == {(2, 1, 1, 10)}
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[0, 7:] = 0
    mask[1, 3:] = 0
    types = torch.zeros(2, 10, dtype=torch.int64)
    from tester import max_error, run

    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    args = [ids.numpy(), mask.numpy(), types.numpy()]
    if cap.signature.takes_lengths:
        args.append(np.full((2,), 10, dtype=np.int64))
    (got,) = run(tester.mod, args)
    assert max_error([got], [want]) <= 1e-4
