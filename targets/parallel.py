"""TVM's work on every CPU: how many threads, and a Relax pass run function by function.

A module holds one Relax function per compiled length (eight by default), and TVM's C++
passes hold no Python lock while they run. ``per_function`` runs such a pass on each function
in a module of its own (the function and every kernel), on threads, and puts the results back::

    FoldConstant(mod)                    per_function(FoldConstant)(mod)
      main, seq_8, …, seq_384: in turn     {main, kernels}, {seq_8, kernels}, …: a thread each
                                           mod with main, seq_8, … replaced

Only for passes that rewrite Relax functions and add no global function (``FoldConstant``): the
results of two threads cannot be merged where both would add one. ``FoldConstant`` on the
default module (8 lengths, 10,000 kernel calls) took 9.5 s in one call and 4.5 s function by
function on 2 threads (2-core Xeon of the README), with the same functions out.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm import relax

MOST_JOBS = 8  # a cap: each part repeats some fixed work (measured on 2 CPUs only)


def default_jobs() -> int:
    """Threads to run at once: the CPUs this process may use, up to ``MOST_JOBS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MOST_JOBS))


def worker_context() -> tvm.transform.PassContext:
    """The calling thread's pass context (its opt level and config) for a worker thread: TVM's
    contexts are per thread. Without its instruments, which are not made to be entered from
    several threads at once."""
    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(
        opt_level=current.opt_level,
        required_pass=list(current.required_pass),
        disabled_pass=list(current.disabled_pass),
        config=dict(current.config),
    )


def per_function(inner: tvm.transform.Pass, jobs: int | None = None) -> tvm.transform.Pass:
    """``inner`` (a module pass that rewrites Relax functions only) run on each Relax function
    of the module separately, ``jobs`` at a time (default :func:`default_jobs`)."""

    @tvm.transform.module_pass(opt_level=0, name=f"per_function({inner.info.name})")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        graphs = [gv for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        others = {gv: f for gv, f in mod.functions_items() if not isinstance(f, relax.Function)}
        if len(graphs) < 2:
            return inner(mod)
        context = worker_context()
        target = tvm.target.Target.current(allow_none=True)

        def one(gv: tvm.ir.GlobalVar) -> relax.Function:
            alone = tvm.IRModule({**others, gv: mod[gv]}, attrs=mod.attrs)
            with context:
                if target is None:
                    return inner(alone)[gv.name_hint]
                with target:
                    return inner(alone)[gv.name_hint]

        count = default_jobs() if jobs is None else jobs
        with ThreadPoolExecutor(max(1, min(count, len(graphs)))) as pool:
            results = list(pool.map(one, graphs))
        out = mod.clone()
        for gv, func in zip(graphs, results):
            out[gv] = func
        return out

    return run
