"""The fused attention kernel FuseAttention calls: one TIR PrimFunc per shape, already scheduled.

For each (batch·head, query row): scores over keys (``q·kᵀ + bias``), their max; a row whose
scores are all -inf (every key masked) gives zeros, as HF's guarded softmax does; otherwise
``exp(s - max)`` (range reduction and a degree-7 polynomial, vectorised; relative error about
1e-7), normalised, times V. Rows run in parallel; the loops over keys and head dims are
vectorised.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

# Marks the PrimFunc for the report (a fused attention counts as one matmul).
KIND_ATTR = "mbcompile.kind"
KIND = "attention"


def attention_kernel(
    bh: int, seq_q: int, seq_k: int, dim: int, dim_v: int, heads: int, bias_shape: tuple[int, ...]
) -> tvm.tirx.PrimFunc:
    """``out[bh, i, :] = softmax_guarded(q[bh, i] · kt[bh] + bias[b, h, i]) · v[bh]``.

    q (bh, seq_q, dim); kt (bh, dim, seq_k); v (bh, seq_k, dim_v); bias 4-D, broadcastable to
    (bh / heads, heads, seq_q, seq_k); out (bh, seq_q, dim_v); ``bh = batch · heads``.
    """
    b0, h0, i0, j0 = bias_shape

    @T.prim_func(private=True)
    def fused_attention(
        q: T.Buffer((bh, seq_q, dim), "float32"),
        kt: T.Buffer((bh, dim, seq_k), "float32"),
        v: T.Buffer((bh, seq_k, dim_v), "float32"),
        bias: T.Buffer(bias_shape, "float32"),
        out: T.Buffer((bh, seq_q, dim_v), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KIND_ATTR: KIND})
        for r in T.parallel(bh * seq_q):
            s = T.alloc_buffer((seq_k,), "float32", scope="local")
            n = T.alloc_buffer((seq_k,), "float32", scope="local")
            acc = T.alloc_buffer((dim_v,), "float32", scope="local")
            top = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "float32", scope="local")
            for j in T.vectorized(seq_k):
                s[j] = bias[
                    (r // seq_q // heads) % b0, (r // seq_q % heads) % h0, (r % seq_q) % i0, j % j0
                ]
            for d in range(dim):
                for j in T.vectorized(seq_k):
                    s[j] = s[j] + q[r // seq_q, r % seq_q, d] * kt[r // seq_q, d, j]
            top[0] = T.float32("-inf")
            for j in range(seq_k):
                top[0] = T.max(top[0], s[j])
            if top[0] == T.float32("-inf"):
                for d in T.vectorized(dim_v):
                    out[r // seq_q, r % seq_q, d] = T.float32(0)
            else:
                # exp(x), x = s - max <= 0: x = n·ln2 + f, |f| <= ln2/2, e^f by Cephes' polynomial.
                for j in T.vectorized(seq_k):
                    s[j] = T.max(s[j] - top[0], T.float32(-87.0))
                for j in T.vectorized(seq_k):
                    n[j] = T.floor(s[j] * T.float32(1.4426950408889634) + T.float32(0.5))
                for j in T.vectorized(seq_k):
                    s[j] = s[j] - n[j] * T.float32(0.693359375) + n[j] * T.float32(2.12194440e-4)
                for j in T.vectorized(seq_k):
                    s[j] = (
                        (
                            (
                                (
                                    (
                                        (T.float32(1.9875691500e-4) * s[j] + T.float32(1.3981999507e-3))
                                        * s[j]
                                        + T.float32(8.3334519073e-3)
                                    )
                                    * s[j]
                                    + T.float32(4.1665795894e-2)
                                )
                                * s[j]
                                + T.float32(1.6666665459e-1)
                            )
                            * s[j]
                            + T.float32(5.0000001201e-1)
                        )
                        * s[j]
                        * s[j]
                        + s[j]
                        + T.float32(1.0)
                    ) * T.reinterpret("float32", T.shift_left(T.Cast("int32", n[j]) + 127, 23))
                total[0] = T.float32(0)
                for j in range(seq_k):
                    total[0] = total[0] + s[j]
                for d in T.vectorized(dim_v):
                    acc[d] = T.float32(0)
                for j in range(seq_k):
                    for d in T.vectorized(dim_v):
                        acc[d] = acc[d] + s[j] * v[r // seq_q, j, d]
                for d in T.vectorized(dim_v):
                    out[r // seq_q, r % seq_q, d] = acc[d] / total[0]

    return fused_attention
