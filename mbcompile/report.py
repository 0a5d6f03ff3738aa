"""The compile report: matmul and kernel calls per forward, FLOPs and weight bytes after each
pass, and the table ``compile --explain`` prints."""

from __future__ import annotations

import numpy as np

# tvm is imported inside the functions: ``import mbcompile`` stays light (TVM imports torch
# when it is installed, several seconds), and the runtime never needs this module.


def _walk(func) -> tuple[list, list]:
    """(calls, constants) of ``func``, in one walk (each walk of the default model's function
    reads some 200,000 expressions through TVM's containers)."""
    import tvm
    from tvm import relax

    calls, constants = [], []

    def visit(expr):
        if isinstance(expr, relax.Call):
            calls.append(expr)
        elif isinstance(expr, tvm.ir.Constant):
            constants.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return calls, constants


def _calls(func) -> list:
    return _walk(func)[0]


def _main(mod) -> tuple[list, list, list]:
    """(calls, fused attention calls, constants) of ``main``, from one walk."""
    from mbcompile.passes.count import attention_calls_among

    calls, constants = _walk(mod["main"])
    return calls, attention_calls_among(mod, calls), constants


def _matmul_flops(calls: list, attention: list) -> int:
    total = 0
    for call in calls:
        if getattr(call.op, "name", None) != "relax.matmul":
            continue
        a_shape = [int(d) for d in call.args[0].ty.shape]
        out_shape = [int(d) for d in call.ty.shape]
        total += 2 * int(np.prod(out_shape)) * a_shape[-1]
    for call in attention:  # q·kᵀ and p·v
        # kt is (batch·heads, dim, seq_k) in both layouts; the output (batch·heads, seq_q, dim_v)
        # or, in the rows layout, (1, seq_q, heads·dim_v).
        bh, dim, seq_k = (int(d) for d in call.args[1].fields[1].ty.shape)
        out = [int(d) for d in call.ty.shape]
        total += 2 * seq_k * (bh * out[-2] * dim + int(np.prod(out)))
    return total


def _weight_bytes(constants: list) -> int:
    import tvm

    seen: dict = {}
    for expr in constants:
        value = getattr(expr, "value", None)
        if isinstance(value, tvm.runtime.Tensor):
            seen[expr] = int(np.prod(value.shape)) * np.dtype(str(value.dtype)).itemsize
    return sum(seen.values())


def matmul_calls(mod) -> int:
    """``R.matmul`` calls in ``main`` (a fused attention counts as one)."""
    from mbcompile.passes.count import count_matmuls

    return count_matmuls(mod)


def matmul_flops(mod) -> int:
    """Multiply-add FLOPs (2·M·N·K per output) of the ``R.matmul`` calls in ``main``."""
    calls, attention, _ = _main(mod)
    return _matmul_flops(calls, attention)


def kernel_calls(mod) -> int:
    """Kernel (``call_tir``) calls in ``main`` of a legalized, fused module."""
    return sum(1 for c in _calls(mod["main"]) if getattr(c.op, "name", None) == "relax.call_tir")


def weight_bytes(mod) -> int:
    """Bytes of the distinct constants ``main`` uses (the weights)."""
    return _weight_bytes(_walk(mod["main"])[1])


def module_stats(mod) -> dict[str, int]:
    """Matmul calls, their FLOPs and the weight bytes of ``main``, from one walk of it."""
    from mbcompile.passes.count import matmuls_among

    calls, attention, constants = _main(mod)
    return {
        "matmul_calls": matmuls_among(mod, calls),
        "matmul_flops": _matmul_flops(calls, attention),
        "weight_bytes": _weight_bytes(constants),
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
