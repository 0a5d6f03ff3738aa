"""Compute vocabulary logits only at the masked positions (MaskedLM and PreTraining heads).

The MLM head (transform: linear, activation, norm; then the projection onto the vocabulary) is
per position: its value at row ``(b, s)`` reads row ``(b, s)`` of the encoder output only. So
it can run on the rows that matter, gathered, instead of all ``B·S``; at seq 128 with 30522
words the projection is 4 GFLOP of MaskedLM's 9.5. With ``K = max_masked``::

    logits = reshape(add(matmul(transform(reshape(h, [B·S, H])), W_vocab), b), [B, S, V])
    return (logits, ...)

  → hit   = input_ids == mask_token_id                              (B, S)
    found = positions of the first K hits of each row, 0 past the last; found_ok: a hit exists
    pos, ok = masked_positions (B, K) where its row asks for any (≥ 0), else found, found_ok
    rows  = take(reshape(h, [B·S, H]), b·S + pos, axis=0)           (B·K, H)
    logits' = where(ok, reshape(add(matmul(transform(rows), W_vocab), b), [B, K, V]), NaN)
    return (logits', ..., where(ok, pos, -1))

``main`` gains a last parameter ``masked_positions`` (B, K) int64: a row with any entry ≥ 0 asks
for those positions (−1: no position; the slot's logits are NaN); a row of −1s takes its first K
``[MASK]`` tokens (more are dropped; fewer leave NaN slots). The positions used (−1 where
none) are appended as the last output. Padded slots gather row 0 (a valid index); positions
are clipped into ``[0, S)``.

What is matched (ops, shapes and constants, never names): an output of ``main`` of shape
``(B, S, V)`` whose value is a chain of per-position ops (a linear by a constant weight
expression, an elementwise op with a constant along the last axis, an activation, a layer
norm over the last axis, a reshape between ``[B, S, C]`` and ``[B·S, C]``) containing a matmul
onto ``V`` columns, where ``V`` is the row count of the constant table that the ``(B, S)``
integer parameter (the token ids) gathers from. The chain is followed back while each value has
no other user; where it stops (a value another op also reads, like the encoder output that
PreTraining's pooler reads too, or a residual add) the rows are gathered.

It bails (``refusals`` says why) when no parameter gathers from a table of ``V`` rows, when a
candidate output's chain holds no projection onto the vocabulary (e.g. the projection's output
has another user), or when the gathered tensor is not laid out as rows ``[B, S, C]`` or
``[B·S, C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from mbcompile.errors import OptionError
from mbcompile.options import DEFAULT_MASK_TOKEN_ID
from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import (
    Graph,
    call,
    is_call,
    is_constant_expr,
    last_axis_vector,
    static_shape,
)
from mbcompile.passes.rewrite import rewrite_bindings

# DEFAULT_MASK_TOKEN_ID (options.py): [MASK] of the uncased vocabulary; pass the tokenizer's otherwise.
DEFAULT_MAX_MASKED = 8
POSITIONS_PARAM = "masked_positions"

_UNARY = frozenset(
    {
        "relax.nn.relu",
        "relax.nn.gelu",
        "relax.nn.gelu_tanh",
        "relax.nn.silu",
        "relax.tanh",
        "relax.sigmoid",
        "relax.erf",
        "relax.exp",
        "relax.sqrt",
        "relax.rsqrt",
        "relax.negative",
        "relax.square",
    }
)
_BINARY = frozenset(
    {
        "relax.add",
        "relax.subtract",
        "relax.multiply",
        "relax.divide",
        "relax.power",
        "relax.maximum",
        "relax.minimum",
    }
)


@dataclass
class _Plan:
    output: int  # index of the logits in main's outputs
    chain: list[relax.Var]  # the per-position bindings, output first
    boundary: relax.Expr  # the tensor whose rows are gathered
    ids: relax.Var  # the token ids parameter
    batch: int
    seq: int
    vocab: int


class PruneMaskedLMHead(MobileBertPass):
    """The MLM transform and vocabulary projection run on the masked rows only."""

    name = "PruneMaskedLMHead"

    def __init__(
        self, max_masked: int = DEFAULT_MAX_MASKED, mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    ):
        super().__init__()
        if not isinstance(max_masked, int) or max_masked < 1:
            raise OptionError(f"max_masked must be a positive integer, got {max_masked!r}")
        if not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise OptionError(f"mask_token_id must be a token id (≥ 0), got {mask_token_id!r}")
        self.max_masked = max_masked
        self.mask_token_id = mask_token_id
        self.pruned_output: int | None = None  # which output of main became the pruned logits

    def __repr__(self) -> str:
        return f"{self.name}(max_masked={self.max_masked}, mask_token_id={self.mask_token_id})"

    # -- finding the head -----------------------------------------------------------------

    def rewrite_function(self, func: relax.Function) -> tuple[relax.Function, int]:
        """One rewrite at most: the new function has another signature, so no second round."""
        graph = Graph(func)
        plan = self.why_not(graph)
        if isinstance(plan, str):
            self.refuse(None, plan)
            return func, 0
        if plan is None:
            return func, 0
        self.pruned_output = plan.output
        return self._rewrite(graph, plan), 1

    def refuse(self, var, why: str) -> None:
        """Refusals here are about ``main``'s outputs as a whole; they name what they need."""
        if why not in self.refusals:
            self.refusals.append(why)

    def why_not(self, graph: Graph) -> _Plan | str | None:
        """The rewrite plan, or why the head cannot be pruned (None: no candidate at all)."""
        func = graph.func
        tables = self._token_tables(graph)
        result = graph.value(func.body.body)
        if not isinstance(func.body.body, relax.Var) or not isinstance(result, relax.Tuple):
            return "main does not return a bound tuple of outputs (as the importer writes it)"
        reasons = []
        for index, field in enumerate(result.fields):
            shape = static_shape(field)
            if shape is None or len(shape) != 3:
                continue
            for ids, vocab in tables:
                batch, seq = static_shape(ids)
                if shape != (batch, seq, vocab):
                    continue
                if self.max_masked > seq:
                    return f"max_masked={self.max_masked} exceeds the sequence length {seq}"
                found = self._chain(graph, field, batch, seq, vocab)
                if isinstance(found, str):
                    reasons.append(f"output {index}: {found}")
                    continue
                chain, boundary = found
                return _Plan(index, chain, boundary, ids, batch, seq, vocab)
        if reasons:
            return "; ".join(reasons)
        if not tables:
            params = ", ".join(p.name for p in func.params)
            return f"no integer (batch, seq) parameter of ({params}) gathers from a constant table"
        return None

    def _token_tables(self, graph: Graph) -> list[tuple[relax.Var, int]]:
        """(token ids parameter, rows of the constant table it gathers from) pairs."""
        params = set(graph.func.params)
        found = []
        for _, value in graph.bindings():
            if not is_call(value, "relax.take"):
                continue
            table = graph.constant(value.args[0])
            if table is None or table.ndim != 2:
                continue
            source = value.args[1]
            while is_call(graph.value(source), "relax.astype", "relax.reshape"):
                source = graph.value(source).args[0]
            shape = static_shape(source) if source in params else None
            if shape is None or len(shape) != 2 or not str(source.ty.dtype).startswith("int"):
                continue
            if (source, table.shape[0]) not in found:
                found.append((source, int(table.shape[0])))
        return found

    def _chain(
        self, graph: Graph, field: relax.Expr, batch: int, seq: int, vocab: int
    ) -> tuple[list[relax.Expr], relax.Expr] | str:
        """The per-position chain behind an output (output first) and the tensor it starts
        from, or why it is no vocabulary projection."""
        chain = []
        projection = False
        current = field
        while True:
            if not _is_rows(static_shape(current), batch, seq):
                return f"{graph.name(current)} is not laid out as rows [B, S, C] or [B·S, C]"
            value = graph.value(current)
            operand = self._row_operand(graph, value)
            if operand is None:
                break
            chain.append(current)
            if is_call(value, "relax.matmul") and static_shape(current)[-1] == vocab:
                projection = True
            if isinstance(graph.value(operand), relax.Var) or graph.users(operand) > 1:
                current = operand
                break
            current = operand
        if not projection:
            where = graph.name(current)
            if graph.users(current) > 1 and chain:
                return (
                    f"the chain of per-position ops stops at {where}, which has another user, "
                    "before any projection onto the vocabulary"
                )
            return f"no per-position projection onto the vocabulary: the chain stops at {where}"
        if not _is_rows(static_shape(current), batch, seq):
            return f"the gathered tensor {graph.name(current)} is not laid out as rows"
        return chain, current

    def _row_operand(self, graph: Graph, value: relax.Expr) -> relax.Expr | None:
        """The one row tensor a per-position op reads, or None if ``value`` is none."""
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        name = value.op.name
        out = static_shape(value)
        if out is None:
            return None
        if name == "relax.reshape":
            inner = static_shape(value.args[0])
            if inner is None or inner[-1] != out[-1] or math.prod(inner) != math.prod(out):
                return None
            return value.args[0]
        if name == "relax.matmul":
            weight = static_shape(value.args[1])
            if weight is None or len(weight) != 2 or not is_constant_expr(graph, value.args[1]):
                return None
            return value.args[0]
        if name in _UNARY:
            return value.args[0]
        if name in _BINARY:
            consts = [graph.constant(a) for a in value.args]
            if sum(c is not None for c in consts) != 1:
                return None
            const = next(c for c in consts if c is not None)
            if last_axis_vector(const, out[-1]) is None or const.ndim > len(out):
                return None
            operand = value.args[0] if consts[1] is not None else value.args[1]
            return operand if static_shape(operand) == out else None
        if name == "relax.nn.layer_norm":
            axes = [int(a) for a in value.attrs.axes]
            if axes not in ([-1], [len(out) - 1]):
                return None
            for param in value.args[1:]:
                const = graph.constant(param)
                if const is None or const.ndim != 1:
                    return None
            return value.args[0]
        return None

    # -- rewriting ------------------------------------------------------------------------

    def _rewrite(self, graph: Graph, plan: _Plan) -> relax.Function:
        func = graph.func
        b, s, k = plan.batch, plan.seq, self.max_masked
        requested = relax.Var(POSITIONS_PARAM, relax.TensorType((b, k), "int64"))
        pos, ok = self._positions(plan.ids, requested, b, s, k)

        # Gather the rows: flat index b·S + pos into the [B·S, C] view of the boundary.
        channels = static_shape(plan.boundary)[-1]
        rows2d = plan.boundary
        if len(static_shape(plan.boundary)) != 2:
            rows2d = relax.op.reshape(plan.boundary, (b * s, channels))
        offsets = relax.const(np.arange(b, dtype="int64").reshape(b, 1) * s, "int64")
        flat = relax.op.reshape(relax.op.add(pos, offsets), (b * k,))
        out: relax.Expr = relax.op.take(rows2d, flat, axis=0, mode="clip")

        # The chain, innermost first, on [B·K, C] rows.
        for var in reversed(plan.chain):
            out = self._on_rows(graph, graph.value(var), out)
        logits = relax.op.reshape(out, (b, k, plan.vocab))
        nan = relax.const(float("nan"), str(plan.boundary.ty.dtype))
        logits = relax.op.where(relax.op.expand_dims(ok, -1), logits, nan)
        positions = relax.op.where(ok, pos, relax.const(-1, "int64"))

        fields = list(graph.value(func.body.body).fields)
        fields[plan.output] = logits
        new = rewrite_bindings(func, {func.body.body: relax.Tuple([*fields, positions])})
        return relax.Function(
            [*func.params, requested], new.body, None, func.is_pure, func.attrs, func.span
        )

    def _positions(
        self, ids: relax.Var, requested: relax.Var, b: int, s: int, k: int
    ) -> tuple[relax.Expr, relax.Expr]:
        """(positions (B, K) int64 in [0, S), valid (B, K) bool) per the docstring."""
        op = relax.op
        hit = op.equal(ids, relax.const(self.mask_token_id, str(ids.ty.dtype)))  # (B, S)
        hits = op.astype(hit, "int64")
        count = op.cumsum(hits, axis=1)  # hits up to and including s
        slot = relax.const(np.arange(1, k + 1, dtype="int64").reshape(1, k, 1), "int64")
        # is[b, j, s]: s is the j-th hit of row b
        is_slot = op.logical_and(
            op.expand_dims(hit, 1), op.equal(op.expand_dims(count, 1), slot)
        )  # (B, K, S)
        index = relax.const(np.arange(s, dtype="int64").reshape(1, 1, s), "int64")
        zero = relax.const(0, "int64")
        found = op.sum(op.where(is_slot, index, zero), axis=2)  # (B, K), 0 without a hit
        total = op.sum(hits, axis=1, keepdims=True)  # (B, 1)
        found_ok = op.less(relax.const(np.arange(k, dtype="int64").reshape(1, k), "int64"), total)

        asked = op.greater_equal(requested, zero)  # (B, K)
        explicit = op.greater(op.max(op.astype(asked, "int64"), axis=1, keepdims=True), zero)
        chosen = op.minimum(op.maximum(requested, zero), relax.const(s - 1, "int64"))
        pos = op.where(explicit, chosen, found)
        ok = op.where(explicit, asked, found_ok)
        return pos, ok

    def _on_rows(self, graph: Graph, value: relax.Call, rows: relax.Expr) -> relax.Expr:
        """``value``'s op applied to 2-D ``rows`` instead of its row operand."""
        name = value.op.name
        if name == "relax.reshape":
            return rows  # rows stay [B·K, C]
        if name == "relax.matmul":
            return call(value, rows, value.args[1])
        if name in _UNARY:
            return call(value, rows)
        if name in _BINARY:
            args = []
            for arg in value.args:
                const = graph.constant(arg)
                if const is None:
                    args.append(rows)
                elif const.ndim > 1:  # (1, 1, C) would broadcast the rows back to 3-D
                    args.append(relax.const(const.reshape(const.shape[-1:]), str(const.dtype)))
                else:
                    args.append(arg)
            return call(value, *args)
        attrs = value.attrs  # relax.nn.layer_norm
        return relax.op.nn.layer_norm(
            rows,
            value.args[1],
            value.args[2],
            axes=[-1],
            epsilon=float(attrs.epsilon),
            center=bool(attrs.center),
            scale=bool(attrs.scale),
        )


def _is_rows(shape: tuple[int, ...] | None, batch: int, seq: int) -> bool:
    """``[B, S, C]`` or ``[B·S, C]``."""
    if shape is None:
        return False
    return shape[:-1] in ((batch, seq), (batch * seq,))
