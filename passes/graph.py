"""Reading a Relax function as a graph, and the expression helpers the passes share.

:class:`Graph` answers what a pass asks about the bindings of one function: the value behind a
variable, how many bindings use it, which read it, its constant value, and whether a
``tvm.relax.dpl`` pattern matches there (looking through bindings). The functions below it read
shapes, dtypes and constants off expressions and build new calls and constants.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern


class Graph:
    """The bindings of one function: values behind variables and how many bindings use each."""

    def __init__(self, func: relax.Function):
        self.func = func
        self._var2val_map = relax.analysis.get_var2val(func)  # handed to the matcher as is
        self.var2val: dict[relax.Var, relax.Expr] = {}
        self._bindings: list[tuple[relax.Var, relax.Expr]] = []
        self._users: dict[relax.Var, int] = {}
        self._consumers: dict[relax.Var, list[relax.Var]] = {}
        self._var_of: dict[int, relax.Var] = {}
        # constant → (the constant, its value, read-only): a weight is read by several guards
        self._constants: dict[int, tuple[relax.Expr, np.ndarray]] = {}
        self.order: dict[relax.Var, int] = {}
        self.block: dict[relax.Var, int] = {}
        # One walk, each binding's var and value read once (reading through TVM's containers
        # costs microseconds per item: a Graph is built per pass, round and function).
        for index, block in enumerate(func.body.blocks):
            for binding in block.bindings:
                var, value = binding.var, binding.value
                self.order[var] = len(self.order)
                self.block[var] = index
                if isinstance(binding, relax.VarBinding):
                    self.var2val[var] = value
                    self._bindings.append((var, value))
                self._var_of.setdefault(value.__chandle__(), var)
                for used in relax.analysis.free_vars(value):
                    self._users[used] = self._users.get(used, 0) + 1
                    self._consumers.setdefault(used, []).append(var)
        for used in relax.analysis.free_vars(func.body.body):
            self._users[used] = self._users.get(used, 0) + 1

    def value(self, expr: relax.Expr) -> relax.Expr:
        """``expr`` with bound variables replaced by their values (through aliases)."""
        while isinstance(expr, relax.Var) and expr in self.var2val:
            expr = self.var2val[expr]
        return expr

    def var_of(self, value: relax.Expr) -> relax.Var | None:
        """The variable bound to this very value, if any."""
        if isinstance(value, relax.Var):
            return value
        return self._var_of.get(value.__chandle__())

    def name(self, expr: relax.Expr) -> str:
        """The name of the variable bound to ``expr``, for refusal messages."""
        var = self.var_of(expr)
        return var.name if var is not None else "an unbound intermediate"

    def users(self, expr: relax.Expr) -> int:
        """How many bindings (and the function result) use the variable bound to ``expr``."""
        var = self.var_of(expr)
        return self._users.get(var, 0) if var is not None else 1

    def consumers(self, var: relax.Var) -> list[relax.Var]:
        """The variables of the bindings that read ``var``, in program order."""
        return self._consumers.get(var, [])

    def constant(self, expr: relax.Expr) -> np.ndarray | None:
        """The numpy value of a constant (directly or behind a variable), else None; read-only,
        read once per Graph."""
        expr = self.value(expr)
        if not isinstance(expr, tvm.ir.GenericConst):
            return None
        key = expr.__chandle__()
        if key not in self._constants:  # the entry holds the constant: its address stays its own
            value = expr.value.numpy()
            value.flags.writeable = False
            self._constants[key] = (expr, value)
        return self._constants[key][1]

    def match(self, pattern: DFPattern, expr: relax.Expr) -> dict[DFPattern, relax.Expr] | None:
        """The pattern's matches on ``expr`` (looking through bindings), or None."""
        ops = root_ops(pattern)
        if ops is not None:  # a call of another operator cannot match: skip the matcher
            value = self.value(expr)
            if not isinstance(value, relax.Call) or getattr(value.op, "name", None) not in ops:
                return None
        found = pattern.extract_matched_expr(expr, self._var2val_map)
        return dict(found) if found is not None else None

    def bindings(self) -> Iterator[tuple[relax.Var, relax.Expr]]:
        """(var, value) for every binding, in program order."""
        yield from self._bindings


_ROOT_OPS: dict[int, tuple[DFPattern, frozenset[str] | None]] = {}


