"""Counts for the compile report: matmul and kernel calls per forward, weight bytes."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_MATMUL_OPS = ("relax.matmul", "relax.nn.attention", "relax.nn.attention_bias")


def _calls(func) -> list:
    calls = []
    relax.analysis.post_order_visit(
        func, lambda e: calls.append(e) if isinstance(e, relax.Call) else None
    )
    return calls


def matmul_calls(mod) -> int:
    """``R.matmul`` calls in ``main`` (a fused attention counts as one)."""
    names = [getattr(c.op, "name", None) for c in _calls(mod["main"])]
    return sum(1 for n in names if n in _MATMUL_OPS)


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
    return {"matmul_calls": matmul_calls(mod), "weight_bytes": weight_bytes(mod)}
