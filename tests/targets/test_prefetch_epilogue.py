"""The panel kernels' epilogue prefetches (``schedules/prefetch_epilogue.py``): which lines they
ask for, and that the kernel's numbers are bit for bit those without them."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from mbcompile.cpu import cpu_info
from mbcompile.targets.registry import host_target
from mbcompile.targets.schedules import DenseDot, dense_dot
from mbcompile.targets.schedules.pack_bf16 import bf16_bits, dense_bf16, pack_weight_bf16, to_bf16
from mbcompile.targets.schedules.pack_weights import packed_block_width

HOST = host_target().tvm_target()
ZEN4 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


def _output_bottleneck(target, m: int = 32, k: int = 128, n: int = 96, bf16_out: bool = False):
    """(kernel, inputs) of ``(x · W + bias + residual) · γ`` (a layer's output bottleneck and its
    NoNorm), or of ``bf16(relu(x · W + bias))`` with ``bf16_out``."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    bias, gamma = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
    residual = rng.standard_normal((m, n), np.float32)
    xb, wp = bf16_bits(x), pack_weight_bf16(w, packed_block_width(target, "float32", n, "bf16"))
    tx, tw = te.placeholder(xb.shape, "uint16", "x"), te.placeholder(wp.shape, "uint16", "w")
    tb, tg = te.placeholder((n,), "float32", "bias"), te.placeholder((n,), "float32", "gamma")
    tr = te.placeholder((m, n), "float32", "residual")
    dense = dense_bf16(tx, tw, n=n)
    if bf16_out:
        out = to_bf16(te.compute((m, n), lambda i, j: te.max(dense[i, j] + tb[j], 0.0)), n)
        return te.create_prim_func([tx, tw, tb, out]), [xb, wp, bias]
    out = te.compute((m, n), lambda i, j: (dense[i, j] + tb[j] + tr[i, j]) * tg[j], name="out")
    return te.create_prim_func([tx, tw, tb, tr, tg, out]), [xb, wp, bias, residual, gamma]


def _prefetches(sch) -> list[str]:
    return [line.strip() for line in sch.mod.script().splitlines() if "T.prefetch(" in line]


def test_each_panel_asks_for_its_residual_and_output_lines_first():
    """8 rows × 2 lines of 16 floats per 32-column panel, of the residual (read, 0) and of the
    output (write, 1): 32 prefetches, ahead of the panel's zeros and steps. Not of the bias or γ
    (vectors, in L1), nor of the accumulators."""
    sch = DenseDot().apply(_output_bottleneck(ZEN4)[0], ZEN4, False)
    lines = _prefetches(sch)
    assert len(lines) == 32, lines
    assert sum("T.address_of(residual[" in line and line.endswith(", 0, 3, 1)") for line in lines) == 16
    assert sum("T.address_of(out[" in line and line.endswith(", 1, 3, 1)") for line in lines) == 16
    script = sch.mod.script()
    assert script.index("T.prefetch(") < script.index("T.float32(0.0)") < script.index("mbc_vdpbf16ps")
    rows = {line.split("[")[1].split(",")[0] for line in lines}
    assert len(rows) == 8, rows  # the block's 8 rows
    assert any("+ 16]" in line for line in lines)  # the second line of each row


def test_an_int8_panel_kernel_asks_for_its_output_lines_too():
    """int8 on ``vpdpbusd`` panels: its dequantized fp32 output, 8 rows × 2 lines a panel."""
    from mbcompile.targets.schedules.pack_int8 import (
        dense_int8,
        pack_weight_int8,
        quantize_weight,
        weight_qmax,
        zero_point,
    )

    m, k, n = 32, 128, 96
    w = np.random.default_rng(0).standard_normal((k, n), np.float32)
    q, sw = quantize_weight(w, weight_qmax("vpdpbusd"))
    wp = pack_weight_int8(q, packed_block_width(ZEN4, "float32", n, "int8"))
    tx, ts = te.placeholder((m, k), "uint8", "x"), te.placeholder((m,), "float32", "sx")
    tw, tsw = te.placeholder(wp.shape, "int8", "w"), te.placeholder(sw.shape, "float32", "sw")
    tc = te.placeholder((n,), "int32", "cw")
    out = dense_int8(tx, ts, tw, tsw, n=n, cw=tc, zero=zero_point("vpdpbusd"))
    sch = DenseDot().apply(te.create_prim_func([tx, ts, tw, tsw, tc, out]), ZEN4, False)
    assert "mbc_vpdpbusd" in sch.mod.script()
    lines = _prefetches(sch)
    assert len(lines) == 16 and all(line.endswith(", 1, 3, 1)") for line in lines), lines


def test_a_bf16_output_with_no_full_size_operand_gets_none():
    sch = DenseDot().apply(_output_bottleneck(ZEN4, bf16_out=True)[0], ZEN4, False)
    assert "mbc_vdpbf16ps" in sch.mod.script()
    assert _prefetches(sch) == []


def test_the_outputs_are_bit_for_bit_those_without_prefetches(monkeypatch):
    info = cpu_info(HOST)
    if info.bf16_dot != "vdpbf16ps" or info.dot_lanes() != 16:
        pytest.skip("this CPU has no 512-bit vdpbf16ps to run the panel steps on")
    func, inputs = _output_bottleneck(HOST, m=48, k=256, n=72)  # a padded last panel too

    def run(sch):
        lib = tvm.tirx.build(sch.mod, target=HOST)
        out = tvm.runtime.tensor(np.zeros((48, 72), np.float32))
        lib(*(tvm.runtime.tensor(a) for a in inputs), out)
        return out.numpy()

    with_them = DenseDot().apply(func, HOST, False)
    assert len(_prefetches(with_them)) == 8 * 2 * 2
    monkeypatch.setattr(dense_dot, "prefetch_epilogue", lambda *_: 0)
    without = DenseDot().apply(func, HOST, False)
    assert _prefetches(without) == []
    np.testing.assert_array_equal(run(with_them), run(without))
