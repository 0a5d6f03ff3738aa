"""The compile report: matmul and kernel calls per forward, FLOPs and weight bytes after each
pass, and the table ``compile --explain`` prints."""

from __future__ import annotations

import numpy as np

# tvm is imported inside the functions: ``import mbcompile`` stays light (TVM imports torch
# when it is installed, several seconds), and the runtime never needs this module.


def _calls(func) -> list:
    from tvm import relax

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
    from mbcompile.passes import fused_attention_calls

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
    import tvm
    from tvm import relax

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


def format_report(report: dict) -> str:
    """The per-pass table of a compile report (``compile --explain``)."""
    rows = [("stage", "fired", "matmuls", "weight MB")]
    imported = report.get("imported", {})
    rows.append(("imported", "", str(imported.get("matmul_calls", "")), _mb(imported)))
    for row in report.get("passes", []):
        rows.append((row["pass"], str(row["fired"]), str(row["matmul_calls"]), _mb(row)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    final = report.get("final", {})
    lines.append(
        f"final module: {final.get('kernel_calls')} kernel calls, "
        f"{final.get('matmul_calls')} matmul calls per forward, {_mb(final)} MB of weights"
    )
    return "\n".join(lines)


def _mb(stats: dict) -> str:
    return f"{stats['weight_bytes'] / 1e6:.1f}" if "weight_bytes" in stats else ""
