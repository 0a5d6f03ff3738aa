"""Counting what the passes change, for reports and tests: matmuls and fused attention kernels."""

from __future__ import annotations

import tvm
from tvm import relax

from mbcompile.passes.attention_kernel import KIND, KIND_ATTR
from mbcompile.passes.graph import is_call

MATMUL_OPS = ("relax.matmul", "relax.nn.attention", "relax.nn.attention_bias")


def attention_calls_among(mod: tvm.IRModule, calls) -> list[relax.Call]:
    """The ``call_tir`` calls of fused attention kernels (made by FuseAttention) among ``calls``."""
    found: list[relax.Call] = []
    for call in calls:
        if is_call(call, "relax.call_tir"):
            attrs = mod[call.args[0]].attrs
            if attrs is not None and attrs.get(KIND_ATTR) == KIND:
                found.append(call)
    return found


def fused_attention_calls(mod: tvm.IRModule, func_name: str = "main") -> list[relax.Call]:
    """The ``call_tir`` calls of fused attention kernels (made by FuseAttention) in ``func_name``."""
    return attention_calls_among(mod, _expressions(mod[func_name]))


def matmuls_among(mod: tvm.IRModule, calls) -> int:
    """How many of ``calls`` are matmuls; a fused attention (``R.nn.attention`` or a kernel
    FuseAttention made) counts as one."""
    return sum(1 for call in calls if is_call(call, *MATMUL_OPS)) + len(
        attention_calls_among(mod, calls))


def count_matmuls(mod: tvm.IRModule, func_name: str = "main") -> int:
    """``R.matmul`` calls in ``func_name``; a fused attention (``R.nn.attention`` or a kernel
    FuseAttention made) counts as one."""
    return matmuls_among(mod, _expressions(mod[func_name]))


def _expressions(func: relax.Function) -> list[relax.Expr]:
    found: list[relax.Expr] = []
    relax.analysis.post_order_visit(func, found.append)
    return found
