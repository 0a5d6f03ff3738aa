"""FoldAttentionScale: the constant scale on Q and Kᵀ folds into the query and key linears."""

from __future__ import annotations

import numpy as np
from tester import Tester, bind
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import FoldAttentionScale

RNG = np.random.default_rng(0)
WEIGHTS = {
    "wq": RNG.standard_normal((6, 8)).astype("float32"),
    "bq": RNG.standard_normal(6).astype("float32"),
    "wk": RNG.standard_normal((6, 8)).astype("float32"),
    "bk": RNG.standard_normal(6).astype("float32"),
}
SCALE = 0.4204482138156891  # 32 ** -0.25, in float32 below


def scaled(value: np.ndarray) -> np.ndarray:
    return (value.astype(np.float64) * np.float64(np.float32(SCALE))).astype("float32")


@I.ir_module
class ScaledQK:
    """Two heads of size 3: Q·s and Kᵀ·s as scaled_dot_product_attention is exported."""

    @R.function
    def main(
        x: R.Tensor((4, 8), "float32"),
        wq: R.Tensor((6, 8), "float32"),
        bq: R.Tensor((6,), "float32"),
        wk: R.Tensor((6, 8), "float32"),
        bk: R.Tensor((6,), "float32"),
    ) -> R.Tensor((1, 2, 4, 4), "float32"):
        with R.dataflow():
            q1 = R.permute_dims(wq, axes=[1, 0])
            q2 = R.matmul(x, q1, out_dtype="float32")
            q3 = R.add(bq, q2)
            q4 = R.reshape(q3, R.shape([1, 4, 2, 3]))
            q5 = R.permute_dims(q4, axes=[0, 2, 1, 3])
            q6 = R.multiply(q5, R.const(SCALE, "float32"))
            k1 = R.permute_dims(wk, axes=[1, 0])
            k2 = R.matmul(x, k1, out_dtype="float32")
            k3 = R.add(bk, k2)
            k4 = R.reshape(k3, R.shape([1, 4, 2, 3]))
            k5 = R.permute_dims(k4, axes=[0, 2, 1, 3])
            k6 = R.permute_dims(k5, axes=[0, 1, 3, 2])
            k7 = R.multiply(k6, R.const(SCALE, "float32"))
            s = R.matmul(q6, k7, out_dtype="float32")
            R.output(s)
        return s


@I.ir_module
class FoldedQK:
    @R.function
    def main(
        x: R.Tensor((4, 8), "float32"),
        wq: R.Tensor((6, 8), "float32"),
        bq: R.Tensor((6,), "float32"),
        wk: R.Tensor((6, 8), "float32"),
        bk: R.Tensor((6,), "float32"),
    ) -> R.Tensor((1, 2, 4, 4), "float32"):
        with R.dataflow():
            q1 = R.permute_dims(wq, axes=[1, 0])
            q2 = R.matmul(x, q1, out_dtype="float32")
            q3 = R.add(bq, q2)
            q4 = R.reshape(q3, R.shape([1, 4, 2, 3]))
            q6 = R.permute_dims(q4, axes=[0, 2, 1, 3])
            k1 = R.permute_dims(wk, axes=[1, 0])
            k2 = R.matmul(x, k1, out_dtype="float32")
            k3 = R.add(bk, k2)
            k4 = R.reshape(k3, R.shape([1, 4, 2, 3]))
            k5 = R.permute_dims(k4, axes=[0, 2, 1, 3])
            k7 = R.permute_dims(k5, axes=[0, 1, 3, 2])
            s = R.matmul(q6, k7, out_dtype="float32")
            R.output(s)
        return s


@I.ir_module
class ScaledQWithAnotherUser:
    """Q before scaling is also returned, so the query weights must stay unscaled."""

    @R.function
    def main(
        x: R.Tensor((4, 8), "float32"),
        wq: R.Tensor((6, 8), "float32"),
        bq: R.Tensor((6,), "float32"),
    ) -> R.Tuple(R.Tensor((1, 2, 4, 3), "float32"), R.Tensor((1, 4, 2, 3), "float32")):
        with R.dataflow():
            q1 = R.permute_dims(wq, axes=[1, 0])
            q2 = R.matmul(x, q1, out_dtype="float32")
            q3 = R.add(bq, q2)
            q4 = R.reshape(q3, R.shape([1, 4, 2, 3]))
            q5 = R.permute_dims(q4, axes=[0, 2, 1, 3])
            q6 = R.multiply(q5, R.const(SCALE, "float32"))
            gv = (q6, q4)
            R.output(gv)
        return gv


def test_scale_on_q_and_kt_folds_into_query_and_key_weights_and_biases():
    expected = bind(FoldedQK, **{name: scaled(value) for name, value in WEIGHTS.items()})
    (
        Tester(bind(ScaledQK, **WEIGHTS))
        .run_passes([FoldAttentionScale()])
        .check_fired("FoldAttentionScale", 2)
        .check_structurally_equal(expected)
        .check_not(["relax.multiply"])
    )


def test_a_module_without_scales_comes_back_unchanged():
    Tester(bind(FoldedQK, **WEIGHTS)).run_passes([FoldAttentionScale()]).check_unchanged()


def test_scale_whose_unscaled_q_has_another_user_is_refused():
    before = bind(ScaledQWithAnotherUser, wq=WEIGHTS["wq"], bq=WEIGHTS["bq"])
    tester = Tester(before).run_passes([FoldAttentionScale()]).check_unchanged()
    tester.check_refused("FoldAttentionScale", "q4 has another user")


def test_scale_on_a_tensor_from_no_linear_is_refused():
    # with the weights left as parameters the query is no linear with constant weights
    tester = Tester(ScaledQK).run_passes([FoldAttentionScale()]).check_unchanged()
    tester.check_refused("FoldAttentionScale", "does not come from a linear")


def test_folded_scale_computes_what_the_multiply_did():
    Tester(bind(ScaledQK, **WEIGHTS)).run_passes([FoldAttentionScale()]).check_matches_unpassed()


def test_captured_mobilebert_attention_scales_fold_and_match_eager(tiny_base):
    (
        tiny_base.fresh()
        .run_passes([FoldAttentionScale()])
        .check_fired("FoldAttentionScale", 2)  # Q and Kᵀ of the one layer
        .check_matches_eager()
    )
