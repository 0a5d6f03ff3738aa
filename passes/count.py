"""Counting what the passes change, for reports and tests: matmuls and fused attention kernels."""

from __future__ import annotations

import tvm
from tvm import relax

from mbcompile.passes.attention_kernel import KIND, KIND_ATTR
from mbcompile.passes.graph import is_call

MATMUL_OPS = ("relax.matmul", "relax.nn.attention", "relax.nn.attention_bias")


def fused_attention_calls(mod: tvm.IRModule, func_name: str = "main") -> list[relax.Call]:
    """The ``call_tir`` calls of fused attention kernels (made by FuseAttention) in ``func_name``."""
    found: list[relax.Call] = []

    def visit(expr: relax.Expr) -> None:
        if is_call(expr, "relax.call_tir"):
            attrs = mod[expr.args[0]].attrs
            if attrs is not None and attrs.get(KIND_ATTR) == KIND:
                found.append(expr)

    relax.analysis.post_order_visit(mod[func_name], visit)
    return found


def count_matmuls(mod: tvm.IRModule, func_name: str = "main") -> int:
    """``R.matmul`` calls in ``func_name``; a fused attention (``R.nn.attention`` or a kernel
    FuseAttention made) counts as one."""
    count = 0

    def visit(expr: relax.Expr) -> None:
        nonlocal count
        count += int(is_call(expr, *MATMUL_OPS))

    relax.analysis.post_order_visit(mod[func_name], visit)
    return count + len(fused_attention_calls(mod, func_name))
