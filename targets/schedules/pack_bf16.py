"""bf16 matmuls by a constant weight: the weight rounded and packed at compile time, the
activation rounded at run time, fp32 accumulation.

    matmul(x[..., K], W[K, N])  →  xb = call_tir(to_bf16, x)     (its own kernel, or x's epilogue)
                                   call_tir(dense_bf16, xb, Wb[⌈N/nb⌉, K/2, nb, 2])

bf16 is stored as the upper 16 bits of the fp32 value (``uint16``), rounded to nearest even.
``Wb[jo, k2, ji, p] = bf16(W[2·k2 + p, jo·nb + ji])``: a ``K × nb`` panel as in the fp32 layout
(``pack_weights.py``), with each pair of k values side by side, the operand order of
``vdpbf16ps`` and ``bfdot`` (``dot_intrinsics.py``) and of AMX's B tiles (``tile_intrinsics.py``).
K is padded with zeros to even, or to 32 on a target with matrix tiles.

``to_bf16`` is opaque to FuseOps where ``x`` is read again (a residual add): fused into the
kernel that produces ``x``, it would give that kernel a second output, which the dense
schedule cannot tile. Where the matmul is ``x``'s only reader and reads it whole, it is
elementwise instead (``pack_weights._Packer._only_reader``) and fuses into that kernel's
epilogue: a FFN's first matmul then writes its activation in bf16 (half the bytes) and no
rounding kernel runs (5 fewer kernels per layer of the default encoder). It also reads a
column slice of a wider tensor in place (the ``k_offset`` of a merged linear), as the fp32
packing does.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

OP_PATTERN_OPAQUE = 8  # tvm/relax/analysis: OpPatternKind::kOpaque


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 → bf16 (as uint16), rounded to nearest even."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bf16 (as uint16) → the fp32 values they stand for."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pack_weight_bf16(weight: np.ndarray, block: int, k_multiple: int = 2) -> np.ndarray:
    """``[K, N]`` fp32 → ``[⌈N/block⌉, K'/2, block, 2]`` bf16 bits, zero-padded to K' (K rounded
    up to ``k_multiple``, even: 32 for matrix tiles)."""
    k, n = weight.shape
    k2, n_outer = -(-k // k_multiple) * k_multiple // 2, -(-n // block)
    padded = np.zeros((2 * k2, n_outer * block), dtype=np.uint16)
    padded[:k, :n] = bf16_bits(weight)
    return np.ascontiguousarray(padded.reshape(k2, 2, n_outer, block).transpose(2, 0, 3, 1))


def widen(bits):
    """A bf16 value (uint16 expression) as fp32."""
    return tirx.reinterpret(
        "float32", tirx.shift_left(bits.astype("uint32"), tirx.const(16, "uint32"))
    )


def round_bf16(value):
    """An fp32 expression rounded to bf16 bits (nearest even)."""
    u = tirx.reinterpret("uint32", value)
    one = tirx.const(1, "uint32")
    sixteen = tirx.const(16, "uint32")
    lsb = tirx.bitwise_and(tirx.shift_right(u, sixteen), one)
    rounded = tirx.shift_right(u + tirx.const(0x7FFF, "uint32") + lsb, sixteen)
    return rounded.astype("uint16")


def to_bf16(x: te.Tensor, k_extent: int, k_offset: int = 0, k_multiple: int = 2) -> te.Tensor:
    """``x[..., k_offset : k_offset + k_extent]`` rounded to bf16 bits, padded with zeros to a
    multiple of ``k_multiple`` (even: 2, or 32 for matrix tiles)."""
    width = -(-k_extent // k_multiple) * k_multiple

    def element(*idx):
        k = idx[-1]
        value = round_bf16(x[(*idx[:-1], k + k_offset)])
        if width == k_extent:
            return value
        return tirx.if_then_else(k < k_extent, value, tirx.const(0, "uint16"))

    return te.compute((*x.shape[:-1], width), element, name="to_bf16")


def dense_bf16(xb: te.Tensor, wb: te.Tensor, n: int) -> te.Tensor:
    """``xb[..., K] · W[K, N]`` in bf16 with fp32 sums; W packed as ``wb[⌈N/nb⌉, K/2, nb, 2]``."""
    n_outer, k2, block, _ = wb.shape
    *batch, _ = xb.shape
    k = te.reduce_axis((0, 2 * k2), name="k")
    padded = te.compute(
        (*batch, n_outer * block),
        lambda *idx: te.sum(
            widen(xb[(*idx[:-1], k)])
            * widen(wb[idx[-1] // block, k // 2, idx[-1] % block, k % 2]),
            axis=k,
        ),
        name="dense_bf16_pad",
    )
    return te.compute((*batch, n), lambda *idx: padded(*idx), name="crop")
