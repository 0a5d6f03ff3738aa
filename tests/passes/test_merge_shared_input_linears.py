"""MergeSharedInputLinears: linears reading one tensor become one wider matmul and slices."""

from __future__ import annotations

import numpy as np
import tvm
from tester import TARGET, Tester, bind
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import MergeSharedInputLinears, count_matmuls
from mbcompile.targets.pipeline import fused_module

RNG = np.random.default_rng(0)
# Three linears of different widths (6, 5, 4) reading the same 8 channels.
WEIGHTS = {
    "w1": RNG.standard_normal((6, 8)).astype("float32"),
    "b1": RNG.standard_normal(6).astype("float32"),
    "w2": RNG.standard_normal((5, 8)).astype("float32"),
    "b2": RNG.standard_normal(5).astype("float32"),
    "w3": RNG.standard_normal((4, 8)).astype("float32"),
    "b3": RNG.standard_normal(4).astype("float32"),
}


@I.ir_module
class ThreeLinears:
    """As the importer writes them: each linear reshapes the shared input on its own."""

    @R.function
    def main(
        h: R.Tensor((1, 4, 8), "float32"),
        w1: R.Tensor((6, 8), "float32"),
        b1: R.Tensor((6,), "float32"),
        w2: R.Tensor((5, 8), "float32"),
        b2: R.Tensor((5,), "float32"),
        w3: R.Tensor((4, 8), "float32"),
        b3: R.Tensor((4,), "float32"),
    ) -> R.Tuple(
        R.Tensor((4, 6), "float32"), R.Tensor((4, 5), "float32"), R.Tensor((4, 4), "float32")
    ):
        with R.dataflow():
            a0 = R.reshape(h, R.shape([4, 8]))
            a1 = R.permute_dims(w1, axes=[1, 0])
            a2 = R.matmul(a0, a1, out_dtype="float32")
            a3 = R.add(b1, a2)
            c0 = R.reshape(h, R.shape([4, 8]))
            c1 = R.permute_dims(w2, axes=[1, 0])
            c2 = R.matmul(c0, c1, out_dtype="float32")
            c3 = R.add(b2, c2)
            v0 = R.reshape(h, R.shape([4, 8]))
            v1 = R.permute_dims(w3, axes=[1, 0])
            v2 = R.matmul(v0, v1, out_dtype="float32")
            v3 = R.add(b3, v2)
            gv = (a3, c3, v3)
            R.output(gv)
        return gv


@I.ir_module
class Merged:
    @R.function
    def main(
        h: R.Tensor((1, 4, 8), "float32"),
        w: R.Tensor((15, 8), "float32"),
        b: R.Tensor((15,), "float32"),
    ) -> R.Tuple(
        R.Tensor((4, 6), "float32"), R.Tensor((4, 5), "float32"), R.Tensor((4, 4), "float32")
    ):
        with R.dataflow():
            a0 = R.reshape(h, R.shape([4, 8]))
            m1 = R.permute_dims(w, axes=[1, 0])
            m2 = R.matmul(a0, m1, out_dtype="float32")
            m3 = R.add(b, m2)
            a3 = R.strided_slice(m3, axes=[1], begin=[0], end=[6], assume_inbound=True)
            c3 = R.strided_slice(m3, axes=[1], begin=[6], end=[11], assume_inbound=True)
            v3 = R.strided_slice(m3, axes=[1], begin=[11], end=[15], assume_inbound=True)
            gv = (a3, c3, v3)
            R.output(gv)
        return gv


