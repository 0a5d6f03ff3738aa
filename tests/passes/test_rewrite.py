"""Applying rewrites (``passes/rewrite.py``): dead dataflow bindings go, the rest stays typed
and well formed, as TVM's ``remove_all_unused`` leaves it."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import relax as R

from mbcompile.passes.graph import Graph
from mbcompile.passes.rewrite import drop_unused, rewrite_bindings


@tvm.script.ir_module
class Dead:
    @R.function
    def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
        with R.dataflow():
            a = R.add(x, x)
            unused = R.multiply(a, a)  # nothing reads it
            also_unused = R.exp(unused)  # noqa: F841 - read only by a dead binding
            b = R.subtract(a, x)
            R.output(b)
        return b


def _names(func) -> list[str]:
    return [b.var.name for block in func.body.blocks for b in block.bindings]


def test_drop_unused_removes_dead_chains_and_keeps_the_function_typed():
    func = Dead["main"]
    dropped = drop_unused(func)
    assert _names(func) == ["a", "unused", "also_unused", "b"]
    assert _names(dropped) == ["a", "b"]
    tvm.ir.assert_structural_equal(dropped, relax.analysis.remove_all_unused(func))
    relax.analysis.well_formed(tvm.IRModule({"main": dropped}))  # raises where not


def test_a_rewrite_that_orphans_a_binding_drops_it():
    func = Dead["main"]
    graph = Graph(func)
    a, b = (v for v, _ in graph.bindings() if v.name in ("a", "b"))
    x = func.params[0]
    rewritten = rewrite_bindings(func, {b: relax.op.multiply(x, x)})  # b no longer reads a
    assert _names(rewritten) == ["b"]
    relax.analysis.well_formed(tvm.IRModule({"main": rewritten}))  # raises where not
