"""The interface every MobileBERT pass implements, and the helpers they share.

A pass is an object called on an ``IRModule`` that returns the rewritten module and how many
times it fired (0 means the very same module came back). Passes match with ``tvm.relax.dpl``
patterns built once in ``__init__``, look through variable bindings with a :class:`Graph`, and
hand :func:`rewrite_bindings` a new value for each binding they change: every new value computes
what the old one did, so several rewrites can be applied together and dead bindings are dropped
afterwards. The invariants a pass may rely on are in ``passes/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

# How often a pass re-reads the function after rewriting it: a rewrite can expose another
# (a permute chain collapses one link per round, a folded NoNorm turns a residual into a sum
# of linears). Every pass reaches its fixed point on MobileBERT in two or three rounds.
MAX_ROUNDS = 8

_REGISTRY: dict[str, type[MobileBertPass]] = {}


class MobileBertPass:
    """A graph rewrite on the Relax module of a captured MobileBERT.

    Subclasses set ``name``, build their patterns in ``__init__`` and implement
    :meth:`find_rewrites`; the guards that refuse a match live in one method ``why_not`` per
    pass, whose answers are kept in :attr:`refusals` (``"lv52: <reason>"``) for ``explain``.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        _REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.last_fired = 0

    def __call__(self, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        self.refusals = []
        updated: dict[relax.GlobalVar, relax.Function] = {}
        fired = 0
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function) or _is_kernel(func):
                continue
            new_func, count = self.rewrite_function(func)
            if count:
                updated[gvar] = new_func
                fired += count
        self.last_fired = fired
        if not fired:
            return mod, 0
        new_mod = mod.clone()
        for gvar, func in updated.items():
            new_mod[gvar] = func
        return new_mod, fired

    def tvm_pass(self) -> tvm.transform.Pass:
        """This pass as a TVM module pass, for ``Sequential`` and pass instruments
        (``PassTimingInstrument``, ``DumpIR``); each run's count lands in ``last_fired``."""

        def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            mod, self.last_fired = self(mod)
            return mod

        return tvm.transform.module_pass(run, opt_level=0, name=self.name)

    def rewrite_function(self, func: relax.Function) -> tuple[relax.Function, int]:
        """Rewrite ``func`` until nothing more matches; the new function and the fire count."""
        fired = 0
        for _ in range(MAX_ROUNDS):
            mark = len(self.refusals)
            rewrites = self.find_rewrites(Graph(func))
            if not rewrites:
                break
            del self.refusals[mark:]  # the next round may accept them; keep the last round's
            merged: dict[relax.Var, relax.Expr] = {}
            read: set[relax.Var] = set()
            for rewrite in rewrites:
                reads = {v for value in rewrite.values() for v in relax.analysis.free_vars(value)}
                if any(var in merged or var in read for var in rewrite) or any(
                    var in merged for var in reads
                ):
                    continue  # builds on a rewrite of this round: redone on the next one
                merged.update(rewrite)
                read |= reads
                fired += 1
            func = rewrite_bindings(func, merged)
        return func, fired

    def find_rewrites(self, graph: Graph) -> list[dict[relax.Var, relax.Expr]]:
        """One dict per firing: bound variable → the new value computing the same thing."""
        raise NotImplementedError

    def refuse(self, var: relax.Expr | None, why: str) -> None:
        where = var.name if isinstance(var, relax.Var) else "?"
        note = f"{where}: {why}"
        if note not in self.refusals:
            self.refusals.append(note)

    def __repr__(self) -> str:
        return f"{self.name}()"


def registered_passes() -> dict[str, type[MobileBertPass]]:
    """Every pass class defined so far, by name."""
    return dict(_REGISTRY)


def _is_kernel(func: relax.Function) -> bool:
    """Fused or offloaded functions are kernels, not graphs to rewrite."""
    keys = set(func.attrs.keys()) if func.attrs is not None else set()
    return bool(keys & {"Primitive", "Composite", "Codegen"})


# --------------------------------------------------------------------------------------------
# Reading the graph


