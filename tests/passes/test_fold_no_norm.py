"""FoldNoNorm: x·γ + β folds into the linear or embedding tables before it."""

from __future__ import annotations

import numpy as np
from tester import Tester, bind, random_args
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import FoldNoNorm

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 8)).astype("float32")  # (out, in), as torch stores it
B = RNG.standard_normal(6).astype("float32")
GAMMA = (1 + 0.3 * RNG.standard_normal(6)).astype("float32")
BETA = RNG.standard_normal(6).astype("float32")


def folded(w, b, gamma, beta):
    """What the pass computes: float64, cast back to float32."""
    g = gamma.astype(np.float64)
    w2 = (w.astype(np.float64) * g[:, None]).astype("float32")
    b2 = (b.astype(np.float64) * g + beta).astype("float32")
    return w2, b2


@I.ir_module
class LinearNoNorm:
    @R.function
    def main(
        x: R.Tensor((1, 4, 8), "float32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
    ) -> R.Tensor((1, 4, 6), "float32"):
        with R.dataflow():
            lv0 = R.reshape(x, R.shape([4, 8]))
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(lv0, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv4 = R.reshape(lv3, R.shape([1, 4, 6]))
            lv5 = R.multiply(lv4, g)
            lv6 = R.add(lv5, be)
            R.output(lv6)
        return lv6


@I.ir_module
class LinearFolded:
    @R.function
    def main(
        x: R.Tensor((1, 4, 8), "float32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
    ) -> R.Tensor((1, 4, 6), "float32"):
        with R.dataflow():
            lv0 = R.reshape(x, R.shape([4, 8]))
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(lv0, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv6 = R.reshape(lv3, R.shape([1, 4, 6]))
            R.output(lv6)
        return lv6


@I.ir_module
class EmbeddingNoNorm:
    """The embedding sum: transformed trigram + position rows + type rows, then NoNorm."""

    @R.function
    def main(
        tri: R.Tensor((4, 8), "float32"),
        pos: R.Tensor((4,), "int32"),
        types: R.Tensor((4,), "int32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
        p: R.Tensor((5, 6), "float32"),
        t: R.Tensor((2, 6), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
    ) -> R.Tensor((4, 6), "float32"):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(tri, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv4 = R.take(p, pos, axis=0, mode="fast")
            lv5 = R.take(t, types, axis=0, mode="fast")
            lv6 = R.add(lv3, lv4)
            lv7 = R.add(lv6, lv5)
            lv8 = R.multiply(lv7, g)
            lv9 = R.add(lv8, be)
            R.output(lv9)
        return lv9


@I.ir_module
class EmbeddingFolded:
    @R.function
    def main(
        tri: R.Tensor((4, 8), "float32"),
        pos: R.Tensor((4,), "int32"),
        types: R.Tensor((4,), "int32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
        p: R.Tensor((5, 6), "float32"),
        t: R.Tensor((2, 6), "float32"),
    ) -> R.Tensor((4, 6), "float32"):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(tri, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv4 = R.take(p, pos, axis=0, mode="fast")
            lv6 = R.add(lv3, lv4)
            lv5 = R.take(t, types, axis=0, mode="fast")
            lv9 = R.add(lv6, lv5)
            R.output(lv9)
        return lv9


@I.ir_module
class ResidualNoNorm:
    """NoNorm after a residual add: the input x comes from no weight."""

    @R.function
    def main(
        x: R.Tensor((4, 6), "float32"),
        w: R.Tensor((6, 6), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
    ) -> R.Tensor((4, 6), "float32"):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(x, lv1, out_dtype="float32")
            lv3 = R.add(lv2, x)
            lv4 = R.multiply(lv3, g)
            lv5 = R.add(lv4, be)
            R.output(lv5)
        return lv5


@I.ir_module
class LinearWithAnotherUser:
    """The linear's output is also returned: folding γ would change what that user sees."""

    @R.function
    def main(
        x: R.Tensor((4, 8), "float32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
    ) -> R.Tuple(R.Tensor((4, 6), "float32"), R.Tensor((4, 6), "float32")):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(x, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv4 = R.multiply(lv3, g)
            lv5 = R.add(lv4, be)
            gv = (lv5, lv3)
            R.output(gv)
        return gv


def linear_before():
    return bind(LinearNoNorm, w=W, b=B, g=GAMMA, be=BETA)


def test_nonorm_after_a_linear_folds_into_its_weight_and_bias():
    w2, b2 = folded(W, B, GAMMA, BETA)
    (
        Tester(linear_before())
        .run_passes([FoldNoNorm()])
        .check_fired("FoldNoNorm", 1)
        .check_structurally_equal(bind(LinearFolded, w=w2, b=b2))
    )


def test_nonorm_after_the_embedding_sum_folds_into_the_transformation_and_tables():
    rng = np.random.default_rng(1)
    p = rng.standard_normal((5, 6)).astype("float32")
    t = rng.standard_normal((2, 6)).astype("float32")
    before = bind(EmbeddingNoNorm, w=W, b=B, p=p, t=t, g=GAMMA, be=BETA)
    w2, b2 = folded(W, B, GAMMA, BETA)  # β joins the linear's bias
    p2 = (p.astype(np.float64) * GAMMA.astype(np.float64)).astype("float32")
    t2 = (t.astype(np.float64) * GAMMA.astype(np.float64)).astype("float32")
    expected = bind(EmbeddingFolded, w=w2, b=b2, p=p2, t=t2)
    tester = Tester(before).run_passes([FoldNoNorm()]).check_fired("FoldNoNorm", 1)
    tester.check_structurally_equal(expected)
    tester.check_matches_unpassed(random_args(before["main"], high=2))


def test_nonorm_after_a_residual_is_left_for_kernel_fusion():
    before = bind(ResidualNoNorm, w=W[:, :6].copy(), g=GAMMA, be=BETA)
    tester = Tester(before).run_passes([FoldNoNorm()]).check_unchanged()
    tester.check_refused("FoldNoNorm", "residual")


def test_a_module_without_nonorm_comes_back_unchanged():
    tester = Tester(LinearFolded).run_passes([FoldNoNorm()]).check_unchanged()
    assert tester.refusals("FoldNoNorm") == []


def test_nonorm_whose_linear_has_another_user_is_refused():
    before = bind(LinearWithAnotherUser, w=W, b=B, g=GAMMA, be=BETA)
    tester = Tester(before).run_passes([FoldNoNorm()]).check_unchanged()
    tester.check_refused("FoldNoNorm", "has another user")


def test_nonorm_with_a_non_constant_gamma_does_not_match():
    # γ stays a parameter: the pattern asks for constants, so nothing is even refused.
    before = bind(LinearNoNorm, w=W, b=B, be=BETA)
    Tester(before).run_passes([FoldNoNorm()]).check_unchanged()


def test_folded_linear_computes_what_the_nonorm_did():
    Tester(linear_before()).run_passes([FoldNoNorm()]).check_matches_unpassed()


def test_captured_mobilebert_nonorms_fold_and_match_eager(tiny_base):
    (
        tiny_base.fresh()
        .run_passes([FoldNoNorm()])
        # embedding, bottleneck input, bottleneck attention, then the attention residual
        .check_fired("FoldNoNorm", 4)
        # later residual NoNorms read a tensor that the next block reads too
        .check_refused("FoldNoNorm", "has another user")
        .check_matches_eager()
    )
