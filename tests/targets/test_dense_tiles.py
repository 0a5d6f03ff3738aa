"""The matrix-tile (Intel AMX) matmul kernels (``tile_intrinsics``, ``DenseTiles``): which
matmuls they take, their numbers against numpy on the same rounded operands at every row count
the model runs (run where the host has AMX; compiled everywhere), the instructions they compile
to, and a whole model in bf16 and int8 on them."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import tvm
from helpers import make_model, random_inputs, tiny_config, trained_pad_row
from tvm import te

from mbcompile.cpu import cpu_info
from mbcompile.targets.registry import host_target, resolve_target
from mbcompile.targets.schedules import DenseDot, DenseTiles, default_rules
from mbcompile.targets.schedules.dense_tiles import block_rows
from mbcompile.targets.schedules.pack_bf16 import (
    bf16_bits,
    bf16_values,
    dense_bf16,
    pack_weight_bf16,
)
from mbcompile.targets.schedules.pack_int8 import dense_int8, pack_weight_int8, quantize_weight
from mbcompile.targets.schedules.tile_intrinsics import fits, k_multiple

HOST = host_target().tvm_target()
SAPPHIRE = resolve_target("x86-64-sapphirerapids").tvm_target()
ZEN4 = resolve_target("x86-64-zen4").tvm_target()
HOST_TILES = cpu_info(HOST).tile_kinds
NO_AMX = "this CPU (or its kernel) has no AMX tiles to run tile kernels on"


def _kernel(kind: str, m: int, k: int, n: int, target=SAPPHIRE, seed: int = 0, rule=DenseTiles):
    """(schedule or None, numpy inputs, expected output, its shape) of one ``x · W`` as the
    packing lays it out for a tile target: K padded to a tile row, ``nb`` 32 (16 for N ≤ 16)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    block = 16 if n <= 16 else 32
    multiple = k_multiple("bf16" if kind == "bf16" else "u8s8")
    width = -(-k // multiple) * multiple
    if kind == "bf16":
        xb = np.zeros((m, width), np.uint16)
        xb[:, :k] = bf16_bits(x)
        inputs = [xb, pack_weight_bf16(w, block, multiple)]
        tensors = [te.placeholder(a.shape, str(a.dtype)) for a in inputs]
        out = dense_bf16(*tensors, n=n)
        expected = bf16_values(bf16_bits(x)).astype(np.float64) @ bf16_values(bf16_bits(w))
    else:
        q, sw = quantize_weight(w)
        xq = rng.integers(0, 256, (m, width)).astype(np.uint8)
        xq[:, k:] = 128
        sx = rng.uniform(0.5, 2, m).astype(np.float32)
        inputs = [xq, sx, pack_weight_int8(q, block, multiple), sw, q.astype(np.int32).sum(axis=0)]
        tensors = [te.placeholder(a.shape, str(a.dtype)) for a in inputs]
        out = dense_int8(*tensors[:4], n=n, cw=tensors[4], zero=128)
        expected = ((xq[:, :k].astype(np.float64) - 128) * sx[:, None]) @ (q * sw.astype(np.float64))
    func = te.create_prim_func([*tensors, out])
    return rule().apply(func, target, False), inputs, expected, out.shape


def test_rows_per_step_are_blocks_of_32_or_a_divisor():
    assert [block_rows(m) for m in (8, 13, 32, 64, 96, 128, 384, 512)] == [
        8, 13, 32, 64, 32, 64, 64, 64]
    assert block_rows(100) == 25 and block_rows(112) == 28  # no block of 32 divides them
    assert block_rows(3) is None  # fewer than 8 rows: DenseDot's
    assert block_rows(37) is None  # a prime over 32: no block fits
    assert fits("bf16", 24, 32, 64) and fits("u8s8", 64, 16, 128)
    assert not fits("bf16", 96, 32, 64)  # over MOST_ROWS
    assert not fits("bf16", 24, 32, 48)  # K not a tile row of bf16 (32)
    assert not fits("u8s8", 24, 32, 32)  # nor of int8 (64)
    assert not fits("bf16", 48, 32, 64)  # over 32 rows: whole blocks of 32 only
    assert not fits("bf16", 24, 48, 64)


def test_only_targets_with_tiles_get_tile_kernels_and_tiles_come_first():
    assert cpu_info(SAPPHIRE).tile_kinds == ("bf16", "u8s8")
    assert cpu_info(ZEN4).tile_kinds == ()
    assert cpu_info(resolve_target("aarch64-armv9").tvm_target()).tile_kinds == ()
    assert _kernel("bf16", 32, 64, 64, target=ZEN4)[0] is None
    assert isinstance(default_rules(SAPPHIRE)[0], DenseTiles)


def test_a_matmul_tiles_cannot_take_is_left_to_the_dot_product_rule():
    sch, *_ = _kernel("bf16", 3, 64, 64)  # 3 rows
    assert sch is None
    assert _kernel("bf16", 3, 64, 64, rule=DenseDot)[0] is not None


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_the_kernel_compiles_to_tile_instructions(kind):
    sch, *_ = _kernel(kind, 64, 128, 64)
    assert sch is not None
    asm = tvm.tirx.build(sch.mod, target=SAPPHIRE).inspect_source("asm")
    product = "tdpbf16ps" if kind == "bf16" else "tdpbusd"
    for instruction in ("ldtilecfg", "tileloadd", product, "tilestored", "tilerelease"):
        assert instruction in asm, instruction
    assert "vdpbf16ps" not in asm and "vpdpbusd" not in asm


def test_the_threads_split_the_rows_not_the_weight_panels():
    """The parallel loop walks a row block's panels one after another, so each thread keeps
    the rows it wrote in the kernel before (``dense_tiles`` module doc)."""
    sch, *_ = _kernel("bf16", 128, 128, 512)  # 2 row blocks of 64, 16 panels of 32
    script = sch.mod.script()
    # the block's row index is the parallel index over the panels' count, its panel the rest
    row = re.search(r"v_i0_o = T.axis.spatial\(2, (\w+) // 16\)", script)
    assert row is not None, script
    assert f"v_i1_o = T.axis.spatial(16, {row.group(1)} % 16)" in script


SHAPES = [(8, 32, 32), (13, 64, 48), (24, 128, 16), (32, 64, 96), (100, 256, 64), (128, 128, 64),
          (384, 64, 32), (112, 96, 40)]


@pytest.mark.skipif(not HOST_TILES, reason=NO_AMX)
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_the_kernel_computes_the_rounded_product(kind, shape):
    sch, inputs, expected, out_shape = _kernel(kind, *shape, target=HOST)
    assert sch is not None
    lib = tvm.tirx.build(sch.mod, target=HOST)
    out = tvm.runtime.tensor(np.full([int(d) for d in out_shape], np.nan, np.float32))
    lib(*(tvm.runtime.tensor(a) for a in inputs), out)
    # int8 sums exactly, bf16 in fp32 in another order; every element written (no NaN left)
    assert np.abs(out.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


_FRESH_PROCESS = """
import sys
import numpy as np, tvm
lib = tvm.runtime.load_module(sys.argv[1])
inputs = [tvm.runtime.tensor(np.load(f"{sys.argv[2]}/{i}.npy")) for i in range(2)]
out = tvm.runtime.tensor(np.zeros((64, 64), np.float32))
lib["main"](*inputs, out)
print(float(np.abs(out.numpy() - np.load(f"{sys.argv[2]}/expected.npy")).max()))
"""


@pytest.mark.skipif(not HOST_TILES, reason=NO_AMX)
def test_a_kernel_asks_linux_for_the_tiles_itself(tmp_path):
    """A process that never asked for AMX state (a tuning worker, a C++ host; here one that
    only loads the library, without mbcompile) runs the kernel: without the kernel's own
    request its first tile instruction would kill the process."""
    sch, inputs, expected, _ = _kernel("bf16", 64, 64, 64, target=HOST)
    tvm.tirx.build(sch.mod, target=HOST).export_library(tmp_path / "kernel.so")
    for i, array in enumerate(inputs):
        np.save(tmp_path / f"{i}.npy", array)
    np.save(tmp_path / "expected.npy", expected)
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "kernel.so"),
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-5 * np.abs(expected).max()


@pytest.mark.skipif("bf16" not in HOST_TILES or "u8s8" not in HOST_TILES, reason=NO_AMX)
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_model_on_tiles_matches_pytorch(precision, monkeypatch):
    """Its matmuls on tiles and its attention too (``bf16_attention.py``), up to 128 tokens:
    matmuls of several row blocks, which share the prefetch of the weights."""
    import mbcompile
    from mbcompile.targets.schedules import bf16_attention

    counts, attention = [], []
    original, original_attention = DenseTiles.apply, bf16_attention.bf16_attention_kernel

    def counting(self, func, target, tunable):
        sch = original(self, func, target, tunable)
        counts.append(sch is not None)
        return sch

    def counting_attention(*args, **kwargs):
        attention.append(args)
        return original_attention(*args, **kwargs)

    monkeypatch.setattr(DenseTiles, "apply", counting)
    monkeypatch.setattr(bf16_attention, "bf16_attention_kernel", counting_attention)
    config = tiny_config(max_position_embeddings=128)
    model = trained_pad_row(make_model("base", config))
    compiled = mbcompile.compile(model, precision=precision, max_seq_len=128)
    assert sum(counts) > 0
    # one attention kernel per compiled length, which every layer calls
    assert len(attention) == len(compiled.signature.lengths)
    for shape in ((3, 40), (1, 128)):
        ids, mask, types = random_inputs(config, shape, pad=5)
        got = compiled(input_ids=ids.numpy(), attention_mask=mask.numpy(),
                       token_type_ids=types.numpy())
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        want = want.detach().numpy()
        real = mask.numpy().astype(bool)
        error = np.abs(got["last_hidden_state"] - want)[real].max() / np.abs(want).max()
        assert error < {"bf16": 3e-3, "int8": 2e-2}[precision], shape