class Graph:
    """The bindings of one function: values behind variables and how many bindings use each."""

    def __init__(self, func: relax.Function):
        self.func = func
        self._var2val_map = relax.analysis.get_var2val(func)  # handed to the matcher as is
        self.var2val: dict[relax.Var, relax.Expr] = dict(self._var2val_map)
        self._users: dict[relax.Var, int] = {}
        self._consumers: dict[relax.Var, list[relax.Var]] = {}
        self._var_of: dict[int, relax.Var] = {}
        self.order: dict[relax.Var, int] = {}
        self.block: dict[relax.Var, int] = {}
        for index, block in enumerate(func.body.blocks):
            for binding in block.bindings:
                self.order[binding.var] = len(self.order)
                self.block[binding.var] = index
                value = binding.value
                self._var_of.setdefault(value.__chandle__(), binding.var)
                for used in relax.analysis.free_vars(value):
                    self._users[used] = self._users.get(used, 0) + 1
                    self._consumers.setdefault(used, []).append(binding.var)
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
        """The numpy value of a constant (directly or behind a variable), else None."""
        expr = self.value(expr)
        if isinstance(expr, tvm.ir.GenericConst):
            return expr.value.numpy()
        return None

    def match(self, pattern: DFPattern, expr: relax.Expr) -> dict[DFPattern, relax.Expr] | None:
        """The pattern's matches on ``expr`` (looking through bindings), or None."""
        found = pattern.extract_matched_expr(expr, self._var2val_map)
        return dict(found) if found is not None else None

    def bindings(self):
        """(var, value) for every binding, in program order."""
        for block in self.func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    yield binding.var, binding.value


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
    if not (
        isinstance(expr, relax.Call)
        and isinstance(expr.op, tvm.ir.Op)
        and expr.op.name == "relax.strided_slice"
    ):
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
_CONSTANT_LAYOUT_OPS = frozenset(
    {"relax.permute_dims", "relax.concat", "relax.reshape", "relax.broadcast_to"}
)


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
    if (
        isinstance(expr, relax.Call)
        and isinstance(expr.op, tvm.ir.Op)
        and expr.op.name in _CONSTANT_LAYOUT_OPS
    ):
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


# --------------------------------------------------------------------------------------------
# Linears


