"""Rewrites of an imported Relax ``main`` that make every importer's module read the same.

The passes match the op forms TVM's torch.export importer writes; these bring the other
importer (ONNX) to them, and make the gathers of both bounded. Each moves no data.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard


def bounded_gathers(func: relax.Function) -> relax.Function:
    """``R.take(mode="fast")`` → ``mode="clip"``.

    The importers' gathers (embedding tables, the pooler's first token) skip the bounds check.
    The runtime range-checks token and type ids before anything runs; clipped gathers keep even
    an unchecked caller (a remote program, a hand-made call) from reading outside a table, for
    the cost of two integer compares per index.
    """
    data, indices = wildcard(), wildcard()
    pattern = is_op("relax.take")(data, indices)

    def clip(call, matches):
        if call.attrs.mode != "fast":
            return call
        axis = None if call.attrs.axis is None else int(call.attrs.axis)
        return relax.op.take(matches[data], matches[indices], axis=axis, mode="clip")

    return rewrite_call(pattern, clip, func)


def batched_matmuls_as_3d(func: relax.Function) -> relax.Function:
    """4-D batched matmuls of two computed tensors as torch.export's importer writes them::

        matmul(a, b)                           a: (B, H, M, K), b: (B, H, K, N)
      → reshape(matmul(reshape(a, (B·H, M, K)), reshape(b, (B·H, K, N))), (B, H, M, N))

    ONNX's MatMul takes the attention's 4-D tensors as they are; torch.export flattens the
    batch and head axes around a 3-D matmul, the form ``FuseAttention`` matches. A reshape
    that only merges leading axes is a view (no copy).
    """
    a, b = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(a, b)

    def as_3d(call, matches):
        left, right = matches[a], matches[b]
        if isinstance(left, tvm.ir.GenericConst) or isinstance(right, tvm.ir.GenericConst):
            return call
        shapes = [_static_shape(x) for x in (left, right)]
        if any(s is None or len(s) != 4 for s in shapes) or shapes[0][:2] != shapes[1][:2]:
            return call
        (batch, heads, m, k), (_, _, _, n) = shapes
        flat = batch * heads
        product = relax.op.matmul(
            relax.op.reshape(left, (flat, m, k)), relax.op.reshape(right, (flat, k, n))
        )
        return relax.op.reshape(product, (batch, heads, m, n))

    return rewrite_call(pattern, as_3d, func)


def tuple_output(func: relax.Function) -> relax.Function:
    """``func`` returning a tuple, as torch.export's importer always does (a single output
    comes back from the ONNX importer as a bare tensor)."""
    if isinstance(func.ret_ty, relax.TupleType):
        return func
    body = func.body
    seq = relax.SeqExpr(body.blocks, relax.Tuple([body.body]))
    new = relax.Function(func.params, seq, relax.TupleType([func.ret_ty]), attrs=func.attrs)
    return tvm.relax.transform.Normalize()(tvm.IRModule({"main": new}))["main"]


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(dim) for dim in ty.shape.values)
    except (TypeError, AttributeError):
        return None
