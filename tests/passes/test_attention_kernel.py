"""The fused attention kernel against float64 numpy: shapes, vector widths, broadcasts, masks."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from helpers import attention_reference

from mbcompile.cpu import cpu_info
from mbcompile.passes.attention_kernel import (
    KIND,
    KIND_ATTR,
    RowsLayout,
    attention_kernel,
)

NEG_INF = float("-inf")
TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _run(kernel: tvm.tirx.PrimFunc, *args: np.ndarray, out_shape) -> np.ndarray:
    mod = tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=TARGET)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


def _check(
    bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, *, lanes=None, mask=None, scale=2.0,
    fma_by_lane=False,
):
    """Scores of standard deviation ``scale² · √dim``; at 20 and more, float32's rounding of the
    scores alone (any kernel's) exceeds 1e-5 in the output."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((bh, seq_q, dim)).astype("float32") * scale
    kt = rng.standard_normal((bh, dim, seq_k)).astype("float32") * scale
    v = rng.standard_normal((bh, seq_k, dim_v)).astype("float32")
    bias = rng.standard_normal(bias_shape).astype("float32")
    if mask is not None:
        mask(bias)
    kernel = attention_kernel(
        bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, lanes=lanes, fma_by_lane=fma_by_lane
    )
    out = _run(kernel, q, kt, v, bias, out_shape=(bh, seq_q, dim_v))
    expected = attention_reference(q, kt, v, bias, heads)
    assert np.abs(out - expected).max() <= 1e-5
    return out


def test_mobilebert_shape_equals_numpy():
    def mask_last_keys(bias):
        bias[..., -5:] = NEG_INF

    _check(4, 128, 128, 32, 32, 4, (1, 1, 1, 128), mask=mask_last_keys, scale=1.0)
    _check(
        4, 128, 128, 32, 32, 4, (1, 1, 1, 128), mask=mask_last_keys, scale=1.0, lanes=4,
        fma_by_lane=True,
    )


@pytest.mark.parametrize("fma_by_lane", [False, True])
@pytest.mark.parametrize("lanes", [4, 8, 16])
@pytest.mark.parametrize(
    "bh, seq_q, seq_k, dim, dim_v, heads, bias_shape",
    [
        (4, 7, 7, 5, 5, 2, (2, 1, 1, 7)),  # nothing fills a vector; bias per batch
        (3, 16, 16, 8, 8, 3, (1, 3, 16, 16)),  # bias per head and query
        (2, 13, 37, 9, 40, 2, (1, 1, 13, 1)),  # seq_q ≠ seq_k, tails everywhere, bias per query
        (1, 1, 3, 2, 3, 1, (1, 1, 1, 1)),  # one query row, scalar bias
    ],
)
def test_odd_shapes_and_broadcast_biases_equal_numpy_at_every_vector_width(
    bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, lanes, fma_by_lane
):
    """``fma_by_lane`` (AArch64's staged groups) runs here too: the code is valid anywhere."""
    _check(bh, seq_q, seq_k, dim, dim_v, heads, bias_shape, lanes=lanes, fma_by_lane=fma_by_lane)


@pytest.mark.parametrize("lanes", [4, 8])
def test_partially_and_fully_masked_rows_give_softmax_and_zeros(lanes):
    def mask(bias):
        bias[0, 0, :, 3:9] = NEG_INF  # some keys of every row
        bias[0, 0, 2, :] = NEG_INF  # every key of row 2 (heads 0)
        bias[1, :, 10, :] = NEG_INF  # every key of row 10 (batch 1, all heads)

    out = _check(6, 11, 19, 6, 6, 3, (2, 3, 11, 19), lanes=lanes, mask=mask)
    assert not out[0, 2].any() and not out[3:, 10].any()
    assert out[1, 2].any()


def test_every_key_masked_gives_zeros_not_nan():
    def mask_all(bias):
        bias[...] = NEG_INF

    out = _check(2, 9, 9, 4, 4, 2, (1, 1, 1, 9), mask=mask_all)
    assert not out.any()


def test_large_scores_do_not_overflow():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 8, 4)).astype("float32") * 30  # scores in the thousands
    kt = rng.standard_normal((2, 4, 8)).astype("float32") * 30
    v = rng.standard_normal((2, 8, 4)).astype("float32")
    bias = np.zeros((1, 1, 1, 8), "float32")
    out = _run(attention_kernel(2, 8, 8, 4, 4, 2, bias.shape), q, kt, v, bias, out_shape=(2, 8, 4))
    assert np.abs(out - attention_reference(q, kt, v, bias, 2)).max() <= 1e-5


def test_kernel_is_marked_scheduled_and_as_attention():
    kernel = attention_kernel(4, 128, 128, 32, 32, 4, (1, 1, 1, 128))
    assert kernel.attrs[KIND_ATTR] == KIND
    assert bool(kernel.attrs["tirx.is_scheduled"])


