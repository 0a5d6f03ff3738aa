"""AArch64's attention kernel (``neon_attention``): which kernels it swaps, and its numbers on
the emulated device against float64 numpy, for whole and partial 16-key and 16-dim steps, the
linears' row layout, batches, every bias broadcast and fully masked rows."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import tvm
import tvm_ffi
from helpers import attention_reference

from mbcompile.devices.rpc import connect
from mbcompile.passes.attention_kernel import RowsLayout, attention_kernel
from mbcompile.targets.export import fcompile_for
from mbcompile.targets.registry import resolve_target
from mbcompile.targets.schedules.neon_attention import (
    NeonAttention,
    fits,
    neon_attention_kernel,
    softmax_row_ir,
)

SPEC = resolve_target("aarch64")
NEON = SPEC.tvm_target()
X86 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def _run(device, tmp_path, kernel, args, out_shape) -> np.ndarray:
    """``kernel(*args, out)`` on the emulated device, in a session of its own that is closed on
    return (the device's server serves one session at a time)."""
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                      target=NEON)
    # a name of its own: the device's dlopen would hand back an earlier library of the same path
    path = tmp_path / f"attention-{tvm_ffi.structural_hash(kernel) & 0xFFFFFFFF:08x}.so"
    lib.export_library(str(path), fcompile=fcompile_for(SPEC))
    session = connect(device.address, 30)
    session.upload(str(path))
    dev = session.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    session.load_module(path.name)["main"](*tensors, out)
    result = out.numpy()
    del tensors, out, dev, session
    gc.collect()
    return result


def _mask_last_keys(bias):
    bias[..., -3:] = -np.inf


def _mask_a_whole_row(bias):
    bias[..., 1, :] = -np.inf


@pytest.mark.parametrize(
    "bh, seq, dim, dim_v, heads, bias_shape, mask",
    [
        (4, 128, 32, 32, 4, (1, 1, 1, 128), _mask_last_keys),  # the default model's
        (8, 40, 24, 24, 4, (2, 1, 1, 40), None),  # batch 2, keys 16+16+8, dims 16+8
        (2, 12, 16, 40, 2, (1, 2, 12, 12), _mask_a_whole_row),  # no whole key step; a row per query
        (4, 32, 32, 32, 4, (1, 1, 32, 1), None),  # one bias value per query row: added in TIR
        (1, 4, 8, 8, 1, (1, 1, 1, 4), None),  # no whole step at all
        (4, 16, 16, 16, 4, (1, 1, 1, 16), None),  # scores' and context's steps the same
    ],
    ids=["default-128", "batch2-40", "row-bias-12", "key-broadcast-32", "tiny-4", "same-steps"],
)
def test_the_kernel_equals_numpy_on_the_emulated_device(device, tmp_path, bh, seq, dim, dim_v,
                                                         heads, bias_shape, mask):
    rng = np.random.default_rng(0)
    # scores of standard deviation √dim (at 4√dim, float32's rounding of the scores alone
    # exceeds 1e-5 in the output, in any kernel)
    q = rng.standard_normal((bh, seq, dim)).astype("float32")
    kt = rng.standard_normal((bh, dim, seq)).astype("float32")
    v = rng.standard_normal((bh, seq, dim_v)).astype("float32")
    bias = rng.standard_normal(bias_shape).astype("float32")
    if mask is not None:
        mask(bias)
    kernel = neon_attention_kernel(bh, seq, seq, dim, dim_v, heads, bias_shape)
    out = _run(device, tmp_path, kernel, [q, kt, v, bias], (bh, seq, dim_v))
    expected = attention_reference(q, kt, v, bias, heads)
    assert np.abs(out - expected).max() <= 1e-5
    if mask is _mask_a_whole_row:
        assert not out[:, 1].any()  # every key masked: zeros, as HF's guarded softmax


