"""Counts for the compile report: matmul and kernel calls per forward, weight bytes."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def _calls(func) -> list:
    calls = []
    relax.analysis.post_order_visit(
        func, lambda e: calls.append(e) if isinstance(e, relax.Call) else None
    )
    return calls


def matmul_calls(mod) -> int:
    """``R.matmul`` calls in ``main`` (a fused attention counts as one)."""
    from mbcompile.passes import count_matmuls

    return count_matmuls(mod)


def matmul_flops(mod) -> int:
    """Multiply-add FLOPs (2·M·N·K per output) of the ``R.matmul`` calls in ``main``."""
    total = 0
    for call in _calls(mod["main"]):
        if getattr(call.op, "name", None) != "relax.matmul":
            continue
        a_shape = [int(d) for d in call.args[0].ty.shape]
        out_shape = [int(d) for d in call.ty.shape]
        total += 2 * int(np.prod(out_shape)) * a_shape[-1]
    from mbcompile.passes.base import fused_attention_calls

    for call in fused_attention_calls(mod):  # q·kᵀ and p·v
        # kt is (batch·heads, dim, seq_k) in both layouts; the output (batch·heads, seq_q, dim_v)
        # or, in the rows layout, (1, seq_q, heads·dim_v).
        bh, dim, seq_k = (int(d) for d in call.args[1].fields[1].ty.shape)
        out = [int(d) for d in call.ty.shape]
        total += 2 * seq_k * (bh * out[-2] * dim + int(np.prod(out)))
    return total


def kernel_calls(mod) -> int:
    """Kernel (``call_tir``) calls in ``main`` of a legalized, fused module."""
    return sum(1 for c in _calls(mod["main"]) if getattr(c.op, "name", None) == "relax.call_tir")


def weight_bytes(mod) -> int:
    """Bytes of the distinct constants ``main`` uses (the weights)."""
    seen: dict = {}

    def visit(expr):
        value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.Constant) else None
        if isinstance(value, tvm.runtime.Tensor):
            seen[expr] = int(np.prod(value.shape)) * np.dtype(str(value.dtype)).itemsize

    relax.analysis.post_order_visit(mod["main"], visit)
    return sum(seen.values())


def module_stats(mod) -> dict[str, int]:
    return {
        "matmul_calls": matmul_calls(mod),
        "matmul_flops": matmul_flops(mod),
        "weight_bytes": weight_bytes(mod),
    }
