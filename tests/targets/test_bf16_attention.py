"""The fused attention in bf16 (``bf16_attention.py``), on AMX tiles and on ``vdpbf16ps`` vectors:
which builds take which, the instructions each compiles to, their numbers against numpy on the
same rounded operands (short, odd and padded shapes, masks, fully masked rows, batches, the
linears' row layout; run where the host has the instructions). Whole models with it:
``test_dense_tiles.py`` (AMX), ``tests/test_precision.py``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from mbcompile.cpu import cpu_info
from mbcompile.passes.attention_kernel import RowsLayout
from mbcompile.targets.registry import host_target, resolve_target
from mbcompile.targets.schedules.bf16_attention import (
    bf16_attention_kernel,
    bf16_attention_steps,
)
from mbcompile.targets.schedules.pack_bf16 import bf16_bits, bf16_values

HOST = host_target().tvm_target()
SAPPHIRE = resolve_target("x86-64-sapphirerapids").tvm_target()
ZEN4 = resolve_target("x86-64-zen4").tvm_target()
ZEN3 = resolve_target("x86-64-zen3").tvm_target()
NO_AMX = "this CPU (or its kernel) has no AMX bf16 tiles to run the kernel on"
NO_BF16 = "this CPU has no AVX512_BF16 (vdpbf16ps) to run the kernel on"
HOST_TILES = "bf16" in cpu_info(HOST).tile_kinds
HOST_BF16 = cpu_info(HOST).bf16_dot == "vdpbf16ps"
STEPS = [
    pytest.param("tiles", marks=pytest.mark.skipif(not HOST_TILES, reason=NO_AMX)),
    pytest.param("vectors", marks=pytest.mark.skipif(not HOST_BF16, reason=NO_BF16)),
]


def _rounded(x: np.ndarray) -> np.ndarray:
    return bf16_values(bf16_bits(x)).astype(np.float64)


def _expected(q, kt, v, bias, heads):
    """The kernel's arithmetic in float64 on bf16-rounded q, k, v and probabilities; rows with
    every key masked give zeros."""
    bh = q.shape[0]
    b0, h0 = bias.shape[:2]
    out = np.zeros((bh, q.shape[1], v.shape[2]))
    for b in range(bh):
        s = _rounded(q[b]) @ _rounded(kt[b]) + bias[b // heads % b0, b % heads % h0]
        top = s.max(axis=-1, keepdims=True)
        live = np.isfinite(top)[:, 0]
        e = _rounded(np.exp(s[live] - top[live]).astype(np.float32))
        out[b, live] = (e @ _rounded(v[b])) / e.sum(axis=-1, keepdims=True)
    return out


CASES = {
    # name: (batch, heads, seq_q, seq_k, dim, dim_v, bias shape)
    "128 tokens, padded keys masked": (1, 4, 128, 128, 32, 32, (1, 1, 1, 128)),
    "12 tokens": (1, 4, 12, 12, 32, 32, (1, 1, 1, 12)),
    "batch 2 with its own masks": (2, 4, 40, 40, 32, 32, (2, 1, 1, 40)),
    "a full mask with a fully masked row": (1, 2, 33, 33, 32, 32, (1, 1, 33, 33)),
    "odd head dims and lengths": (1, 2, 20, 70, 24, 48, (1, 2, 20, 70)),
    "384 tokens": (1, 4, 384, 384, 32, 32, (1, 1, 1, 384)),
}


def _inputs(case, seed=0):
    batch, heads, seq_q, seq_k, dim, dim_v, bias_shape = case
    rng = np.random.default_rng(seed)
    bh = batch * heads
    q = (rng.standard_normal((bh, seq_q, dim)) / np.sqrt(dim)).astype(np.float32)
    kt = rng.standard_normal((bh, dim, seq_k)).astype(np.float32)
    v = rng.standard_normal((bh, seq_k, dim_v)).astype(np.float32)
    bias = (rng.standard_normal(bias_shape) * 0.5).astype(np.float32)
    bias[..., -3:] = -np.inf  # padded keys
    if bias_shape[2] > 1:
        bias[..., 5, :] = -np.inf  # a query row that sees no key
    return q, kt, v, bias


def test_reduced_precision_builds_take_tiles_on_amx_vectors_on_avx512_bf16_and_fp32_none():
    for precision in ("bf16", "int8"):
        assert bf16_attention_steps(SAPPHIRE, precision) == "tiles"
        assert bf16_attention_steps(ZEN4, precision) == "vectors"
        assert bf16_attention_steps(ZEN3, precision) is None  # AVX2: no bf16 dot product
    assert bf16_attention_steps(SAPPHIRE, "fp32") is None
    assert bf16_attention_steps(ZEN4, "fp32") is None
    with pytest.raises(ValueError, match="steps must be one of"):
        bf16_attention_kernel(4, 64, 64, 32, 32, 4, (1, 1, 1, 64), steps="amx")


def _asm(steps, target):
    func = bf16_attention_kernel(4, 64, 64, 32, 32, 4, (1, 1, 1, 64), steps=steps)
    return tvm.tirx.build(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
    ).inspect_source("asm")


def test_the_tile_kernel_compiles_to_tile_bf16_conversion_and_scale_instructions():
    asm = _asm("tiles", SAPPHIRE)
    # the probabilities: scaled by 2^n, rounded two vectors at a time, summed by a bf16 dot
    for instruction in ("ldtilecfg", "tdpbf16ps", "tilestored", "tilerelease", "vscalefps",
                        "vcvtne2ps2bf16", "vdpbf16ps"):
        assert instruction in asm, instruction


def test_the_vector_kernel_runs_its_products_on_512_bit_bf16_dot_products_without_tiles():
    asm = _asm("vectors", ZEN4)
    assert "tdpbf16ps" not in asm and "ldtilecfg" not in asm
    # both products: vdpbf16ps on zmm registers, each row's pair broadcast from memory
    assert re.search(r"vdpbf16ps\s+\(%\w+\)\{1to16\}|vpbroadcastd\s+[^,]+,\s*%zmm", asm)
    assert len(re.findall(r"vdpbf16ps\s+[^\n]*%zmm", asm)) >= 32  # 8 rows × 2 vectors, twice
    for instruction in ("vscalefps", "vcvtne2ps2bf16"):
        assert instruction in asm, instruction


def _run(func, arrays, out_shape):
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=HOST)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_kernel_computes_the_rounded_attention(case, steps):
    batch, heads, seq_q, seq_k, dim, dim_v, bias_shape = case
    q, kt, v, bias = _inputs(case)
    func = bf16_attention_kernel(batch * heads, seq_q, seq_k, dim, dim_v, heads, bias_shape,
                                 steps=steps)
    got = _run(func, [q, kt, v, bias], (batch * heads, seq_q, dim_v))
    want = _expected(q, kt, v, bias, heads)
    # every element written; a probability may round the other way (its exp is a polynomial
    # within 1e-4), which moves an output by a fraction of a bf16 step of v
    assert not np.isnan(got).any()
    assert np.abs(got - want).max() <= 2e-3 * np.abs(v).max()
    if bias_shape[2] > 1:
        assert (got[:, 5] == 0).all()  # the row that sees no key


@pytest.mark.parametrize("steps", STEPS)
def test_the_kernel_reads_and_writes_the_linears_row_layout(steps):
    heads, seq, dim = 4, 48, 32
    q, kt, v, bias = _inputs((1, heads, seq, seq, dim, dim, (1, 1, 1, seq)))
    layout = RowsLayout(q_width=3 * heads * dim, q_offset=heads * dim, v_width=2 * heads * dim,
                        v_offset=0)
    rng = np.random.default_rng(1)
    q_rows = rng.standard_normal((seq, layout.q_width)).astype(np.float32)
    v_rows = rng.standard_normal((seq, layout.v_width)).astype(np.float32)
    q_rows[:, layout.q_offset : layout.q_offset + heads * dim] = q.transpose(1, 0, 2).reshape(seq, -1)
    v_rows[:, : heads * dim] = v.transpose(1, 0, 2).reshape(seq, -1)
    func = bf16_attention_kernel(heads, seq, seq, dim, dim, heads, (1, 1, 1, seq),
                                 rows_layout=layout, steps=steps)
    got = _run(func, [q_rows, kt, v_rows, bias], (1, seq, heads * dim))
    want = _expected(q, kt, v, bias, heads).transpose(1, 0, 2).reshape(1, seq, -1)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(v).max()