def test_the_rows_layout_reads_the_linears_output_in_place(device, tmp_path):
    """q and v as the merged linears' rows (q at columns 0.., v at 128..), out as rows."""
    seq, heads, dim = 48, 4, 32
    rng = np.random.default_rng(1)
    q_rows = rng.standard_normal((seq, 384)).astype("float32")
    v_rows = rng.standard_normal((seq, 256)).astype("float32")
    kt = rng.standard_normal((heads, dim, seq)).astype("float32")
    bias = np.zeros((1, 1, 1, seq), "float32")
    layout = RowsLayout(384, 0, 256, 128)
    kernel = neon_attention_kernel(heads, seq, seq, dim, dim, heads, (1, 1, 1, seq), layout)
    out = _run(device, tmp_path, kernel, [q_rows, kt, v_rows, bias], (1, seq, heads * dim))
    q = q_rows[:, : heads * dim].reshape(seq, heads, dim).transpose(1, 0, 2)
    v = v_rows[:, 128: 128 + heads * dim].reshape(seq, heads, dim).transpose(1, 0, 2)
    expected = attention_reference(q, kt, v, bias, heads).transpose(1, 0, 2).reshape(1, seq, -1)
    assert np.abs(out - expected).max() <= 1e-5


def test_only_aarch64_attention_with_query_rows_in_fours_is_swapped():
    assert fits(128) and fits(8) and not fits(7)
    with pytest.raises(ValueError, match="query rows in 4s"):
        neon_attention_kernel(1, 7, 7, 8, 8, 1, (1, 1, 1, 7))

    def module(seq):
        fused = attention_kernel(4, seq, seq, 32, 32, 4, (1, 1, 1, seq), lanes=4,
                                 fma_by_lane=True)
        return tvm.IRModule({"fused_attention": fused})

    swap = NeonAttention(NEON)
    swapped = swap(module(16))
    assert swap.last_count == 1 and "mbc_neon_softmax" in swapped["fused_attention"].script()
    assert NeonAttention(NEON)(module(7))["fused_attention"].same_as(
        module(7)["fused_attention"])
    x86 = NeonAttention(X86)
    assert x86(module(16))["fused_attention"].same_as(module(16)["fused_attention"])
    assert x86.last_count == 0


def test_the_softmax_constants_stay_in_registers_for_the_row():
    """The exponential's loop materialises no constant (no mov/movk/dup of a float's bits):
    in TIR each of its 8 constants cost 3 instructions per 4 scores."""
    import re

    kernel = neon_attention_kernel(4, 128, 128, 32, 32, 4, (1, 1, 1, 128))
    asm = tvm.tirx.build(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                         target=NEON).inspect_source("asm")
    loops = []  # the body of each loop: from its label to the branch back to it
    for label in re.finditer(r"^(\.LBB\d+_\d+):", asm, flags=re.M):
        back = re.search(rf"\tb\.\w+\t{re.escape(label.group(1))}\b", asm[label.end():])
        if back:
            loops.append(asm[label.end(): label.end() + back.start()])
    exponential = [body for body in loops if "frintn" in body and ".LBB" not in body]
    assert exponential, "no loop of the exponential found"
    for body in exponential:
        assert not re.search(r"\b(movk|dup)\b", body)
    assert "asm" in softmax_row_ir(32) and "roundeven" in softmax_row_ir(32)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [7, 12])
def test_a_model_whose_length_the_steps_do_not_fit_matches_eager_on_the_device(device, tmp_path,
                                                                                seq_len):
    """7 tokens: FuseAttention's kernel stays and the matmuls take one-row steps; 12: the NEON
    attention with no whole 16-key step, the matmuls 4-row steps. With a trained, non-zero
    [PAD] row and padding."""
    from helpers import (
        assert_matches_eager,
        make_model,
        random_inputs,
        tiny_config,
        trained_pad_row,
    )

    import mbcompile

    model = make_model("base", tiny_config())
    trained_pad_row(model)
    compiled = mbcompile.compile(model, seq_len=seq_len, target="aarch64")
    remote = mbcompile.load(compiled.save(tmp_path / "model.mbc"), remote=device.address)
    try:
        ids, mask, types = random_inputs(model.config, (2, seq_len), pad=2)
        assert_matches_eager(remote, model, ids, mask, types)
    finally:
        remote.program.close()