@dataclass
class Linear:
    """``x @ W (+ b)`` with constant W (possibly stored ``(out, in)`` behind a permute)."""

    root: relax.Call  # the bias add, or the matmul when there is no bias
    matmul: relax.Call
    x: relax.Expr
    weight: np.ndarray  # as stored
    weight_axes: tuple[int, ...] | None  # the permute applied to the stored weight, if any
    weight_template: relax.Call | None  # that permute call
    bias: np.ndarray | None
    bias_first: bool  # R.add(bias, matmul) rather than R.add(matmul, bias)

    @property
    def kernel(self) -> np.ndarray:
        """The weight as ``(in, out)``, the orientation the matmul uses."""
        if self.weight_axes is None:
            return self.weight
        return np.transpose(self.weight, self.weight_axes)

    @property
    def out_features(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.weight.dtype)

    @property
    def intermediates(self) -> list[relax.Expr]:
        """The values inside the linear whose variables must have no user but the linear."""
        return [self.matmul] if self.root is not self.matmul else []

    def rebuild(self, kernel: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
        """The same linear (same form: permute or not, bias order) with a new ``(in, out)``
        kernel and bias, values computed in float64 and cast to the weight's dtype."""
        dtype = self.dtype
        if self.weight_axes is None:
            weight: relax.Expr = fold_const(kernel, dtype)
        else:
            inverse = np.argsort(self.weight_axes)
            weight = call(self.weight_template, fold_const(np.transpose(kernel, inverse), dtype))
        out: relax.Expr = call(self.matmul, self.x, weight)
        if bias is not None:
            b = fold_const(bias, dtype)
            out = relax.op.add(b, out) if self.bias_first else relax.op.add(out, b)
        return out


class LinearPattern:
    """``matmul(x, permute_dims(W) | W) (+ b)`` with constant W and b, built once."""

    def __init__(self) -> None:
        self.x = wildcard()
        self.weight = is_const()
        self.transposed = is_op("relax.permute_dims")(self.weight)
        self.matmul = is_op("relax.matmul")(self.x, self.transposed | self.weight)
        self.bias = is_const()
        self.biased = is_op("relax.add")(self.matmul, self.bias)
        self.pattern = self.biased | self.matmul

    def match(self, graph: Graph, expr: relax.Expr) -> Linear | None:
        """The linear whose root is ``expr``, or None.

        Only checks the form (2-D weight, bias along the output axis); guards about users are
        the caller's.
        """
        m = graph.match(self.pattern, expr)
        if m is None:
            return None
        matmul = m[self.matmul]
        root = m.get(self.biased, matmul)
        weight = graph.constant(m[self.weight])
        if weight is None or weight.ndim != 2:
            return None
        axes = None
        template = None
        if self.transposed in m:
            template = m[self.transposed]
            axes = template.attrs.axes
            axes = (1, 0) if axes is None else tuple(int(a) for a in axes)
        bias = None
        bias_first = False
        if self.biased in m:
            bias_first = graph.value(root.args[1]).same_as(matmul)
            raw = graph.constant(m[self.bias])
            out = weight.shape[0] if axes == (1, 0) else weight.shape[1]
            bias = last_axis_vector(raw, out) if raw is not None else None
            if bias is None or raw.ndim > 1 or raw.dtype != weight.dtype:
                return None
        return Linear(
            root=root,
            matmul=matmul,
            x=m[self.x],
            weight=weight,
            weight_axes=axes,
            weight_template=template,
            bias=bias,
            bias_first=bias_first,
        )


# --------------------------------------------------------------------------------------------
# Rewriting


# What _leafify returns as it is: anything else is bound to a variable first.
_BOUND = (relax.Var, relax.Call, relax.Tuple, relax.TupleGetItem)


@mutator
class _BindingRewriter(PyExprMutator):
    """Gives some bindings new values; nested calls in a new value become bindings before it.

    A sub-expression object shared by several new values is emitted once (the first time it is
    needed) and reused, which lets a merged matmul feed several bindings through its slices.
    """

    def __init__(self, replacements: dict[relax.Var, relax.Expr]):
        super().__init__()
        self.replacements = replacements
        self.emitted: dict[int, relax.Expr] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self.replacements.get(binding.var)
        if new is None:
            super().visit_var_binding_(binding)
            return
        value = self._leafify(new, top=True)
        dataflow_var = isinstance(binding.var, relax.DataflowVar)
        if isinstance(value, relax.Var) and dataflow_var:
            self.set_var_remap(binding.var, value)  # an alias: its users read the value instead
            return
        if dataflow_var or not self.builder_.current_block_is_dataflow():
            var = self.builder_.emit(value, binding.var.name)
        else:
            var = self.builder_.emit_output(value, binding.var.name)
        self.set_var_remap(binding.var, var)

    def _leafify(self, expr: relax.Expr, top: bool = False) -> relax.Expr:
        key = expr.__chandle__()
        if key in self.emitted:
            return self.emitted[key]
        if isinstance(expr, relax.Var):
            return self.visit_expr(expr)
        if isinstance(expr, relax.Call):
            new = relax.Call(
                expr.op, [self._leafify(a) for a in expr.args], expr.attrs, expr.ty_args
            )
        elif isinstance(expr, relax.Tuple):
            new = relax.Tuple([self._leafify(f) for f in expr.fields])
            if not any(isinstance(f, _BOUND) for f in expr.fields):
                return new  # a tuple of values (a slice's begin/end) stays an argument
        elif isinstance(expr, relax.TupleGetItem):
            new = relax.TupleGetItem(self._leafify(expr.tuple_value), expr.index)
        else:
            return expr  # constants, shapes, prim values
        if top:
            return new
        var = self.builder_.emit(new)
        self.emitted[key] = var
        return var


def rewrite_bindings(
    func: relax.Function, replacements: dict[relax.Var, relax.Expr]
) -> relax.Function:
    """``func`` with the given bindings' values replaced, dead bindings removed."""
    new_func = _BindingRewriter(replacements).visit_expr(func)
    return relax.analysis.remove_all_unused(new_func)


# --------------------------------------------------------------------------------------------
# Reporting

_MATMUL_OPS = frozenset({"relax.matmul", "relax.nn.attention", "relax.nn.attention_bias"})


def fused_attention_calls(mod: tvm.IRModule, func_name: str = "main") -> list[relax.Call]:
    """The ``call_tir`` calls of fused attention kernels (made by FuseAttention) in ``func_name``."""
    from .attention_kernel import KIND, KIND_ATTR

    found: list[relax.Call] = []

    def visit(expr: relax.Expr) -> None:
        if (
            isinstance(expr, relax.Call)
            and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == "relax.call_tir"
        ):
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
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            count += int(expr.op.name in _MATMUL_OPS)

    relax.analysis.post_order_visit(mod[func_name], visit)
    return count + len(fused_attention_calls(mod, func_name))
