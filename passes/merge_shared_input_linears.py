"""Merge linears that read the same tensor into one wider matmul and column slices.

In a default MobileBERT layer the bottleneck input, the bottleneck attention and the value
(512 → 128 each) read the layer input, and query and key (128 → 128 each) read the shared
bottleneck. Each group becomes one matmul over the concatenated weights::

    q = add(b_q, matmul(reshape(h, s), permute_dims(W_q)))
    k = add(b_k, matmul(reshape(h, s), permute_dims(W_k)))
  → qk = add(concat(b_q, b_k), matmul(reshape(h, s), permute_dims(concat(W_q, W_k))))
    q = strided_slice(qk, axes=[-1], begin=[0], end=[n_q])
    k = strided_slice(qk, axes=[-1], begin=[n_q], end=[n_q + n_k])

Slices, not one ``split``: FuseOps fuses a slice into the kernel that reads it (a head
transpose, a residual add), where a tuple-valued split stays a kernel of its own that copies
every part.

"The same tensor" is the same variable after peeling reshapes, reshaped to the same shape: the
importer reshapes the input once per linear. Whatever truly shares an input is merged, so the
variants merge too: ``key_query_shared_bottleneck=False`` gives one 512 → 512 group (bottleneck
input, query, key, value), ``use_bottleneck_attention=True`` a 128 → 384 group (query, key,
value), ``use_bottleneck=False`` a 512 → 1536 group. A linear without a bias gets zeros.

A linear is left out of its group (and the refusal says why) when its weight is not a constant
2-D matrix of the group's dtype, when its matmul has another user besides the bias add (that
user needs the matmul alone), or when it lives in another binding block than the first member.
Groups of fewer than two linears are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from mbcompile.passes.base import MobileBertPass
from mbcompile.passes.graph import Graph, call, fold_const, static_shape
from mbcompile.passes.linear import Linear, LinearPattern


@dataclass
class _Member:
    """A linear of a group, and the group's first linear in program order."""

    linear: Linear
    first: relax.Var


class MergeSharedInputLinears(MobileBertPass):
    """``linear(x, W_i, b_i) for i → slice_i(linear(x, [W_1 … W_n], [b_1 … b_n]))``."""

    name = "MergeSharedInputLinears"

    def __init__(self) -> None:
        super().__init__()
        self.linear = LinearPattern()
        self.reshape = is_op("relax.reshape")(wildcard(), wildcard())

    def find_rewrites(self, graph: Graph) -> list[dict[relax.Var, relax.Expr]]:
        """One rewrite per group of linears reading one tensor (not per binding, as the base
        class's loop goes); ``why_not`` is asked for every member."""
        found: dict[relax.Var, Linear] = {}
        for var, value in graph.bindings():
            linear = self.linear.match(graph, value)
            if linear is not None:
                found[var] = linear
        # A biased linear's matmul also matches as a linear without bias: keep the biased one.
        for linear in list(found.values()):
            if linear.root is not linear.matmul:
                found.pop(graph.var_of(linear.matmul), None)

        groups: dict[tuple, list[tuple[relax.Var, Linear]]] = {}
        for var, linear in found.items():
            key = self._input_key(graph, linear)
            if key is not None:
                groups.setdefault(key, []).append((var, linear))

        rewrites = []
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort(key=lambda member: graph.order[member[0]])
            kept = []
            for var, linear in members:
                why = self.why_not(graph, var, _Member(linear, first=members[0][0]))
                if why is None:
                    kept.append((var, linear))
                else:
                    self.refuse(var, why)
            if len(kept) >= 2:
                rewrites.append(self._merge(kept))
        return rewrites

    def _input_key(self, graph: Graph, linear: Linear) -> tuple | None:
        """What the linear reads: (source variable behind reshapes, shape read, dtype)."""
        source = linear.x
        while graph.match(self.reshape, graph.value(source)) is not None:
            source = graph.value(source).args[0]
        shape = static_shape(linear.x)
        if not isinstance(source, relax.Var) or shape is None:
            return None
        return (source, shape, linear.dtype, linear.kernel.shape[0])

    def why_not(self, graph: Graph, var: relax.Var, member: _Member) -> str | None:
        """Why the linear bound to ``var`` cannot join its group (None: it can)."""
        for inner in member.linear.intermediates:
            if graph.users(inner) > 1:
                return "the matmul inside this linear has another user besides its bias add"
        if graph.block[var] != graph.block[member.first]:
            return "this linear is in another binding block than the rest of its group"
        return None

    def _merge(self, members: list[tuple[relax.Var, Linear]]) -> dict[relax.Var, relax.Expr]:
        first = members[0][1]
        kernels = [linear.kernel for _, linear in members]
        widths = [k.shape[1] for k in kernels]
        kernel = np.concatenate(kernels, axis=1)
        dtype = first.dtype
        if all(linear.weight_axes == (1, 0) for _, linear in members):
            weight = call(first.weight_template, fold_const(kernel.T, dtype))
        else:
            weight = fold_const(kernel, dtype)
        merged: relax.Expr = call(first.matmul, first.x, weight)
        if any(linear.bias is not None for _, linear in members):
            bias = np.concatenate(
                [
                    linear.bias if linear.bias is not None else np.zeros(width, dtype)
                    for (_, linear), width in zip(members, widths)
                ]
            )
            b = fold_const(bias, dtype)
            merged = relax.op.add(b, merged) if first.bias_first else relax.op.add(merged, b)
        axis = len(static_shape(members[0][0])) - 1
        ends = [int(e) for e in np.cumsum(widths)]
        return {
            var: relax.op.strided_slice(
                merged, axes=[axis], begin=[end - width], end=[end], assume_inbound=True
            )
            for (var, _), width, end in zip(members, widths, ends)
        }