def root_ops(pattern: DFPattern) -> frozenset[str] | None:
    """The operator names a call must have for ``pattern`` to match it at its root (a call
    pattern of a fixed operator, or an alternative of such), or None when any expression may
    match. Cached per pattern object."""
    cached = _ROOT_OPS.get(id(pattern))
    if cached is not None and cached[0].same_as(pattern):
        return cached[1]
    ops = _root_ops(pattern)
    _ROOT_OPS[id(pattern)] = (pattern, ops)
    return ops


def _root_ops(pattern: DFPattern) -> frozenset[str] | None:
    from tvm.relax import dpl

    if isinstance(pattern, dpl.OrPattern):
        left, right = _root_ops(pattern.left), _root_ops(pattern.right)
        return None if left is None or right is None else left | right
    if isinstance(pattern, dpl.CallPattern) and isinstance(pattern.op, dpl.ExprPattern):
        op = pattern.op.expr
        if isinstance(op, tvm.ir.Op):
            return frozenset([op.name])
    return None


def is_call(expr: relax.Expr, *ops: str) -> bool:
    """Whether ``expr`` is a call of one of the operators named ``ops`` (``"relax.reshape"``)."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in ops


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The static shape of a tensor expression, or None when it is not a static tensor."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(dim) for dim in ty.shape.values)
    except (TypeError, AttributeError):
        return None


def shape_values(shape_expr: relax.Expr) -> tuple[int, ...] | None:
    """The integers of a ``R.shape([...])`` argument, or None if any is symbolic."""
    if not isinstance(shape_expr, relax.ShapeExpr):
        return None
    try:
        return tuple(int(dim) for dim in shape_expr.values)
    except TypeError:
        return None


def column_slice(expr: relax.Expr | None) -> tuple[relax.Expr, int] | None:
    """(source, first column) when ``expr`` is a unit-stride ``strided_slice`` of the last axis
    only, with a non-negative start, of a static-shaped tensor; else None."""
    if not is_call(expr, "relax.strided_slice"):
        return None
    source = expr.args[0]
    shape = static_shape(source)
    if shape is None:
        return None
    try:
        axes = [int(a) for a in expr.args[1].fields]
        begin = [int(b) for b in expr.args[2].fields]
        strides = [int(t) for t in expr.args[4].fields] if len(expr.args) > 4 else [1]
    except (TypeError, AttributeError):
        return None
    if len(axes) != 1 or axes[0] % len(shape) != len(shape) - 1 or strides != [1] or begin[0] < 0:
        return None
    return source, begin[0]


# Ops that rearrange constants into a weight (the importer's ``permute_dims(W)``, the MaskedLM
# decoder's ``concat``); an expression of these over constants is itself a constant.
_CONSTANT_LAYOUT_OPS = ("relax.permute_dims", "relax.concat", "relax.reshape", "relax.broadcast_to")


def is_constant_expr(graph: Graph, expr: relax.Expr) -> bool:
    """Whether ``expr`` is a constant, or layout ops (permute, concat, reshape, broadcast) over
    constants only, looking through bindings."""
    expr = graph.value(expr)
    if isinstance(expr, tvm.ir.GenericConst):
        return True
    if isinstance(expr, relax.Tuple):
        return all(is_constant_expr(graph, field) for field in expr.fields)
    if isinstance(expr, relax.ShapeExpr):
        return True
    if is_call(expr, *_CONSTANT_LAYOUT_OPS):
        return all(is_constant_expr(graph, arg) for arg in expr.args)
    return False


def dtype_of(expr: relax.Expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def fold_const(value: np.ndarray, dtype: str) -> relax.Expr:
    """A Relax constant of ``dtype`` from a value computed in float64."""
    return relax.const(np.ascontiguousarray(value).astype(dtype), dtype)


def last_axis_vector(value: np.ndarray, channels: int) -> np.ndarray | None:
    """``value`` as a vector over the last axis if it broadcasts along the last axis only.

    A scalar becomes a vector of ``channels`` equal entries; ``(channels,)`` and
    ``(1, …, 1, channels)`` become ``(channels,)``; anything else is None.
    """
    if value.size == 1:
        return np.full((channels,), value.reshape(()), dtype=value.dtype)
    if value.shape[-1] != channels or any(dim != 1 for dim in value.shape[:-1]):
        return None
    return value.reshape(channels)


def call(template: relax.Call, *args: relax.Expr) -> relax.Call:
    """``template``'s operator and attributes on new arguments."""
    return relax.Call(template.op, list(args), template.attrs, template.ty_args)
