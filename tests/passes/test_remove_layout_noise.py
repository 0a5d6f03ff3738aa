"""RemoveLayoutNoise: cancelling permute/reshape chains and identity broadcasts disappear."""

from __future__ import annotations

from tester import Tester
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import RemoveLayoutNoise


@I.ir_module
class Noisy:
    """The attention context's three permutes (the first two cancel), a reshape chain and an
    identity broadcast, as the importer writes them."""

    @R.function
    def main(x: R.Tensor((1, 4, 2, 3), "float32")) -> R.Tensor((2, 12), "float32"):
        with R.dataflow():
            p1 = R.permute_dims(x, axes=[2, 0, 1, 3])
            p2 = R.permute_dims(p1, axes=[1, 2, 0, 3])
            p3 = R.permute_dims(p2, axes=[0, 2, 1, 3])
            r1 = R.reshape(p3, R.shape([1, 2, 12]))
            r2 = R.reshape(r1, R.shape([2, 12]))
            b1 = R.broadcast_to(r2, R.shape([2, 12]))
            gv = R.multiply(b1, R.const(2.0, "float32"))
            R.output(gv)
        return gv


@I.ir_module
class Quiet:
    @R.function
    def main(x: R.Tensor((1, 4, 2, 3), "float32")) -> R.Tensor((2, 12), "float32"):
        with R.dataflow():
            p3 = R.permute_dims(x, axes=[0, 2, 1, 3])
            r2 = R.reshape(p3, R.shape([2, 12]))
            gv = R.multiply(r2, R.const(2.0, "float32"))
            R.output(gv)
        return gv


@I.ir_module
class ReshapeWithAnotherUser:
    @R.function
    def main(
        x: R.Tensor((2, 6), "float32"),
    ) -> R.Tuple(R.Tensor((3, 4), "float32"), R.Tensor((12,), "float32")):
        with R.dataflow():
            r1 = R.reshape(x, R.shape([3, 4]))
            r2 = R.reshape(r1, R.shape([12]))
            gv = (r1, r2)
            R.output(gv)
        return gv


@I.ir_module
class CancellingDespiteAnotherUser:
    @R.function
    def main(
        x: R.Tensor((2, 6), "float32"),
    ) -> R.Tuple(R.Tensor((3, 4), "float32"), R.Tensor((2, 6), "float32")):
        with R.dataflow():
            r1 = R.reshape(x, R.shape([3, 4]))
            r2 = R.reshape(r1, R.shape([2, 6]))
            gv = (r1, r2)
            R.output(gv)
        return gv


@I.ir_module
class Cancelled:
    @R.function
    def main(
        x: R.Tensor((2, 6), "float32"),
    ) -> R.Tuple(R.Tensor((3, 4), "float32"), R.Tensor((2, 6), "float32")):
        with R.dataflow():
            r1 = R.reshape(x, R.shape([3, 4]))
            gv = (r1, x)
            R.output(gv)
        return gv


def test_cancelling_permutes_reshape_chains_and_identity_broadcasts_disappear():
    (
        Tester(Noisy)
        .run_passes([RemoveLayoutNoise()])
        .check_structurally_equal(Quiet)
        .check_not(["relax.broadcast_to"])
    )


def test_needed_layout_ops_come_back_unchanged():
    tester = Tester(Quiet).run_passes([RemoveLayoutNoise()]).check_unchanged()
    assert tester.refusals("RemoveLayoutNoise") == []


def test_reshape_chain_whose_inner_reshape_has_another_user_is_not_composed():
    tester = Tester(ReshapeWithAnotherUser).run_passes([RemoveLayoutNoise()]).check_unchanged()
    tester.check_refused("RemoveLayoutNoise", "r2: the inner reshape has another user")


def test_chain_that_cancels_outright_goes_even_when_its_inner_op_has_another_user():
    (
        Tester(CancellingDespiteAnotherUser)
        .run_passes([RemoveLayoutNoise()])
        .check_fired("RemoveLayoutNoise", 1)
        .check_structurally_equal(Cancelled)
    )


def test_quiet_layout_computes_what_the_noisy_one_did():
    Tester(Noisy).run_passes([RemoveLayoutNoise()]).check_matches_unpassed(tol=0.0)


def test_captured_mobilebert_layout_noise_goes_and_outputs_match_eager(tiny_base):
    (
        tiny_base.fresh()
        .run_passes([RemoveLayoutNoise()])
        .check_fired("RemoveLayoutNoise")
        .check_not(["relax.broadcast_to"])  # every broadcast the importer writes is identity
        .check_matches_eager()
    )
