"""Rewrites of an imported Relax ``main`` that make every importer's module read the same.

The passes match the op forms TVM's torch.export importer writes; these bring the other
importer (ONNX) to them, and make the gathers of both bounded. Each moves no data.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard


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


def plain_gather_indices(func: relax.Function) -> relax.Function:
    """The ONNX importer's wrap of negative gather indices dropped::

        take(table, where(less(ids, 0), add(ids, rows), ids))  → take(table, ids)

    (ONNX's Gather counts negative indices from the end.) The runtime refuses negative token
    and type ids before anything runs, and ``bounded_gathers`` clips every gather, so the
    token ids reach the gathers as torch.export's importer passes them, the form the
    ``PruneMaskedLMHead`` pass traces the token ids through.
    """
    ids, zero, rows = wildcard(), is_const(), is_const()
    negative = is_op("relax.less")(ids, zero)
    wrapped = is_op("relax.add")(ids, rows)
    pattern = is_op("relax.where")(negative, wrapped, ids)
    bound = relax.analysis.get_var2val(func)
    params = list(func.params)

    def plain(call, m):
        value = _constant(m[zero])
        index = call.args[2]  # the ids as the where reads them (a variable or an input)
        if value is None or value.size != 1 or int(value.reshape(())) != 0:
            return call
        if not str(getattr(index.ty, "dtype", "")).startswith("int"):
            return call
        uses = [bound.get(m[negative], m[negative]).args[0], bound.get(m[wrapped], m[wrapped]).args[0]]
        if not all(bound.get(u, u).same_as(bound.get(index, index)) for u in uses):
            return call
        source = index  # only the model's inputs: token and type ids, which the runtime checks
        while isinstance(bound.get(source), relax.Call) and getattr(bound[source].op, "name", "") in (
            "relax.astype", "relax.reshape"
        ):
            source = bound[source].args[0]
        return index if any(source.same_as(p) for p in params) else call

    return rewrite_call(pattern, plain, func)


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


def layer_norms(func: relax.Function) -> relax.Function:
    """Layer norms that an exporter wrote out op by op (ONNX before opset 17 has no
    LayerNormalization) as the one op torch.export's importer writes::

        d = subtract(x, mean(x, axis=-1));  v = mean(power(d, 2), axis=-1)
        add(multiply(divide(d, sqrt(add(v, eps))), γ), β)
      → layer_norm(x, γ, β, axes=[-1], epsilon=eps)

    (MobileBERT's masked-LM transform is its one true layer norm; the NoNorms are not.)
    """
    x, eps, gamma, beta, two = wildcard(), is_const(), is_const(), is_const(), is_const()
    mean = is_op("relax.mean")(x)
    centred = is_op("relax.subtract")(x, mean)
    variance = is_op("relax.mean")(is_op("relax.power")(centred, two))
    normed = is_op("relax.divide")(centred, is_op("relax.sqrt")(is_op("relax.add")(variance, eps)))
    pattern = is_op("relax.add")(is_op("relax.multiply")(normed, gamma), beta)

    bound = relax.analysis.get_var2val(func)

    def fuse(call, m):
        shape = _static_shape(m[x])
        values = {p: _constant(m[p]) for p in (eps, gamma, beta)}
        square = _constant(m[two])
        if shape is None or any(v is None for v in values.values()) or square is None:
            return call
        subtracted = bound.get(m[centred], m[centred]).args[0]
        if not bound.get(subtracted, subtracted).same_as(bound.get(m[x], m[x])):
            return call  # x - mean(y): not a normalisation of one tensor
        channels = shape[-1]
        for reduce in (bound.get(m[mean], m[mean]), bound.get(m[variance], m[variance])):
            axes = reduce.attrs.axis
            if axes is None or [int(a) % len(shape) for a in axes] != [len(shape) - 1]:
                return call
        if values[eps].size != 1 or square.size != 1 or float(square.reshape(())) != 2.0:
            return call
        if any(values[p].size != channels for p in (gamma, beta)):
            return call
        dtype = str(values[gamma].dtype)
        g = relax.const(values[gamma].reshape(channels), dtype)
        b = relax.const(values[beta].reshape(channels), dtype)
        epsilon = float(values[eps].reshape(()))
        return relax.op.nn.layer_norm(m[x], g, b, axes=[-1], epsilon=epsilon)

    return rewrite_call(pattern, fuse, func)


def static_shapes_as_constants(func: relax.Function) -> relax.Function:
    """``shape_to_tensor(shape_of(x))`` of a statically shaped ``x`` → that shape as a
    constant, then constant folding: the ONNX importer's index arithmetic on shapes (the
    pooler's first token: ``take(x, where(0 < 0, 0 + shape[1], 0))``) becomes the constant
    index torch.export's importer writes."""
    x = wildcard()
    pattern = is_op("relax.shape_to_tensor")(is_op("relax.shape_of")(x))

    def constant(call, m):
        shape = _static_shape(m[x])
        return call if shape is None else relax.const(np.array(shape, np.int64), "int64")

    func = rewrite_call(pattern, constant, func)
    mod = relax.transform.FoldConstant()(tvm.IRModule({"main": func}))
    return mod["main"]


def tuple_output(func: relax.Function) -> relax.Function:
    """``func`` returning a tuple bound in its last block, as torch.export's importer always
    writes it (a single output comes back from the ONNX importer as a bare tensor)."""
    if isinstance(func.ret_ty, relax.TupleType):
        return func
    body = func.body
    blocks = list(body.blocks)
    out = relax.Var("gv", relax.TupleType([body.body.ty]))
    bindings = [*blocks[-1].bindings, relax.VarBinding(out, relax.Tuple([body.body]))]
    block_type = type(blocks[-1])
    blocks[-1] = block_type(bindings)
    seq = relax.SeqExpr(blocks, out)
    new = relax.Function(func.params, seq, relax.TupleType([func.ret_ty]), attrs=func.attrs)
    return tvm.relax.transform.Normalize()(tvm.IRModule({"main": new}))["main"]


def _constant(expr: relax.Expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(dim) for dim in ty.shape.values)
    except (TypeError, AttributeError):
        return None