def vector_lanes(target=None) -> int:
    """The fp32 lanes FuseAttention sizes its kernel for (``mbcompile.cpu``)."""
    return cpu_info(target).lanes("float32")


def test_vector_width_follows_the_target():
    def lanes(spec):
        return vector_lanes(tvm.target.Target(spec))

    assert lanes({"kind": "llvm", "mcpu": "znver3"}) == 8
    assert lanes({"kind": "llvm", "mcpu": "skylake-avx512"}) == 16
    # Zen 4 has AVX-512 but runs each 512-bit operation as two 256-bit halves.
    assert lanes({"kind": "llvm", "mcpu": "znver4"}) == 8
    assert lanes({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) == 4
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}):
        assert vector_lanes() == 8
    assert vector_lanes() == 8  # no target set


def test_only_the_scores_block_is_a_heap_workspace():
    """TVM 0.27 keeps a CPU buffer on the stack only in "global" scope and under 1 KiB; any other
    becomes a TVMBackendAllocWorkspace call in every parallel iteration. Only the block's scores
    (6 rows × 128 keys, 3 KiB) may take that path; the register tiles and row statistics may not."""
    kernel = attention_kernel(4, 128, 128, 32, 32, 4, (1, 1, 1, 128), lanes=8)
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), TARGET)
    source = lib.mod.imports[0].inspect_source("ll") if lib.mod.imports else lib.mod.inspect_source("ll")
    calls = source.count("@__TVMBackendAllocWorkspace, align")
    assert calls == 1, f"{calls} workspace allocations per iteration"


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_rows_layout_reads_q_and_v_at_column_offsets_and_writes_token_rows(lanes):
    """q and v inside wider row-major tensors (a merged linear's output), the output as token
    rows: the same numbers as the head layout, and no column outside the heads is read."""
    heads, seq, dim = 3, 13, 8
    rng = np.random.default_rng(1)
    q_rows = rng.standard_normal((seq, 4 * heads * dim + 3)).astype("float32")
    v_rows = rng.standard_normal((seq, heads * dim + 5)).astype("float32")
    q_off, v_off = 2 * heads * dim + 1, 5
    q = q_rows[:, q_off : q_off + heads * dim].reshape(seq, heads, dim).transpose(1, 0, 2)
    v = v_rows[:, v_off : v_off + heads * dim].reshape(seq, heads, dim).transpose(1, 0, 2)
    kt = rng.standard_normal((heads, dim, seq)).astype("float32")
    bias = rng.standard_normal((1, 1, 1, seq)).astype("float32")
    bias[..., -2:] = NEG_INF
    layout = RowsLayout(q_rows.shape[1], q_off, v_rows.shape[1], v_off)
    kernel = attention_kernel(
        heads, seq, seq, dim, dim, heads, bias.shape, lanes=lanes, rows_layout=layout
    )
    out = _run(kernel, q_rows, kt, v_rows, bias, out_shape=(1, seq, heads * dim))
    expected = attention_reference(q, kt, v, bias, heads).transpose(1, 0, 2).reshape(1, seq, heads * dim)
    assert np.abs(out - expected).max() <= 1e-5


def test_rows_layout_refuses_batches_and_layouts_too_narrow_for_the_heads():
    with pytest.raises(ValueError, match="batch 1"):
        attention_kernel(8, 4, 4, 2, 2, 4, (1, 1, 1, 4), lanes=4, rows_layout=RowsLayout(8, 0, 8, 0))
    with pytest.raises(ValueError, match="does not hold"):
        attention_kernel(4, 4, 4, 2, 2, 4, (1, 1, 1, 4), lanes=4, rows_layout=RowsLayout(8, 1, 8, 0))


def test_fma_by_lane_takes_the_aarch64_tiles_and_one_workspace():
    """AArch64's tiles (4 rows, staged groups of 4 head dims and 8 keys, 4 vectors of head
    dims) keep every buffer but the block's scores off the heap too."""
    from mbcompile.passes.attention_kernel import BROADCAST_TILES, BY_LANE_TILES

    assert BY_LANE_TILES.rows * BY_LANE_TILES.dim_vectors <= 16 < 32  # accumulators, of 32
    assert BROADCAST_TILES.rows * BROADCAST_TILES.key_vectors <= 12  # of AVX2's 16
    kernel = attention_kernel(4, 128, 128, 32, 32, 4, (1, 1, 1, 128), lanes=4, fma_by_lane=True)
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), TARGET)
    source = lib.mod.imports[0].inspect_source("ll") if lib.mod.imports else lib.mod.inspect_source("ll")
    assert source.count("@__TVMBackendAllocWorkspace, align") == 1
