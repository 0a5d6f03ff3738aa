"""RemoveLinearReshapes: linears run on the N-D activation, so their epilogues fuse into the
matmul kernel (the residual NoNorm above all)."""

from __future__ import annotations

import numpy as np
import tvm
from tester import TARGET, Tester, bind, random_args
from tvm import relax, tirx
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import DEFAULT_PASSES, RemoveLinearReshapes
from mbcompile.passes.graph import Graph
from mbcompile.report import kernel_calls
from mbcompile.targets.pipeline import fused_module
from mbcompile.targets.schedules import DensePacked

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 8)).astype("float32")  # (out, in), as torch stores it
B = RNG.standard_normal(6).astype("float32")
GAMMA = (1 + 0.3 * RNG.standard_normal(6)).astype("float32")
BETA = RNG.standard_normal(6).astype("float32")


@I.ir_module
class ResidualNoNorm:
    """What the importer emits for the output linear of a block: reshape pair, residual, NoNorm."""

    @R.function
    def main(
        x: R.Tensor((1, 4, 8), "float32"),
        r: R.Tensor((1, 4, 6), "float32"),
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
            lv5 = R.add(lv4, r)
            lv6 = R.multiply(lv5, g)
            lv7 = R.add(lv6, be)
            R.output(lv7)
        return lv7


@I.ir_module
class ResidualNoNorm3D:
    @R.function
    def main(
        x: R.Tensor((1, 4, 8), "float32"),
        r: R.Tensor((1, 4, 6), "float32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
        g: R.Tensor((6,), "float32"),
        be: R.Tensor((6,), "float32"),
    ) -> R.Tensor((1, 4, 6), "float32"):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(x, lv1, out_dtype="float32")
            lv4 = R.add(b, lv2)
            lv5 = R.add(lv4, r)
            lv6 = R.multiply(lv5, g)
            lv7 = R.add(lv6, be)
            R.output(lv7)
        return lv7


@I.ir_module
class FlatInput:
    """The matmul reads a 2-D tensor that is no reshape (here a parameter): it gets one."""

    @R.function
    def main(
        y: R.Tensor((6, 8), "float32"), w: R.Tensor((6, 8), "float32")
    ) -> R.Tensor((2, 3, 6), "float32"):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(y, lv1, out_dtype="float32")
            lv3 = R.reshape(lv2, R.shape([2, 3, 6]))
            R.output(lv3)
        return lv3


@I.ir_module
class FlatInput3D:
    @R.function
    def main(
        y: R.Tensor((6, 8), "float32"), w: R.Tensor((6, 8), "float32")
    ) -> R.Tensor((2, 3, 6), "float32"):
        with R.dataflow():
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv0 = R.reshape(y, R.shape([2, 3, 8]))
            lv3 = R.matmul(lv0, lv1, out_dtype="float32")
            R.output(lv3)
        return lv3


@I.ir_module
class ReshapeSplitsChannels:
    """The reshape after the linear splits its channels into heads: not a flatten's inverse."""

    @R.function
    def main(
        x: R.Tensor((1, 4, 8), "float32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
    ) -> R.Tensor((1, 4, 2, 3), "float32"):
        with R.dataflow():
            lv0 = R.reshape(x, R.shape([4, 8]))
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(lv0, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv4 = R.reshape(lv3, R.shape([1, 4, 2, 3]))
            R.output(lv4)
        return lv4


@I.ir_module
class FlatOutputAlsoUsed:
    """The 2-D linear output is returned too: it is needed as is."""

    @R.function
    def main(
        x: R.Tensor((1, 4, 8), "float32"),
        w: R.Tensor((6, 8), "float32"),
        b: R.Tensor((6,), "float32"),
    ) -> R.Tuple(R.Tensor((1, 4, 6), "float32"), R.Tensor((4, 6), "float32")):
        with R.dataflow():
            lv0 = R.reshape(x, R.shape([4, 8]))
            lv1 = R.permute_dims(w, axes=[1, 0])
            lv2 = R.matmul(lv0, lv1, out_dtype="float32")
            lv3 = R.add(b, lv2)
            lv4 = R.reshape(lv3, R.shape([1, 4, 6]))
            gv = (lv4, lv3)
            R.output(gv)
        return gv


def residual_before():
    return bind(ResidualNoNorm, w=W, b=B, g=GAMMA, be=BETA)


def test_reshape_pair_around_a_linear_goes_and_the_matmul_reads_the_3d_input():
    (
        Tester(residual_before())
        .run_passes([RemoveLinearReshapes()])
        .check_fired("RemoveLinearReshapes", 1)
        .check_not(["relax.reshape"])
        .check_structurally_equal(bind(ResidualNoNorm3D, w=W, b=B, g=GAMMA, be=BETA))
    )


def test_a_flat_input_that_is_no_reshape_is_reshaped_to_the_output_rows():
    (
        Tester(bind(FlatInput, w=W))
        .run_passes([RemoveLinearReshapes()])
        .check_fired("RemoveLinearReshapes", 1)
        .check_structurally_equal(bind(FlatInput3D, w=W))
        .check_matches_unpassed()
    )


def test_a_reshape_that_splits_the_channels_is_left_alone():
    tester = Tester(bind(ReshapeSplitsChannels, w=W, b=B))
    tester.run_passes([RemoveLinearReshapes()]).check_unchanged()
    tester.check_refused("RemoveLinearReshapes", "does not restore leading axes")


def test_a_linear_whose_flat_output_has_another_user_is_refused():
    tester = Tester(bind(FlatOutputAlsoUsed, w=W, b=B))
    tester.run_passes([RemoveLinearReshapes()]).check_unchanged()
    tester.check_refused("RemoveLinearReshapes", "has another user")


def test_a_runtime_weight_is_not_a_linear_to_rewrite():
    tester = Tester(bind(ResidualNoNorm, b=B, g=GAMMA, be=BETA))  # w stays a parameter
    tester.run_passes([RemoveLinearReshapes()]).check_unchanged()
    tester.check_refused("RemoveLinearReshapes", "not a constant expression")


def test_the_3d_linear_computes_what_the_2d_one_did():
    before = residual_before()
    Tester(before).run_passes([RemoveLinearReshapes()]).check_matches_unpassed(
        random_args(before["main"])
    )


# --------------------------------------------------------------------------- captured model


def _residual_gammas(mod: tvm.IRModule) -> list[np.ndarray]:
    """γ of every NoNorm (``x·γ + β``, constants) left in ``main`` after the passes: the ones
    after a residual add, which FoldNoNorm cannot fold."""
    gamma = is_const()
    pattern = is_op("relax.add")(is_op("relax.multiply")(wildcard(), gamma), is_const())
    graph = Graph(mod["main"])
    found = []
    for _, value in graph.bindings():
        m = graph.match(pattern, value)
        if m is not None:
            found.append(graph.constant(m[gamma]))
    return found


def _kernels_reading(fused: tvm.IRModule, arrays: list[np.ndarray]) -> list[tirx.PrimFunc]:
    """The PrimFuncs of the ``call_tir`` calls in ``main`` that take one of ``arrays`` as a
    constant argument."""
    kernels = []

    def visit(expr):
        if not (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"):
            return
        for arg in expr.args[1].fields:
            if isinstance(arg, tvm.ir.GenericConst) and any(
                a.shape == tuple(arg.value.shape) and np.array_equal(a, arg.value.numpy())
                for a in arrays
            ):
                kernels.append(fused[expr.args[0]])
                return

    relax.analysis.post_order_visit(fused["main"], visit)
    return kernels


def test_residual_nonorm_is_an_epilogue_of_the_dense_kernel_not_a_kernel_of_its_own(tiny_base):
    target = tvm.target.Target(TARGET)
    without = [p for p in DEFAULT_PASSES if p is not RemoveLinearReshapes]
    before = tiny_base.fresh().run_passes(without)
    after = tiny_base.fresh().run_passes("default").check_fired("RemoveLinearReshapes")
    gammas = _residual_gammas(after.mod)
    # The layer's two FFN residuals and its output residual (the attention residual folds).
    assert len(gammas) == 3
    fused_before = fused_module(before.mod, target)
    fused_after = fused_module(after.mod, target)

    dense = DensePacked()
    standalone = _kernels_reading(fused_before, gammas)
    assert len(standalone) == 3
    assert all(dense.apply(k, target, False) is None for k in standalone), "no matmul before"

    fused = _kernels_reading(fused_after, gammas)
    assert len(fused) == 3
    for kernel in fused:
        # The dense schedule matches the kernel and fuses the whole tail into its register tile.
        assert dense.apply(kernel, target, False) is not None, kernel.script()

    # Kernels that run (a reshape alone becomes a view when lowered): the three NoNorm tails,
    # the two ReLUs and the embedding and attention residual adds are epilogues now.
    views = relax.transform.RewriteDataflowReshape()
    assert (kernel_calls(views(fused_before)), kernel_calls(views(fused_after))) == (31, 22)
    after.check_matches_eager()