@I.ir_module
class MatmulWithAnotherUser:
    """The middle linear's matmul is also returned without its bias."""

    @R.function
    def main(
        h: R.Tensor((4, 8), "float32"),
        w1: R.Tensor((6, 8), "float32"),
        b1: R.Tensor((6,), "float32"),
        w2: R.Tensor((5, 8), "float32"),
        b2: R.Tensor((5,), "float32"),
        w3: R.Tensor((4, 8), "float32"),
        b3: R.Tensor((4,), "float32"),
    ) -> R.Tuple(
        R.Tensor((4, 6), "float32"),
        R.Tensor((4, 5), "float32"),
        R.Tensor((4, 4), "float32"),
        R.Tensor((4, 5), "float32"),
    ):
        with R.dataflow():
            a1 = R.permute_dims(w1, axes=[1, 0])
            a2 = R.matmul(h, a1, out_dtype="float32")
            a3 = R.add(b1, a2)
            c1 = R.permute_dims(w2, axes=[1, 0])
            c2 = R.matmul(h, c1, out_dtype="float32")
            c3 = R.add(b2, c2)
            v1 = R.permute_dims(w3, axes=[1, 0])
            v2 = R.matmul(h, v1, out_dtype="float32")
            v3 = R.add(b3, v2)
            gv = (a3, c3, v3, c2)
            R.output(gv)
        return gv


@I.ir_module
class DifferentInputs:
    @R.function
    def main(
        h: R.Tensor((4, 8), "float32"),
        g: R.Tensor((4, 8), "float32"),
        w1: R.Tensor((6, 8), "float32"),
        w2: R.Tensor((5, 8), "float32"),
    ) -> R.Tuple(R.Tensor((4, 6), "float32"), R.Tensor((4, 5), "float32")):
        with R.dataflow():
            a1 = R.permute_dims(w1, axes=[1, 0])
            a2 = R.matmul(h, a1, out_dtype="float32")
            c1 = R.permute_dims(w2, axes=[1, 0])
            c2 = R.matmul(g, c1, out_dtype="float32")
            gv = (a2, c2)
            R.output(gv)
        return gv


def test_three_linears_reading_one_tensor_become_one_matmul_and_three_slices():
    w = np.concatenate([WEIGHTS["w1"], WEIGHTS["w2"], WEIGHTS["w3"]])
    b = np.concatenate([WEIGHTS["b1"], WEIGHTS["b2"], WEIGHTS["b3"]])
    (
        Tester(bind(ThreeLinears, **WEIGHTS))
        .run_passes([MergeSharedInputLinears()])
        .check_fired("MergeSharedInputLinears", 1)
        .check_structurally_equal(bind(Merged, w=w, b=b))
        .check_matmuls(1)
    )


def test_linears_reading_different_tensors_come_back_unchanged():
    before = bind(DifferentInputs, w1=WEIGHTS["w1"], w2=WEIGHTS["w2"])
    Tester(before).run_passes([MergeSharedInputLinears()]).check_unchanged()


def test_linear_whose_matmul_has_another_user_stays_out_of_the_merge():
    tester = (
        Tester(bind(MatmulWithAnotherUser, **WEIGHTS))
        .run_passes([MergeSharedInputLinears()])
        .check_fired("MergeSharedInputLinears", 1)
        .check_refused("MergeSharedInputLinears", "c3: the matmul inside this linear has another")
        .check_matmuls(2)  # the first and last merged, the middle one alone
    )
    tester.check_matches_unpassed()


def test_merged_linears_compute_what_the_separate_ones_did():
    Tester(bind(ThreeLinears, **WEIGHTS)).run_passes(
        [MergeSharedInputLinears()]
    ).check_matches_unpassed()


def test_captured_mobilebert_shared_input_linears_merge_and_match_eager(tiny_base):
    tester = (
        tiny_base.fresh()
        .run_passes([MergeSharedInputLinears()])
        # bottleneck input + bottleneck attention + value, then query + key
        .check_fired("MergeSharedInputLinears", 2)
        .check_matches_eager()
    )
    assert count_matmuls(tester.original) - count_matmuls(tester.mod) == 3


def test_slices_of_a_merged_output_fuse_into_their_readers_and_copy_nothing_alone(tiny_base):
    """A tuple-valued split would be a kernel of its own copying every part; each slice instead
    becomes part of the kernel that reads it (K's head transpose, the residual add, the next
    linear; Q and V are read in place by the attention kernel)."""
    mod = tiny_base.fresh().run_passes("default").mod
    fused = fused_module(mod, tvm.target.Target(TARGET))
    names = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not [n for n in names if "split" in n]
    assert not [n for n in names if n.startswith("strided_slice")], names  # no copy alone
    assert [n for n in names if "strided_slice" in n and "transpose" in n], names  # Kᵀ
