"""``LegalizeOps`` that makes each kernel once: a call like one legalized before reuses its kernel.

TVM's ``LegalizeOps`` turns every Relax op call into a ``call_tir`` of a new PrimFunc (te,
``create_prim_func``), then drops the PrimFuncs equal to one it has: for the default model's
eight lengths, 10,000 calls made about 10,000 PrimFuncs for a few hundred distinct ones (5–7 s
of the compile). Here each op's legalization is wrapped::

    add(x: (1, 128, 512) f32, y: (1, 128, 512) f32)    first time: TVM's legalization, kept
    add(u: (1, 128, 512) f32, v: (1, 128, 512) f32)    again: call_tir(the same kernel, (u, v))

A call is "like" one before when its op, attributes (as TVM serializes them) and operands agree:
a variable's type; a constant's type, and its value when small (a scalar is written into the
kernel); a shape's or a value's printed form. A result is kept for reuse only when it is one
``call_tir`` whose operands are the call's own, each once; anything else (several bindings, an
operand made by the legalization, a tuple) is made afresh every time.
"""

from __future__ import annotations

import hashlib

import tvm
from tvm import relax

SMALL = 64  # constants of at most this many values are keyed by value (they may be inlined)


def _operand_key(expr: relax.Expr) -> tuple | None:
    if isinstance(expr, relax.Var):
        ty = expr.ty
        shape = getattr(ty, "shape", None)
        values = tuple(str(v) for v in shape.values) if isinstance(shape, relax.ShapeExpr) else None
        return ("var", type(ty).__name__, values, str(getattr(ty, "dtype", "")),
                getattr(ty, "ndim", None))
    if isinstance(expr, tvm.ir.GenericConst):
        if not isinstance(expr.value, tvm.runtime.Tensor):
            return ("value", str(expr))  # a scalar, a string, a dtype: as printed
        array = expr.value.numpy()
        value = hashlib.blake2b(array.tobytes(), digest_size=16).digest() if (
            array.size <= SMALL) else None
        return ("const", array.shape, array.dtype.str, value)
    if isinstance(expr, relax.ShapeExpr) or tvm.ir.is_prim_expr(expr):
        return (type(expr).__name__, str(expr))
    return None


def _key(call: relax.Call) -> tuple | None:
    if not isinstance(call.op, tvm.ir.Op):
        return None
    operands = tuple(_operand_key(a) for a in call.args)
    if any(k is None for k in operands):
        return None
    attrs = tvm.ir.save_json(call.attrs) if call.attrs is not None else ""
    return (call.op.name, attrs, operands)


class _Kernels:
    """The legalizations wrapped with one cache shared by every op."""

    def __init__(self) -> None:
        self.kept: dict[tuple, tuple[relax.Call, tuple[int, ...]]] = {}
        self.reused = 0
        self._call_tir = tvm.ir.Op.get("relax.call_tir")

    def wrap(self, legalize):
        def once(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
            key = _key(call)
            if key is not None and key in self.kept:
                first, where = self.kept[key]
                self.reused += 1
                fields = relax.Tuple([call.args[i] for i in where])
                return relax.Call(first.op, [first.args[0], fields], first.attrs, first.ty_args)
            out = legalize(bb, call)
            if key is not None:
                where = self._operands(call, out)
                if where is not None:
                    self.kept[key] = (out, where)
            return out

        return once

    def _operands(self, call: relax.Call, out: relax.Expr) -> tuple[int, ...] | None:
        """Where each operand of the ``call_tir`` ``out`` is among ``call``'s arguments, or None
        when ``out`` is not a plain ``call_tir`` of them."""
        if not (isinstance(out, relax.Call) and out.op.same_as(self._call_tir)
                and len(out.args) == 2 and isinstance(out.args[1], relax.Tuple)):
            return None
        args = list(call.args)
        if len({a.__chandle__() for a in args}) != len(args):
            return None  # an argument twice: positions would be ambiguous
        where = []
        for field in out.args[1].fields:
            found = [i for i, a in enumerate(args) if a.same_as(field)]
            if len(found) != 1:
                return None
            where.append(found[0])
        return tuple(where)


def legalize_ops() -> tvm.transform.Pass:
    """``relax.transform.LegalizeOps()``, each distinct kernel made once (module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="LegalizeOpsOnce")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels = _Kernels()
        names = set()
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, lambda e: _collect(e, names))
        custom = {}
        for name in names:
            legalize = tvm.ir.Op.get(name).get_attr("FLegalize")
            if legalize is not None:
                custom[name] = kernels.wrap(legalize)
        return relax.transform.LegalizeOps(customize_legalize_map=custom)(mod)

    return run


def _collect(expr, names: set) -> None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        names.add(expr.op.name)
