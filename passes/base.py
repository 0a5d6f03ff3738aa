"""The interface every MobileBERT pass implements, its match → refuse → rewrite loop, the registry.

A pass is an object called on an ``IRModule`` that returns the rewritten module and how many
times it fired (0 means the very same module came back). For each binding of a function the
default :meth:`MobileBertPass.find_rewrites` asks the pass three questions, in order:

1. :meth:`~MobileBertPass.match`: does the binding have the pass's form? (by default its
   ``tvm.relax.dpl`` pattern, built once in ``__init__``, looked for through bindings);
2. :meth:`~MobileBertPass.why_not`: why it may not be rewritten, a reason kept in
   :attr:`~MobileBertPass.refusals` (None: it may);
3. :meth:`~MobileBertPass.rewrite`: the new values of the bindings it changes.

Every new value computes what the old one did, so a round's rewrites are applied together by
``rewrite.rewrite_bindings`` and dead bindings are dropped afterwards. The invariants a pass may
rely on are in ``passes/README.md``; reading the graph is ``graph.py``, linears ``linear.py``.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern

from mbcompile.passes.graph import Graph
from mbcompile.passes.rewrite import rewrite_bindings

# How often a pass re-reads the function after rewriting it: a rewrite can expose another
# (a permute chain collapses one link per round, a folded NoNorm turns a residual into a sum
# of linears). Every pass reaches its fixed point on MobileBERT in two or three rounds.
MAX_ROUNDS = 8

_REGISTRY: dict[str, type[MobileBertPass]] = {}


# The Graph of each function as a pass left it: the pass's last round read it, and the next
# pass's first round reads that same function (the default passes on the default model, 8
# lengths, built 136 Graphs of ~25 ms each, 48 of them again for a function just read). A
# Graph is only read by the passes; ``compiler.prepare`` forgets them after its passes.
_GRAPHS: dict[int, tuple[relax.Function, Graph]] = {}
_GRAPHS_MAX = 16  # a module holds one function per compiled length (8 by default)
_GRAPHS_LOCK = threading.Lock()


def forget_graphs() -> None:
    """Drop the kept Graphs (and the functions, weights and all, that they hold)."""
    with _GRAPHS_LOCK:
        _GRAPHS.clear()


def graph_of(func: relax.Function) -> Graph:
    """``Graph(func)``, the kept one while ``func`` is the very function it was built for."""
    with _GRAPHS_LOCK:
        cached = _GRAPHS.get(func.__chandle__())
    if cached is not None and cached[0].same_as(func):
        return cached[1]
    return Graph(func)


def keep_graph(graph: Graph) -> None:
    """Keep ``graph`` for the next pass (a function a pass leaves as it is)."""
    with _GRAPHS_LOCK:
        while len(_GRAPHS) >= _GRAPHS_MAX:
            del _GRAPHS[next(iter(_GRAPHS))]
        _GRAPHS[graph.func.__chandle__()] = (graph.func, graph)


class MobileBertPass:
    """A graph rewrite on the Relax module of a captured MobileBERT.

    Subclasses set ``name`` and build their patterns in ``__init__``; most set ``pattern`` and
    implement :meth:`why_not` and :meth:`rewrite`, and the loop in :meth:`find_rewrites` does
    the rest. The guards that refuse a match live in ``why_not``, whose answers are kept in
    :attr:`refusals` (``"lv52: <reason>"``) for ``explain``. A pass that emits kernels sized for
    a CPU sets ``takes_target`` and takes ``target=`` in ``__init__`` (``resolve_passes`` gives
    it the compile target).
    """

    name: ClassVar[str] = ""
    takes_target: ClassVar[bool] = False
    pattern: DFPattern  # what the default match() looks for at every binding

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        _REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.last_fired = 0
        # The last call's fire count per function (a module holds one per compiled length).
        self.fired_by_function: dict[str, int] = {}

    def __call__(self, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        self.refusals = []
        self.fired_by_function = {}
        updated: dict[relax.GlobalVar, relax.Function] = {}
        fired = 0
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function) or _is_kernel(func):
                continue
            new_func, count = self.rewrite_function(func)
            self.fired_by_function[gvar.name_hint] = count
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
            graph = graph_of(func)
            rewrites = self.find_rewrites(graph)
            if not rewrites:
                keep_graph(graph)  # the function leaves as it is: the next pass reads it
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
        """One dict per firing: bound variable → the new value computing the same thing.

        Every binding, in program order: :meth:`match`, then :meth:`why_not` (a reason is
        recorded with :meth:`refuse`), then :meth:`rewrite`. Passes that group or search
        otherwise override this.
        """
        rewrites = []
        for var, value in graph.bindings():
            match = self.match(graph, var, value)
            if match is None:
                continue
            why = self.why_not(graph, var, match)
            if why is not None:
                self.refuse(var, why)
                continue
            rewrite = self.rewrite(graph, var, match)
            if rewrite:
                rewrites.append(rewrite)
        return rewrites

    def match(self, graph: Graph, var: relax.Var, value: relax.Expr) -> Any | None:
        """What the pass found at the binding ``var = value``, or None where it has not its form.

        By default the matches of ``self.pattern`` (pattern → expression). A pass whose guards
        find what the rewrite needs (the terms of a sum, a chain of layout ops) returns a small
        dataclass holding the matches, which :meth:`why_not` fills.
        """
        return graph.match(self.pattern, value)

    def why_not(self, graph: Graph, var: relax.Var, match: Any) -> str | None:
        """Why the match at ``var`` may not be rewritten (None: it may)."""
        return None

    def rewrite(self, graph: Graph, var: relax.Var, match: Any) -> dict[relax.Var, relax.Expr]:
        """New values for the bindings this match changes (usually ``var`` alone); an empty dict
        when the binding needs no change after all."""
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
