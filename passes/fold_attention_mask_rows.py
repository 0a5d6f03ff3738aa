"""Fold the rows of an attention mask that are the same for every query into one row.

transformers (5.x) builds the additive attention mask as a (B, 1, Sq, Sk) tensor from a key mask
and a query-side term that is constant (``padding_mask_function`` and'ed with an
``arange(Sq) >= 0`` that is always true), exported as::

    rows = bitwise_and(full((), True), greater_equal(expand_dims(arange(Sq)), 0))   # (1,1,Sq,1)
    keys = index_tensor(attention_mask, ...)                                        # (B,1,1,Sk)
    bias = where(bitwise_and(rows, keys), 0, -inf)                                  # (B,1,Sq,Sk)
    p    = softmax(add(scores, bias))

Every layer's attention then reads Sq·Sk mask values (590 KB at 384 tokens) where Sk would do.
When the bias is shown to be the same for every query, its expression is rebuilt with one
query row, the constant parts evaluated here on numpy and cut to their first row::

    bias = where(bitwise_and(const((1,1,1,1), True), keys), 0, -inf)               # (B,1,1,Sk)
    p    = softmax(add(scores, bias))

The sum broadcasts it back, so the values are the same bit for bit; ``FuseAttention``'s kernel
then reads a row of Sk values per head (one bf16 encoder at 384 tokens on a Zen 4, the
attention kernel alone with caches flushed: 0.70 → 0.63 ms, medians; ``bench/`` has the model).

The proof walks the bias's expression through bindings: a tensor of one query row (or of rank
below 2) is fine as it is; an expression of constants only (the ops of ``_EVALUATED``) is
evaluated and must have equal rows; an elementwise op (``_ELEMENTWISE``: arithmetic, compare,
logic, ``where``, ``astype``) or a ``broadcast_to`` is fine when its operands are. It bails (``refusals`` says why) on
anything else: a mask that depends on the query (causal, or a 4-D mask the user passes), or an
op it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import Graph, call, is_call, shape_values, static_shape

_BINARY = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.maximum": np.maximum,
    "relax.minimum": np.minimum,
    "relax.greater": np.greater,
    "relax.greater_equal": np.greater_equal,
    "relax.less": np.less,
    "relax.less_equal": np.less_equal,
    "relax.equal": np.equal,
    "relax.not_equal": np.not_equal,
    "relax.bitwise_and": np.bitwise_and,
    "relax.bitwise_or": np.bitwise_or,
    "relax.logical_and": np.logical_and,
    "relax.logical_or": np.logical_or,
}
_UNARY = {
    "relax.logical_not": np.logical_not,
    "relax.bitwise_not": np.invert,
    "relax.negative": np.negative,
}
# Elementwise: the value at a position reads only the operands' values there (broadcast).
_ELEMENTWISE = frozenset([*_BINARY, *_UNARY, "relax.where", "relax.astype"])
# Evaluated on numpy when every leaf is a constant: elementwise ops and what builds the masks.
_EVALUATED = frozenset(
    [
        *_ELEMENTWISE,
        "relax.arange",
        "relax.full",
        "relax.expand_dims",
        "relax.reshape",
        "relax.broadcast_to",
        "relax.permute_dims",
    ]
)
_QUERY_AXIS = -2  # (…, Sq, Sk): the rows of the scores


@dataclass
class _Sum:
    """A matched ``softmax(add(·, ·))`` and, once ``why_not`` accepts it, which operand is the
    mask (a pattern of ``found``) and the mask with one query row."""

    found: dict
    mask: object = None
    folded: relax.Expr | None = None


class FoldAttentionMaskRows(MobileBertPass):
    """``softmax(add(scores, bias(B, 1, Sq, Sk)))`` → ``softmax(add(scores, bias(B, 1, 1, Sk)))``
    when every query row of the bias is the same."""

    name = "FoldAttentionMaskRows"

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = wildcard(), wildcard()
        self.biased = is_op("relax.add")(self.left, self.right)
        self.pattern = is_op("relax.nn.softmax")(self.biased)

    def find_rewrites(self, graph: Graph) -> list[dict[relax.Var, relax.Expr]]:
        # Per read of the function: values evaluated, expressions folded (one object per
        # bias, so that the layers sharing a mask share its folded form too).
        self._values: dict[relax.Expr, np.ndarray | None] = {}
        self._folded: dict[relax.Expr, tuple[relax.Expr | None, str]] = {}
        return super().find_rewrites(graph)

    def match(self, graph: Graph, var: relax.Var, value: relax.Expr) -> _Sum | None:
        m = super().match(graph, var, value)
        if m is None:
            return None
        shapes = [static_shape(m[p]) for p in (self.left, self.right)]
        if any(s is None or len(s) < 2 for s in shapes):
            return None
        if any(s[_QUERY_AXIS] == 1 for s in shapes):
            return None  # a mask of one row already (or scores of one row: nothing to fold)
        return _Sum(m)

    def why_not(self, graph: Graph, var: relax.Var, match: _Sum) -> str | None:
        # Both operands have every query row (``match``): either may be the mask.
        why = ""
        for mask in (self.right, self.left):
            folded, reason = self._fold(graph, match.found[mask])
            why = why or reason
            if folded is not None:
                match.mask, match.folded = mask, folded
                return None
        return why

    def rewrite(self, graph: Graph, var: relax.Var, match: _Sum) -> dict[relax.Var, relax.Expr]:
        m = match.found
        biased = m[self.biased]
        if match.mask is self.right:
            args = [m[self.left], match.folded]
        else:
            args = [match.folded, m[self.right]]
        target = graph.var_of(biased)
        if target is None:  # the sum is nested in the softmax's value: rebuild both
            return {var: call(graph.value(var), call(biased, *args))}
        return {target: call(biased, *args)}

    def _fold(self, graph: Graph, expr: relax.Expr) -> tuple[relax.Expr | None, str]:
        """(``expr`` with one query row, "") when every query row of it is the same, else
        (None, why not)."""
        key = _key(graph, expr)
        if key not in self._folded:
            self._folded[key] = self._fold_uncached(graph, expr)
        return self._folded[key]

    def _fold_uncached(self, graph: Graph, expr: relax.Expr) -> tuple[relax.Expr | None, str]:
        shape = static_shape(expr)
        if shape is None:
            return None, f"{graph.name(expr)} has no static shape"
        if len(shape) < 2 or shape[_QUERY_AXIS] == 1:
            return expr, ""
        value = self._evaluate(graph, expr)
        if value is not None:
            first = value[..., :1, :]
            same = np.broadcast_to(first, value.shape) == value
            if value.dtype.kind == "f":
                same |= np.isnan(value) & np.isnan(np.broadcast_to(first, value.shape))
            if not same.all():
                return None, "the mask's constant part differs between query rows"
            return relax.const(np.ascontiguousarray(first), str(value.dtype)), ""
        inner = graph.value(expr)
        if is_call(inner, "relax.broadcast_to"):  # to the shape with one query row
            folded, why = self._fold(graph, inner.args[0])
            dims = list(shape)
            dims[_QUERY_AXIS] = 1
            return (None, why) if folded is None else (relax.op.broadcast_to(folded, dims), "")
        if not is_call(inner, *_ELEMENTWISE):
            op = getattr(getattr(inner, "op", None), "name", type(inner).__name__)
            return None, f"cannot show the mask is the same for every query: {op} in it"
        args = []
        for arg in inner.args:
            if not isinstance(arg, relax.Expr) or not isinstance(arg.ty, relax.TensorType):
                args.append(arg)
                continue
            folded, why = self._fold(graph, arg)
            if folded is None:
                return None, why
            args.append(folded)
        return call(inner, *args), ""

    def _evaluate(self, graph: Graph, expr: relax.Expr) -> np.ndarray | None:
        """The value of an expression of constants only (the ops of ``_EVALUATED``), else
        None."""
        key = _key(graph, expr)
        if key not in self._values:
            try:
                self._values[key] = _evaluate(graph, expr, self._evaluate)
            except (TypeError, ValueError, AttributeError):
                self._values[key] = None  # an attribute or shape this evaluator does not read
        return self._values[key]


def _evaluate(graph: Graph, expr: relax.Expr, recurse) -> np.ndarray | None:
    constant = graph.constant(expr)
    if constant is not None:
        return constant
    value = graph.value(expr)
    if not is_call(value, *_EVALUATED):
        return None
    op = value.op.name
    if op == "relax.arange":
        start, end, step = (_int(a) for a in value.args)
        return np.arange(start, end, step, dtype=str(value.attrs.dtype))
    if op == "relax.full":
        fill = recurse(graph, value.args[1])
        dims = shape_values(value.args[0])
        if fill is None or dims is None:
            return None
        return np.full(dims, fill.reshape(()), dtype=str(value.attrs.dtype))
    tensors = []
    for arg in value.args[: 3 if op == "relax.where" else 2 if op in _BINARY else 1]:
        arg_value = recurse(graph, arg)
        if arg_value is None:
            return None
        tensors.append(arg_value)
    if op in _BINARY:
        out = _BINARY[op](*tensors)
        return out.astype(_dtype(value)) if out.dtype != np.dtype(_dtype(value)) else out
    if op in _UNARY:
        return _UNARY[op](tensors[0])
    if op == "relax.where":
        return np.where(*tensors).astype(_dtype(value))
    (x,) = tensors
    if op == "relax.astype":
        return x.astype(str(value.attrs.dtype))
    if op == "relax.expand_dims":
        return np.expand_dims(x, tuple(int(a) for a in value.attrs.axis))
    if op in ("relax.reshape", "relax.broadcast_to"):
        dims = shape_values(value.args[1])
        if dims is None:
            return None
        return x.reshape(dims) if op == "relax.reshape" else np.broadcast_to(x, dims)
    axes = value.attrs.axes
    return np.transpose(x, None if axes is None else [int(a) for a in axes])


def _key(graph: Graph, expr: relax.Expr) -> relax.Expr:
    """The variable bound to ``expr``'s value (the same for every alias), else ``expr``."""
    var = graph.var_of(graph.value(expr))
    return expr if var is None else var


def _int(value) -> int:
    if isinstance(value, getattr(relax, "PrimValue", ())):
        value = value.value
    if isinstance(value, tvm.tirx.IntImm):
        return int(value.value)
    raise TypeError(f"not a constant integer: {value}")


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)
