"""FuseAttention: scores, mask, guarded softmax and the value product become one kernel."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tester import SEQ, Tester, max_error, model_inputs, run, tiny_model
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mbcompile.passes import FoldNoNorm, resolve_passes
from mbcompile.passes.attention_kernel import attention_kernel
from mbcompile.passes.count import fused_attention_calls
from mbcompile.passes.fuse_attention import FuseAttention
from mbcompile.passes.graph import Graph, is_constant_expr
from mbcompile.report import matmul_calls

NEG_INF = float("-inf")


@I.ir_module
class Guarded:
    """Two heads of size 3 over 4 positions, exported as scaled_dot_product_attention is."""

    @R.function
    def main(
        q: R.Tensor((2, 4, 3), "float32"),
        kt: R.Tensor((2, 3, 4), "float32"),
        v: R.Tensor((2, 4, 3), "float32"),
        bias: R.Tensor((1, 1, 4, 4), "float32"),
    ) -> R.Tensor((2, 4, 3), "float32"):
        with R.dataflow():
            s = R.matmul(q, kt, out_dtype="float32")
            s1 = R.reshape(s, R.shape([1, 2, 4, 4]))
            s2 = R.add(s1, bias)
            p = R.nn.softmax(s2, axis=-1)
            e = R.equal(s2, R.const(NEG_INF, "float32"))
            n = R.logical_not(e)
            i = R.astype(n, dtype="int8")
            mx = R.max(i, axis=[-1], keepdims=True)
            b = R.astype(mx, dtype="bool")
            g = R.logical_not(b)
            z = R.full_like(p, R.const(0.0, "float32"), dtype=None)
            w = R.where(g, z, p)
            w1 = R.reshape(w, R.shape([2, 4, 4]))
            o = R.matmul(w1, v, out_dtype="float32")
            R.output(o)
        return o


def _expected() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((2, 4, 3), "float32"))
    kt = relax.Var("kt", relax.TensorType((2, 3, 4), "float32"))
    v = relax.Var("v", relax.TensorType((2, 4, 3), "float32"))
    bias = relax.Var("bias", relax.TensorType((1, 1, 4, 4), "float32"))
    kernel = attention_kernel(2, 4, 4, 3, 3, 2, (1, 1, 4, 4))
    gvar = bb.add_func(kernel, "fused_attention_2x4x4x3x3_h2_b1x1x4x4")
    with bb.function("main", [q, kt, v, bias]):
        with bb.dataflow():
            out = bb.emit_output(
                relax.call_tir(gvar, [q, kt, v, bias], relax.TensorType((2, 4, 3), "float32"))
            )
        bb.emit_func_output(out)
    return bb.get()


def _args(mask_row: bool = True) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    q, kt, v = (rng.standard_normal(s).astype("float32") for s in ((2, 4, 3), (2, 3, 4), (2, 4, 3)))
    bias = np.zeros((1, 1, 4, 4), "float32")
    bias[..., 3] = NEG_INF  # one masked key everywhere
    if mask_row:
        bias[0, 0, 2, :] = NEG_INF  # and one query row with every key masked
    return [q, kt, v, bias]


def test_guarded_attention_becomes_one_kernel_call():
    t = Tester(Guarded).run_passes([FuseAttention()]).check_fired("FuseAttention", 1)
    t.check_structurally_equal(_expected())
    assert matmul_calls(t.mod) == 1


def test_fused_kernel_equals_unfused_including_a_fully_masked_row():
    t = Tester(Guarded).run_passes([FuseAttention()]).check_fired("FuseAttention", 1)
    t.check_matches_unpassed(args=_args(mask_row=True))


def test_module_without_attention_is_unchanged():
    Tester(Guarded).run_passes([FoldNoNorm()]).check_unchanged()
    t = Tester.from_model(tiny_model("MobileBertModel"))
    before = t.mod
    t.run_passes([FoldNoNorm(), FuseAttention(), FuseAttention()])
    assert t.mod is not before


def test_probabilities_with_another_user_are_not_fused():
    @I.ir_module
    class ProbsReturned:
        @R.function
        def main(
            q: R.Tensor((2, 4, 3), "float32"),
            kt: R.Tensor((2, 3, 4), "float32"),
            v: R.Tensor((2, 4, 3), "float32"),
            bias: R.Tensor((1, 1, 4, 4), "float32"),
        ):
            with R.dataflow():
                s = R.matmul(q, kt, out_dtype="float32")
                s1 = R.reshape(s, R.shape([1, 2, 4, 4]))
                s2 = R.add(s1, bias)
                p = R.nn.softmax(s2, axis=-1)
                e = R.equal(s2, R.const(NEG_INF, "float32"))
                n = R.logical_not(e)
                i = R.astype(n, dtype="int8")
                mx = R.max(i, axis=[-1], keepdims=True)
                b = R.astype(mx, dtype="bool")
                g = R.logical_not(b)
                z = R.full_like(p, R.const(0.0, "float32"), dtype=None)
                w = R.where(g, z, p)
                w1 = R.reshape(w, R.shape([2, 4, 4]))
                o = R.matmul(w1, v, out_dtype="float32")
                out = (o, w)  # the probabilities are an output too (output_attentions)
                R.output(out)
            return out

    t = Tester(ProbsReturned).run_passes([FuseAttention()]).check_unchanged()
    assert any("another user" in r for r in t.refusals("FuseAttention"))


@pytest.mark.parametrize("heads, seq, dim, bias_shape", [(2, 7, 5, (2, 1, 1, 7)), (3, 16, 8, (1, 3, 16, 16))])
def test_kernel_matches_numpy_for_odd_shapes_and_broadcast_biases(heads, seq, dim, bias_shape):
    batch = max(bias_shape[0], 1)
    bh = batch * heads
    kernel = attention_kernel(bh, seq, seq, dim, dim, heads, bias_shape)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((bh, seq, dim)).astype("float32") * 3
    kt = rng.standard_normal((bh, dim, seq)).astype("float32") * 3
    v = rng.standard_normal((bh, seq, dim)).astype("float32")
    bias = rng.standard_normal(bias_shape).astype("float32")
    bias[..., -2:] = NEG_INF
    out = tvm.runtime.tensor(np.zeros((bh, seq, dim), "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in (q, kt, v, bias)), out)
    full = np.broadcast_to(bias, (batch, heads, seq, seq)).reshape(bh, seq, seq)
    scores = q.astype(np.float64) @ kt + full
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert np.abs(out.numpy() - probs @ v).max() <= 1e-5


def test_tiny_mobilebert_attention_is_fused_and_equals_eager():
    t = Tester.from_model(tiny_model("MobileBertModel", num_hidden_layers=2))
    t.run_passes([FuseAttention()]).check_fired("FuseAttention", 2).check_not(["relax.nn.softmax"])
    t.check_matches_eager()


def _attention_kernels(mod) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (call.args[0].name_hint, tuple(int(d) for d in call.ty.shape))
        for call in fused_attention_calls(mod)
    ]


def test_at_batch_1_the_kernel_reads_and_writes_token_rows_and_no_head_transpose_is_left(
    tiny_base,
):
    t = tiny_base.fresh().run_passes("default")
    kernels = _attention_kernels(t.mod)
    config = t.model.config
    seq = t.signature.seq_len
    # the output is the rows the attention output linear reads: (1, S, hidden), no head axis
    assert kernels and all("_rows_" in n and s == (1, seq, config.true_hidden_size) for n, s in kernels)
    # Q's and V's head splits and the output's head merge are gone: the only permute_dims left
    # on activations make Kᵀ, one per layer (the others permute constant weights).
    graph = Graph(t.mod["main"])
    runtime_permutes = [
        value for _, value in graph.bindings()
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.permute_dims"
        and not is_constant_expr(graph, value.args[0])
    ]  # fmt: skip
    assert len(runtime_permutes) == config.num_hidden_layers
    t.check_matches_eager()


def test_with_more_than_one_sequence_the_kernel_keeps_the_head_layout():
    model = tiny_model("MobileBertModel", num_hidden_layers=1)
    from mbcompile.capture import capture

    cap = capture(model, seq_len=SEQ, batch_size=2)
    t = Tester(cap.mod, model=model, signature=cap.signature).run_passes("default")
    kernels = _attention_kernels(t.mod)
    heads = model.config.num_attention_heads
    assert len(kernels) == 1 and "_rows_" not in kernels[0][0]
    assert kernels[0][1][0] == 2 * heads  # (batch · heads, S, D)
    pairs = [model_inputs(model.config, SEQ, pad=p, seed=p) for p in (0, 3)]
    ids, mask, types = (torch.cat([pair[i] for pair in pairs]) for i in range(3))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    lengths = np.full(ids.shape[:-1], ids.shape[-1], dtype=np.int64)
    got = run(t.mod, [ids.numpy(), mask.numpy(), types.numpy(), lengths])
    assert max_error(got[:1], [want.last_hidden_state.numpy()]) <= 1e-4


# Zen 3 has AVX2 (8 fp32 lanes); Skylake-SP AVX-512 (16). As JSON dicts: TVM 0.27 takes them.
ZEN3 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}
SKYLAKE_AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}


def _kernel_lanes(mod: tvm.IRModule) -> int:
    """The fp32 lanes the one fused attention kernel in ``mod`` was sized for: the length of its
    per-lane buffer of row partials (``part``)."""
    (call,) = fused_attention_calls(mod)
    script = mod[call.args[0]].script()
    return int(re.search(r"part = T\.alloc_buffer\(\((\d+),\)", script).group(1))


def test_the_kernel_is_sized_for_the_target_the_pass_is_built_with():
    zen3 = Tester(Guarded).run_passes([FuseAttention(target=ZEN3)]).check_fired("FuseAttention")
    avx512 = Tester(Guarded).run_passes([FuseAttention(target=tvm.target.Target(SKYLAKE_AVX512))])
    assert _kernel_lanes(zen3.mod) == 8
    assert _kernel_lanes(avx512.mod) == 16
    avx512.check_matches_unpassed(args=_args(mask_row=True))


def test_the_ambient_target_does_not_size_the_kernel():
    with tvm.target.Target(SKYLAKE_AVX512):
        t = Tester(Guarded).run_passes([FuseAttention()])
    assert _kernel_lanes(t.mod) == 8  # no target given: mbcompile.cpu's default


def test_resolve_passes_gives_the_target_to_the_passes_it_builds_only():
    mine = FuseAttention()
    built = resolve_passes(["FuseAttention", FuseAttention, mine], target=SKYLAKE_AVX512)
    assert [p.lanes for p in built] == [16, 16, 8]
    assert built[2] is mine
    (fuse,) = [p for p in resolve_passes("default", target=SKYLAKE_AVX512) if p.takes_target]
    assert isinstance(fuse, FuseAttention) and fuse.lanes == 16
