"""MetaSchedule as tuning uses it: CPU tensor intrinsics only, candidates timed with cold caches.

MetaSchedule registers every tensor intrinsic (CUDA's, ROCm's, Hexagon's …) when a tuning context
starts, which takes about a minute on 2 cores; :func:`meta_schedule` registers the CPU ones only.
The tuning search process, its builder and runner worker processes and the database reader all
load MetaSchedule through it.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

from mbcompile import interrupts


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Ctrl-C inside the block takes effect at its end (KeyboardInterrupt), for TVM code that
    calls back into Python: raised in such a callback, a KeyboardInterrupt crosses C++, where it
    has been seen to vanish or to come out as a bare RuntimeError. Only in the main thread, and
    only while SIGINT has Python's own handler (or the CLI's, :mod:`mbcompile.interrupts`). A
    Ctrl-C that the CLI's handler saw but a finalizer swallowed is raised as the block begins."""
    current = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or not interrupts.is_python_handler(current)):
        yield
        return
    interrupts.raise_if_received()
    caught: list[int] = []

    def hold(signum, frame) -> None:
        caught.append(signum)
        interrupts.remember()

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, current)
    if caught:
        raise KeyboardInterrupt


def meta_schedule():
    """``tvm.s_tir.meta_schedule`` with only the CPU tensor intrinsics registered."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        from mbcompile import tvmscript

        tvmscript.install()  # the intrinsics are TVMScript: parsed without the slow frame walk
        package = types.ModuleType(name)
        package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        package.__package__ = name
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
        with sigint_held():  # half-registered intrinsics could not be registered again
            for sub in ("x86", "arm_cpu"):
                setattr(package, sub, importlib.import_module(f"{name}.{sub}"))
    from tvm.s_tir import meta_schedule as ms

    return ms


def cold_cache_evaluator(repeats: int = 10):
    """How every candidate is timed: ``repeats`` single runs, each after flushing the weights
    and the output from the caches (the first argument, the activation, stays warm).

    That is how a kernel runs inside the model, whose 80 MB of weights do not fit the L3: timed
    warm, MetaSchedule picked variants that won alone and lost in the model (1–2%, measured).
    """
    ms = meta_schedule()
    return ms.runner.EvaluatorConfig(
        number=1, repeat=repeats, min_repeat_ms=0, enable_cpu_cache_flush=True
    )


# MetaSchedule's builder calls this to build a candidate (registered in its workers).
BUILD = "mbcompile.meta_schedule.build"


def build_candidate(mod, target, _params=None):
    """MetaSchedule's default build (``local_builder.default_build``) with codegen's TIR
    pipeline (``tir_pipeline``): a candidate is timed as the compile builds it. With TVM's
    own pipeline a candidate whose parallel tasks have a scratch tile from 1 KiB (a register
    tile of more rows, say) was timed with a workspace call per task that the compiled kernel,
    its tile on the stack (``tiles_on_stack``), does not make."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from mbcompile.targets import tir_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=tir_pipeline.PIPELINE)


def local_builder(**kwargs):
    """MetaSchedule's LocalBuilder building candidates with ``build_candidate``."""
    return meta_schedule().builder.LocalBuilder(f_build=BUILD, initializer=worker_initializer,
                                                **kwargs)


def worker_initializer() -> None:
    """For MetaSchedule's builder and runner worker processes: CPU intrinsics only, and
    ``BUILD``."""
    import tvm

    meta_schedule()
    tvm.register_global_func(BUILD, build_candidate, override=True)
