"""Linears as the importer writes them: ``matmul(x, permute_dims(W) | W) (+ b)``, W and b constant.

torch.export writes a linear on a batched non-contiguous view as a batched matmul by the weight
broadcast over the batch, ``matmul(x, broadcast_to(permute_dims(W), (B, K, N)))``: matched too,
and rebuilt without the broadcast (Relax's matmul broadcasts a 2-D right operand).

:class:`LinearPattern` (a ``tvm.relax.dpl`` pattern built once) finds one and returns a
:class:`Linear`, which knows its kernel as ``(in, out)`` and rebuilds itself, in the same form,
around a new kernel and bias. ``FoldNoNorm``, ``FoldAttentionScale`` and
``MergeSharedInputLinears`` rewrite linears through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from mbcompile.passes.graph import Graph, call, fold_const, last_axis_vector, static_shape


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
        operand = self.transposed | self.weight
        self.broadcast = is_op("relax.broadcast_to")(operand, wildcard())
        self.matmul = is_op("relax.matmul")(self.x, self.broadcast | operand)
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
        if self.broadcast in m:  # only over x's batch: the product's shape stays
            x_shape, to = static_shape(m[self.x]), static_shape(m[self.broadcast])
            if x_shape is None or to is None or to[:-2] != x_shape[:-2] or len(to) < 3:
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
