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

import numpy as np
import tvm
from tvm import relax

SMALL = 64  # constants of at most this many values are keyed by value (they may be inlined)


def operand_key(expr: relax.Expr) -> tuple | None:
    """What a kernel made for a call can depend on in one operand (module doc), or None for an
    operand this cannot say (then nothing is reused)."""
    if isinstance(expr, relax.Var):
        ty = expr.ty
        shape = getattr(ty, "shape", None)
        values = tuple(str(v) for v in shape.values) if isinstance(shape, relax.ShapeExpr) else None
        return ("var", type(ty).__name__, values, str(getattr(ty, "dtype", "")),
                getattr(ty, "ndim", None))
    if isinstance(expr, tvm.ir.GenericConst):
        if not isinstance(expr.value, tvm.runtime.Tensor):
            return ("value", str(expr))  # a scalar, a string, a dtype: as printed
        shape, dtype = tuple(int(d) for d in expr.value.shape), str(expr.value.dtype)
        small = int(np.prod(shape)) <= SMALL  # a weight is not copied out just for its key
        value = hashlib.blake2b(expr.value.numpy().tobytes(), digest_size=16).digest() if (
            small) else None
        return ("const", shape, dtype, value)
    if isinstance(expr, relax.ShapeExpr) or tvm.ir.is_prim_expr(expr):
        return (type(expr).__name__, str(expr))
    return None


def _key(call: relax.Call) -> tuple | None:
    if not isinstance(call.op, tvm.ir.Op):
        return None
    operands = tuple(operand_key(a) for a in call.args)
    if any(k is None for k in operands):
        return None
    attrs = tvm.ir.save_json(call.attrs) if call.attrs is not None else ""
    return (call.op.name, attrs, operands)


class KernelReuse:
    """``call_tir`` results kept by key and remade for other operands of the same key: a
    ``call_tir`` of the same kernel on them. Only a plain ``call_tir`` of the operands it was
    made from, each once, is kept."""

    def __init__(self) -> None:
        self.kept: dict[tuple, tuple[relax.Call, tuple[int, ...]]] = {}
        self.reused = 0
        self._call_tir = tvm.ir.Op.get("relax.call_tir")

    def reuse(self, key: tuple, args) -> relax.Call | None:
        """The kept call of ``key`` on ``args``, or None if none is kept."""
        if key not in self.kept:
            return None
        first, where = self.kept[key]
        self.reused += 1
        fields = relax.Tuple([args[i] for i in where])
        return relax.Call(first.op, [first.args[0], fields], first.attrs, first.ty_args)

    def keep(self, key: tuple, args, out: relax.Expr) -> None:
        """Keep ``out`` (made from ``args``) for ``key``, if it is a plain ``call_tir`` of them."""
        if not (isinstance(out, relax.Call) and out.op.same_as(self._call_tir)
                and len(out.args) == 2 and isinstance(out.args[1], relax.Tuple)):
            return
        args = list(args)
        if len({a.__chandle__() for a in args}) != len(args):
            return  # an argument twice: positions would be ambiguous
        where = []
        for field in out.args[1].fields:
            found = [i for i, a in enumerate(args) if a.same_as(field)]
            if len(found) != 1:
                return
            where.append(found[0])
        self.kept[key] = (out, tuple(where))


def _wrap(kernels: KernelReuse, legalize):
    def once(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        key = _key(call)
        if key is None:
            return legalize(bb, call)
        reused = kernels.reuse(key, call.args)
        if reused is not None:
            return reused
        out = legalize(bb, call)
        kernels.keep(key, call.args, out)
        return out

    return once


def legalize_ops() -> tvm.transform.Pass:
    """``relax.transform.LegalizeOps()``, each distinct kernel made once (module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="LegalizeOpsOnce")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels = KernelReuse()
        names = set()
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, lambda e: _collect(e, names))
        custom = {}
        for name in names:
            legalize = tvm.ir.Op.get(name).get_attr("FLegalize")
            if legalize is not None:
                custom[name] = _wrap(kernels, legalize)
        return relax.transform.LegalizeOps(customize_legalize_map=custom)(mod)

    return run


def _collect(expr, names: set) -> None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        names.add(expr.op.name)
