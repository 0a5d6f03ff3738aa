"""Pre-pack constant matmul weights into a blocked layout the dense schedule streams.

    matmul(x[..., K], W[K, N])  →  call_tir(dense_packed, x, Wp[⌈N/nb⌉, K, nb])

``Wp[jo, k, ji] = W[k, jo·nb + ji]``, zero beyond column N, so one register tile of the dense
schedule (``dense.py``) reads one contiguous ``K × nb`` panel. ``nb`` is two SIMD vectors.
The new PrimFunc computes the product over the padded width (``dense_pad``) and crops it
(``crop``); it carries ``op_pattern = kOutEWiseFusable`` so FuseOps still fuses bias, NoNorm,
activation and residual epilogues into it, exactly as into a legalized ``R.matmul``.

A column slice of the activation (``x = strided_slice(y, axes=[-1], ...)``, a merged linear's
output feeding the next linear) is read in place: the PrimFunc takes ``y`` and its first block
selects the columns, which the dense schedule inlines into the matmul, so no copy kernel runs.

The weight may be a constant expression the importer wrote: ``permute_dims(W)`` (``nn.Linear``),
``concat`` of such (the MaskedLM decoder), ``broadcast_to`` over batch axes (a batched input);
it is evaluated here with numpy (Relax ``FoldConstant`` compiles a kernel per weight: ~1 s per
layer).

Bails (leaves the matmul as is) unless: the weight evaluates to a 2-D constant, both operands
are the same float dtype with no other ``out_dtype``, and the activation has a static shape.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import tvm
from tvm import relax, te

from mbcompile.cpu import cpu_info
from mbcompile.passes.graph import Graph, column_slice
from mbcompile.targets.legalize_once import KernelReuse, operand_key
from mbcompile.targets.schedules import neon_steps, tile_intrinsics
from mbcompile.targets.schedules.pack_bf16 import (
    OP_PATTERN_OPAQUE,
    dense_bf16,
    pack_weight_bf16,
    to_bf16,
)
from mbcompile.targets.schedules.pack_int8 import (
    dense_int8,
    pack_weight_int8,
    quantize_rows,
    quantize_weight,
    row_scales,
    weight_qmax,
    zero_point,
)

logger = logging.getLogger(__name__)

OP_PATTERN_ELEMWISE = 0  # tvm/relax/analysis: OpPatternKind::kElemWise
OP_PATTERN_OUT_EWISE_FUSABLE = 4  # tvm/relax/analysis: OpPatternKind::kOutEWiseFusable


def packed_block_width(target: tvm.target.Target, dtype: str, n: int, precision: str = "fp32") -> int:
    """Columns per packed panel: two vectors, or fewer lanes' worth for a narrow N; on targets
    with FMA by lane (AArch64), the 16 fp32 columns of a NEON step (``neon_steps``). A bf16 or
    int8 matmul's vectors are its dot product's (``CPUInfo.dot_lanes``: 512-bit on Zen 4)."""
    info = cpu_info(target)
    if info.fma_by_lane and dtype == "float32":
        return neon_steps.COLUMNS
    lanes = info.lanes(dtype) if precision == "fp32" else info.dot_lanes()
    return min(2 * lanes, -(-n // lanes) * lanes)


def pack_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """``[K, N]`` → ``[⌈N/block⌉, K, block]``, zero-padded columns."""
    k, n = weight.shape
    n_outer = -(-n // block)
    padded = np.zeros((k, n_outer * block), dtype=weight.dtype)
    padded[:, :n] = weight
    return np.ascontiguousarray(padded.reshape(k, n_outer, block).transpose(1, 0, 2))


def dense_packed(x: te.Tensor, wp: te.Tensor, n: int, k_offset: int = 0) -> te.Tensor:
    """``x[..., K] · W[K, N]`` with W given packed as ``wp[⌈N/nb⌉, K, nb]``; with ``k_offset``,
    ``x`` is wider and its columns ``k_offset .. k_offset + K`` are the operand."""
    n_outer, k_extent, block = wp.shape
    if k_offset or x.shape[-1] != k_extent:
        wide = x
        x = te.compute(
            (*wide.shape[:-1], k_extent),
            lambda *idx: wide[(*idx[:-1], idx[-1] + k_offset)],
            name="columns",
        )
    *batch, _ = x.shape
    k = te.reduce_axis((0, k_extent), name="k")
    padded = te.compute(
        (*batch, n_outer * block),
        lambda *idx: te.sum(
            x[(*idx[:-1], k)] * wp[idx[-1] // block, k, idx[-1] % block], axis=k
        ),
        name="dense_pad",
    )
    return te.compute((*batch, n), lambda *idx: padded(*idx), name="crop")


def constant_value(expr: relax.Expr, lookup) -> np.ndarray | None:
    """The value of a constant weight expression, or None if it is not one we evaluate.

    ``lookup`` maps a bound variable to its value expression (or None).
    """
    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        return None if bound is None else constant_value(bound, lookup)
    if isinstance(expr, tvm.ir.expr.GenericConst):
        return expr.value.numpy()
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
        return None
    if expr.op.name == "relax.permute_dims":
        value = constant_value(expr.args[0], lookup)
        axes = expr.attrs.axes
        if value is None:
            return None
        return np.transpose(value, None if axes is None else [int(a) for a in axes])
    if expr.op.name == "relax.concat":
        fields = expr.args[0]
        if isinstance(fields, relax.Var):
            fields = lookup(fields)
        if not isinstance(fields, relax.Tuple):
            return None
        values = [constant_value(f, lookup) for f in fields.fields]
        if any(v is None for v in values):
            return None
        return np.concatenate(values, axis=int(expr.attrs.axis))
    return None


def matmul_weight(weight: relax.Expr, lookup) -> np.ndarray | None:
    """The 2-D constant a matmul multiplies by, seeing through a ``broadcast_to`` over batch."""
    if isinstance(weight, relax.Var):
        bound = lookup(weight)
        weight = weight if bound is None else bound
    if (
        isinstance(weight, relax.Call)
        and isinstance(weight.op, tvm.ir.Op)
        and weight.op.name == "relax.broadcast_to"
    ):
        inner = constant_value(weight.args[0], lookup)
        if inner is not None and inner.ndim == 2:
            return inner
    return constant_value(weight, lookup)


def why_not_packable(call: relax.Call, weight: np.ndarray | None) -> str | None:
    """None when ``call``, a matmul whose second operand evaluates to ``weight``, can be packed."""
    if weight is None:
        return "weight is not a constant expression"
    x_type = call.args[0].ty
    if not isinstance(x_type, relax.TensorType) or not isinstance(x_type.shape, relax.ShapeExpr):
        return "activation has no known shape"
    if not all(isinstance(d, tvm.tirx.IntImm) for d in x_type.shape.values):
        return "activation shape is not static"
    if weight.ndim != 2 or x_type.ndim < 1:
        return f"ranks {x_type.ndim}·{weight.ndim} are not [..., K]·[K, N]"
    if int(x_type.shape.values[-1]) != weight.shape[0]:
        return "contraction extents differ"
    x_dtype, w_dtype = str(x_type.dtype), str(weight.dtype)
    if x_dtype != w_dtype or not x_dtype.startswith(("float", "bfloat")):
        return f"dtypes {x_dtype}·{w_dtype} are not one float type"
    out_dtype = str(call.attrs.out_dtype or "")
    if out_dtype not in ("", "void", x_dtype):
        return f"out_dtype {out_dtype} differs from the operands"
    return None


def _dense_int8_with_sums(xq, sx, wq, sw, cw, n: int, zero: int):
    """``dense_int8`` with the weight's column sums passed as a tensor among the others."""
    return dense_int8(xq, sx, wq, sw, n=n, cw=cw, zero=zero)


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, precision: str):
        super().__init__(mod)
        self.target = target
        self.precision = precision
        self.packed = 0
        self._matmul = tvm.ir.Op.get("relax.matmul")
        # (how, weight's digest) → its packed constant(s): the functions of the compiled lengths
        # multiply by the same weights (each its own copy after the MobileBERT passes), packed
        # once and shared, not once per length (8 × 100 MB for the default model in fp32).
        self._constants: dict[tuple, tuple[relax.Constant, ...]] = {}
        # bf16: the function being visited, as the passes read it (who reads a variable)
        self.graph: Graph | None = None
        # a matmul's kernel is built once per shape, not once per call
        self._kernels = KernelReuse()

    def _call_te(self, compute, *args: relax.Expr, **options) -> relax.Call:
        """``builder_.call_te(compute, *args, **options)`` (every tensor positional, each
        option a plain value), the kernel made once per operand types and options: te and
        ``create_prim_func`` took about 2 ms a call (5.2 s for the 2,320 matmuls of a default
        compile, under a profiler)."""
        operands = tuple(operand_key(a) for a in args)
        if any(k is None for k in operands):
            return self.builder_.call_te(compute, *args, **options)
        key = (compute, operands, repr(sorted(options.items())))
        call = self._kernels.reuse(key, args)
        if call is None:
            call = self.builder_.call_te(compute, *args, **options)
            self._kernels.keep(key, args, call)
        return call

    def _packed(self, how: tuple, w: np.ndarray, pack) -> tuple[relax.Constant, ...]:
        """``pack(w)`` (a tuple of arrays) as constants, made once per weight value and ``how``."""
        key = (how, w.shape, w.dtype.str, hashlib.blake2b(w.tobytes(), digest_size=20).digest())
        if key not in self._constants:
            self._constants[key] = tuple(relax.const(a) for a in pack(w))
        return self._constants[key]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self._matmul:
            return call
        w = matmul_weight(call.args[1], self.lookup_binding)
        why = why_not_packable(call, w)
        if why is not None:
            logger.debug("PackDenseWeights: not packing %s: %s", call.op, why)
            return call
        block = packed_block_width(self.target, str(w.dtype), w.shape[1], self.precision)
        self.packed += 1
        x, k_offset = call.args[0], 0
        source = column_slice(self.lookup_binding(x) if isinstance(x, relax.Var) else x)
        if source is not None:
            x, k_offset = source
        if self.precision == "bf16":
            return self._bf16(x, w, k_offset, block)
        if self.precision == "int8":
            return self._int8(x, w, k_offset, block)
        (packed,) = self._packed(("fp32", block), w, lambda w: (pack_weight(w, block),))
        return self._call_te(
            dense_packed,
            x,
            packed,
            n=w.shape[1],
            k_offset=k_offset,
            primfunc_name_hint="dense_packed",
            primfunc_attrs={"op_pattern": OP_PATTERN_OUT_EWISE_FUSABLE},
        )

    def _k_multiple(self, kind: str, default: int) -> int:
        """K's padding: a tile row's worth where the matmul runs on matrix tiles."""
        if kind in cpu_info(self.target).tile_kinds:
            return tile_intrinsics.k_multiple(kind)
        return default

    def _only_reader(self, x: relax.Expr, k_extent: int, k_offset: int, k_multiple: int) -> bool:
        """Whether this matmul is all that reads ``x``, and reads all of it as it is (no column
        slice, no padding): then rounding ``x`` is an elementwise epilogue for the kernel that
        makes ``x``."""
        ty = x.ty
        shape = ty.shape if isinstance(ty, relax.TensorType) else None
        return (
            isinstance(x, relax.Var) and self.graph is not None and self.graph.users(x) == 1
            and k_offset == 0 and k_extent % k_multiple == 0
            and isinstance(shape, relax.ShapeExpr) and int(shape.values[-1]) == k_extent
        )

    def _bf16(self, x: relax.Expr, w: np.ndarray, k_offset: int, block: int) -> relax.Expr:
        k_multiple = self._k_multiple("bf16", 2)
        # The rounding is its own kernel (opaque), unless this matmul is x's only reader: then
        # it fuses into the kernel that makes x (a FFN's activation: its matmul's epilogue
        # writes bf16, half the bytes, and the rounding kernel is gone). Fused where x is
        # read again (a residual), it would give that kernel a second output (pack_bf16.py).
        alone = self._only_reader(x, w.shape[0], k_offset, k_multiple)
        xb = self.builder_.emit(
            self._call_te(
                to_bf16,
                x,
                k_extent=w.shape[0],
                k_offset=k_offset,
                k_multiple=k_multiple,
                primfunc_name_hint="to_bf16",
                primfunc_attrs={"op_pattern": OP_PATTERN_ELEMWISE if alone else OP_PATTERN_OPAQUE},
            )
        )
        (packed,) = self._packed(("bf16", block, k_multiple), w,
                                 lambda w: (pack_weight_bf16(w, block, k_multiple),))
        return self._call_te(
            dense_bf16,
            xb,
            packed,
            n=w.shape[1],
            primfunc_name_hint="dense_bf16",
            primfunc_attrs={"op_pattern": OP_PATTERN_OUT_EWISE_FUSABLE},
        )

    def _int8(self, x: relax.Expr, w: np.ndarray, k_offset: int, block: int) -> relax.Expr:
        instruction = cpu_info(self.target).int8_dot
        zero = zero_point(instruction)
        k_multiple = self._k_multiple("u8s8" if zero else "s8s8", 4)
        emit, call_te = self.builder_.emit, self._call_te
        opaque = {"op_pattern": OP_PATTERN_OPAQUE}
        k = {"k_extent": w.shape[0], "k_offset": k_offset}
        xq = emit(call_te(quantize_rows, x, zero=zero, k_multiple=k_multiple, **k,
                          primfunc_name_hint="quantize_rows",
                          primfunc_attrs=opaque))
        sx = emit(call_te(row_scales, x, **k, primfunc_name_hint="row_scales",
                          primfunc_attrs=opaque))

        def pack(w):
            q, scales = quantize_weight(w, weight_qmax(instruction))
            return pack_weight_int8(q, block, k_multiple), scales, q.astype(np.int32).sum(axis=0)

        packed, scales, column_sums = self._packed(("int8", instruction, block, k_multiple), w, pack)
        if not zero:
            return call_te(dense_int8, xq, sx, packed, scales, n=w.shape[1],
                           primfunc_name_hint="dense_int8",
                           primfunc_attrs={"op_pattern": OP_PATTERN_OUT_EWISE_FUSABLE})
        return call_te(
            _dense_int8_with_sums,
            xq,
            sx,
            packed,
            scales,
            column_sums,
            n=w.shape[1],
            zero=zero,
            primfunc_name_hint="dense_int8",
            primfunc_attrs={"op_pattern": OP_PATTERN_OUT_EWISE_FUSABLE},
        )


@tvm.transform.module_pass(opt_level=0, name="PackDenseWeights")
class PackDenseWeights:
    """Rewrite every matmul by a constant weight into a packed-weight ``call_tir``.

    ``precision="bf16"``: bf16 weights and activations with fp32 sums (``pack_bf16.py``);
    ``"int8"``: int8 ones with int32 sums (``pack_int8.py``).
    ``last_count`` holds how many matmuls the last run packed.
    """

    def __init__(self, target: tvm.target.Target, precision: str = "fp32"):
        self.target = target
        self.precision = precision
        self.last_count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packer = _Packer(mod, self.target, self.precision)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                packer.graph = Graph(func) if self.precision == "bf16" else None
                packer.builder_.update_func(gvar, packer.visit_expr(func))
        self.last_count = packer.packed
        logger.info("PackDenseWeights: packed %d matmul weights", packer.packed)
        return relax.transform.DeadCodeElimination()(packer.builder_.get())
