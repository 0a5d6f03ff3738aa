"""int8 matmuls by a constant weight: weights quantized per output channel at compile time,
activations per row at run time, int32 sums, dequantized in the matmul's epilogue.

    matmul(x[..., K], W[K, N])  →  xq = call_tir(quantize_rows, x)               (kernels of
                                   sx = call_tir(row_scales, x)                   their own)
                                   call_tir(dense_int8, xq, sx, Wq[⌈N/nb⌉, K/4, nb, 4], sw, cw)

- Weights, symmetric per output channel: ``sw[n] = max_k |W[k, n]| / 127``,
  ``Wq = round(W / sw)`` in [-127, 127] (but see ``vpmaddubsw`` below); packed as the fp32 panels (``pack_weights.py``) with
  each 4 consecutive k side by side, the operand order of ``vpdpbusd`` (``dot_intrinsics.py``).
- Activations, symmetric per row (token): ``sx[m] = max_k |x[m, k]| / 127``,
  ``q = round(x / sx)`` in [-127, 127], stored as ``q + z``: ``z`` = 128 (uint8) for
  ``vpdpbusd`` and AVX2's ``vpmaddubsw``, which multiply unsigned by signed bytes; ``z`` = 0
  (int8) on AArch64 (``sdot``, or NEON's ``smull``), signed by signed (``zero_point``).
- ``vpmaddubsw`` sums two byte products into a saturating int16: its weights take 7 bits
  ([-63, 63], ``weight_qmax``), so that 2·255·63 fits.
- ``Σ_k (q + z)·Wq = Σ_k q·Wq + z·cw[n]`` with ``cw[n] = Σ_k Wq[k, n]`` (a constant), so
  ``y[m, n] = sx[m] · sw[n] · (acc[m, n] − z·cw[n])``: exact integer sums, one rounding per
  operand. K is padded to a multiple of 4 (64 on matrix tiles) with zeros (a zero weight cancels the padded ``z``).

``quantize_rows`` and ``row_scales`` are opaque to FuseOps for the reason
``pack_bf16.to_bf16`` is.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

QMAX = 127
TINY = 1e-30  # a row of zeros gets this scale, not a division by zero


def quantize_weight(weight: np.ndarray, qmax: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` fp32 → (``Wq`` int8 ``[K, N]`` in [-qmax, qmax], per-column scales ``[N]``)."""
    w = weight.astype(np.float64)
    scale = np.maximum(np.abs(w).max(axis=0), TINY) / qmax
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def pack_weight_int8(q: np.ndarray, block: int, k_multiple: int = 4) -> np.ndarray:
    """``[K, N]`` int8 → ``[⌈N/block⌉, K'/4, block, 4]``, zero-padded to K' (K rounded up to
    ``k_multiple``, a multiple of 4: 64 for matrix tiles)."""
    k, n = q.shape
    k4, n_outer = -(-k // k_multiple) * k_multiple // 4, -(-n // block)
    padded = np.zeros((4 * k4, n_outer * block), dtype=np.int8)
    padded[:k, :n] = q
    return np.ascontiguousarray(padded.reshape(k4, 4, n_outer, block).transpose(2, 0, 3, 1))


def _row_absmax(x: te.Tensor, k_extent: int, k_offset: int) -> te.Tensor:
    *rows, _ = x.shape
    k = te.reduce_axis((0, k_extent), name="k")
    return te.compute(
        tuple(rows), lambda *r: te.max(tirx.abs(x[(*r, k + k_offset)]), axis=k), name="row_absmax"
    )


def _scale(amax: te.Tensor):
    """The row's scale as an expression builder: ``max(amax, TINY) / 127``."""
    return lambda *r: tirx.max(amax[r], tirx.const(TINY, "float32")) / tirx.const(QMAX, "float32")


def zero_point(instruction: str) -> int:
    """``z`` of the module doc for the dot product ``instruction`` (``CPUInfo.int8_dot``)."""
    return 128 if instruction in ("vpdpbusd", "vpmaddubsw") else 0


def weight_qmax(instruction: str) -> int:
    """The weights' largest step: 127, or 63 for ``vpmaddubsw``, whose int16 sum of two
    byte products saturates past 32767 (2·255·63 fits, 2·255·127 does not)."""
    return 63 if instruction == "vpmaddubsw" else QMAX


def row_scales(x: te.Tensor, k_extent: int, k_offset: int = 0) -> te.Tensor:
    """``sx``: the per-row scales of ``x[..., k_offset : k_offset + k_extent]``."""
    amax = _row_absmax(x, k_extent, k_offset)
    return te.compute(amax.shape, _scale(amax), name="row_scale")


def quantize_rows(x: te.Tensor, k_extent: int, k_offset: int = 0, zero: int = 128,
                  k_multiple: int = 4) -> te.Tensor:
    """``xq``: the rows of ``x[..., k_offset : k_offset + k_extent]`` quantized as the module doc
    says (uint8 with ``zero`` 128, int8 with 0), padded with ``zero`` to a multiple of
    ``k_multiple`` columns (4, or 64 for matrix tiles). (The scales are a kernel of their own,
    ``row_scales``: a kernel's second output cannot be computed per row.)"""
    width = -(-k_extent // k_multiple) * k_multiple
    dtype = "uint8" if zero else "int8"
    amax = _row_absmax(x, k_extent, k_offset)
    scale = _scale(amax)

    def element(*idx):
        r, col = idx[:-1], idx[-1]
        # the row-invariant reciprocal is hoisted out of the row by LLVM
        q = tirx.round(x[(*r, col + k_offset)] * (tirx.const(1, "float32") / scale(*r)))
        q = tirx.min(tirx.max(q, tirx.const(-QMAX, "float32")), tirx.const(QMAX, "float32"))
        value = (q.astype("int32") + tirx.const(zero, "int32")).astype(dtype)
        if width == k_extent:
            return value
        return tirx.if_then_else(col < k_extent, value, tirx.const(zero, dtype))

    return te.compute((*x.shape[:-1], width), element, name="quantize")


def dense_int8(
    xq: te.Tensor,
    sx: te.Tensor,
    wq: te.Tensor,
    sw: te.Tensor,
    n: int,
    cw: te.Tensor | None = None,
    zero: int = 0,
) -> te.Tensor:
    """``x · W`` from the quantized operands (module doc); ``wq[⌈N/nb⌉, K/4, nb, 4]``; ``cw``
    (the weight's column sums) with a non-zero ``zero`` point only."""
    n_outer, k4, block, _ = wq.shape
    *rows, _ = xq.shape
    k = te.reduce_axis((0, 4 * k4), name="k")
    acc = te.compute(
        (*rows, n_outer * block),
        lambda *idx: te.sum(
            xq[(*idx[:-1], k)].astype("int32")
            * wq[idx[-1] // block, k // 4, idx[-1] % block, k % 4].astype("int32"),
            axis=k,
        ),
        name="dense_int8_pad",
    )
    def dequantize(*idx):
        r, col = idx[:-1], idx[-1]
        exact = acc(*idx) if not zero else acc(*idx) - tirx.const(zero, "int32") * cw[col]
        return exact.astype("float32") * (sx[r] * sw[col])

    return te.compute((*rows, n), dequantize, name="dequantize")
