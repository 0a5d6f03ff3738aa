"""Fold MobileBERT's NoNorm (``x * γ + β``) into the linears and embedding tables before it.

HF MobileBERT stores NoNorm under the attribute name ``LayerNorm``; the importer emits it as an
``R.multiply`` by the constant γ and an ``R.add`` of the constant β, both over the last axis.
When the normalised tensor is a sum of terms that are each a linear with constant weights or a
gather from a constant table (reshapes that keep the last axis are allowed in between), γ scales
every term and β joins one bias::

    after a linear (the bottleneck input and attention, 512 → 128):
        add(multiply(reshape(add(b, matmul(x, permute_dims(W)))), γ), β)
      → reshape(add(b·γ + β, matmul(x, permute_dims(W·γ))))

    after the embedding sum:
        add(multiply(add(add(linear(trigram, W, b), take(P, pos)), take(T, types)), γ), β)
      → add(add(linear(trigram, W·γ, b·γ + β), take(P·γ, pos)), take(T·γ, types))

A term may also be a constant (an ONNX export's position embeddings, folded at a static
length into one ``(1, S, channels)`` tensor): it becomes the constant ``C·γ``.

Folding is done in float64 on numpy and cast back to the weights' dtype.

It bails (and says why in ``refusals``) unless γ and β are constants of the tensor's dtype that
broadcast along the last axis only; unless every term is a linear with constant weights or a
``take(table, ids, axis=0)`` from a constant 2-D table, or a constant; when a reshape on the way changes the last
axis; and when any intermediate (the scaled tensor, a partial sum, a term) has another user, since
that user still needs the unfolded value.

After a residual add one term is the layer's input, which no weight produces: that NoNorm stays
for kernel fusion. ``RemoveLinearReshapes`` takes away the reshape between the producing linear
and the add, so operator fusion makes the add and the NoNorm epilogues of that linear's matmul
kernel (no kernel of their own). The one exception MobileBERT has is the attention residual: its
other term is the bottleneck input, a linear whose own NoNorm is folded in the first round, so
the next round folds the residual NoNorm into both linears. Later residuals read a tensor with
two users and stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import (
    Graph,
    call,
    dtype_of,
    fold_const,
    last_axis_vector,
    shape_values,
    static_shape,
)
from mbcompile.passes.linear import Linear, LinearPattern


@dataclass
class _Term:
    """One summand: a linear, a table gather or a constant, seen through reshapes that keep
    the last axis."""

    reshapes: list[relax.Call]  # outermost first
    linear: Linear | None = None
    gather: relax.Call | None = None
    table: np.ndarray | None = None  # the gather's table, or the constant itself

    def rebuild(self, gamma: np.ndarray, beta: np.ndarray | None) -> relax.Expr:
        g = gamma.astype(np.float64)
        if self.linear is not None:
            lin = self.linear
            bias = None if lin.bias is None else lin.bias.astype(np.float64) * g
            if beta is not None:
                bias = beta.astype(np.float64) if bias is None else bias + beta
            out = lin.rebuild(lin.kernel.astype(np.float64) * g, bias)
        else:
            table = self.table.astype(np.float64) * g
            if beta is not None:
                table = table + beta.astype(np.float64)
            out = fold_const(table, str(self.table.dtype))
            if self.gather is not None:
                out = call(self.gather, out, self.gather.args[1])
        for reshape in reversed(self.reshapes):
            out = call(reshape, out, reshape.args[1])
        return out


@dataclass
class _NoNorm:
    """A matched ``x * γ + β`` and, once ``why_not`` accepts it, the terms of the sum ``x``."""

    found: dict
    terms: list[_Term] = field(default_factory=list)


class FoldNoNorm(MobileBertPass):
    """``(Σ terms) * γ + β → Σ terms'`` with γ, β folded into weights, biases and tables."""

    name = "FoldNoNorm"

    def __init__(self) -> None:
        super().__init__()
        self.x = wildcard()
        self.gamma = is_const()
        self.beta = is_const()
        self.scaled = is_op("relax.multiply")(self.x, self.gamma)
        self.pattern = is_op("relax.add")(self.scaled, self.beta)
        self.sum = is_op("relax.add")(wildcard(), wildcard())
        self.reshape = is_op("relax.reshape")(wildcard(), wildcard())
        self.gather = is_op("relax.take")(is_const(), wildcard())
        self.linear = LinearPattern()

    def match(self, graph: Graph, var: relax.Var, value: relax.Expr) -> _NoNorm | None:
        found = super().match(graph, var, value)
        return None if found is None else _NoNorm(found)

    def why_not(self, graph: Graph, var: relax.Var, match: _NoNorm) -> str | None:
        """Why this NoNorm cannot fold (None: it can); fills ``match.terms`` as it checks them."""
        m = match.found
        x = m[self.x]
        shape = static_shape(x)
        if shape is None or not shape:
            return "the normalised tensor has no static shape"
        dtype = dtype_of(x)
        channels = shape[-1]
        for role, pat in (("γ", self.gamma), ("β", self.beta)):
            value = graph.constant(m[pat])
            if str(value.dtype) != dtype:
                return f"{role} is {value.dtype}, the tensor is {dtype}"
            if last_axis_vector(value, channels) is None:
                return f"{role} of shape {value.shape} does not broadcast along the last axis only"
        if graph.users(m[self.scaled]) > 1:
            return "the scaled tensor x·γ has another user"
        return self._collect(graph, x, channels, match.terms)

    def rewrite(self, graph: Graph, var: relax.Var, match: _NoNorm) -> dict[relax.Var, relax.Expr]:
        channels = static_shape(var)[-1]
        gamma = last_axis_vector(graph.constant(match.found[self.gamma]), channels)
        beta = last_axis_vector(graph.constant(match.found[self.beta]), channels)
        # β joins one bias: a linear's if there is one, else the first table.
        terms = match.terms
        home = next((t for t in terms if t.linear is not None), terms[0])
        new = None
        for term in terms:
            out = term.rebuild(gamma, beta if term is home else None)
            new = out if new is None else relax.op.add(new, out)
        return {var: new}

    def _collect(
        self, graph: Graph, expr: relax.Expr, channels: int, terms: list[_Term]
    ) -> str | None:
        name = graph.name(expr)
        value = graph.value(expr)
        constant = graph.constant(expr)
        if constant is not None:
            if constant.ndim == 0 or constant.shape[-1] != channels:
                return f"the constant term {name} is not over the normalised channels"
            if str(constant.dtype) != dtype_of(expr):
                return f"the constant term {name} is {constant.dtype}"
            terms.append(_Term([], table=constant))
            return None
        if isinstance(value, relax.Var):
            return f"{name} is a function input (a residual: left for kernel fusion)"
        if graph.users(expr) > 1:
            return f"the intermediate {name} has another user"
        linear = self.linear.match(graph, value)
        if linear is None and graph.match(self.sum, value) is not None:
            for operand in value.args:
                why = self._collect(graph, operand, channels, terms)
                if why is not None:
                    return why
            return None
        reshapes = []
        while linear is None and graph.match(self.reshape, value) is not None:
            target = shape_values(value.args[1])
            if target is None or not target or target[-1] != channels:
                return f"a reshape on the way to {name} changes the last axis"
            reshapes.append(value)
            inner = value.args[0]
            if graph.users(inner) > 1:
                return f"the intermediate {graph.name(inner)} has another user"
            value = graph.value(inner)
            linear = self.linear.match(graph, value)
        if linear is not None:
            if linear.out_features != channels or str(linear.weight.dtype) != dtype_of(expr):
                return f"the linear behind {name} does not produce the normalised channels"
            for inner in linear.intermediates:
                if graph.users(inner) > 1:
                    return f"the matmul inside the linear behind {name} has another user"
            terms.append(_Term(reshapes, linear=linear))
            return None
        if graph.match(self.gather, value) is not None:
            table = graph.constant(value.args[0])
            axis = value.attrs.axis
            if axis is None or int(axis) != 0 or table.ndim != 2 or table.shape[1] != channels:
                return f"{name} is a gather, but not of rows of a (vocab, channels) table"
            if str(table.dtype) != dtype_of(expr):
                return f"the table behind {name} is {table.dtype}"
            terms.append(_Term(reshapes, gather=value, table=table))
            return None
        return (
            f"{name} is not a linear with constant weights or a gather from a constant table "
            "(a residual input: left for kernel fusion)"
        )
