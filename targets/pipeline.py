"""The Relax → executable pipeline for CPU targets, as named stage lists.

Stages (each a list of TVM passes), in order:

1. ``layout_passes``   – Relax level, target-specific layout (e.g. pre-packed constant weights).
2. ``legalize_passes`` – Relax ops → TIR PrimFuncs, constant folding, operator fusion.
3. ``schedule_passes`` – schedule every PrimFunc for the target (our own CPU schedules).
4. ``lower_passes``    – dataflow lowering and VM finalisation (TVM's CPU defaults).

Graph rewrites that know MobileBERT (``mbcompile.passes``) run before stage 1.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from mbcompile.targets.legalize_once import legalize_ops
from mbcompile.targets.parallel import per_function
from mbcompile.targets.schedules import (
    Bf16Attention,
    NeonAttention,
    PackDenseWeights,
    PrefetchWeightPanels,
    ScheduleKernels,
    default_rules,
)


def layout_passes(target: tvm.target.Target, precision: str = "fp32") -> list[tvm.transform.Pass]:
    return [
        # matmul by a constant → packed-weight call_tir (bf16: and a rounding of its input)
        PackDenseWeights(target, precision),
        # bf16 / int8 with AVX512_BF16: the fused attention's products in bf16 (tiles or vectors)
        Bf16Attention(target, precision),
        # AArch64: the fused attention's products as NEON steps
        NeonAttention(target),
        # softmax / exp / erf / tanh → polynomial forms that vectorise (libm's are scalar calls)
        relax.transform.FastMathTransform(),
    ]


def legalize_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        # each distinct kernel made once: 4.0 → 2.5 s for 8 lengths, the same module out
        legalize_ops(),
        relax.transform.AnnotateTIROpPattern(),
        # function by function on threads: 9.5 → 4.5 s on 2 CPUs for 8 lengths (parallel.py)
        per_function(relax.transform.FoldConstant()),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    # After the database and our rules: tuned and untuned dense kernels alike.
    return [ScheduleKernels(target, default_rules(target)), PrefetchWeightPanels()]


def lower_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)


def fused_module(
    mod: tvm.IRModule, target: tvm.target.Target, precision: str = "fp32"
) -> tvm.IRModule:
    """Stages 1–2 only: the legalized, fused module whose PrimFuncs are the tuning tasks."""
    with target:
        passes = layout_passes(target, precision) + legalize_passes(target)
        return tvm.transform.Sequential(passes)(mod)


def _scheduled_kernels(mod: tvm.IRModule) -> int:
    return sum(
        1
        for _, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs.get("tirx.is_scheduled", False)
    )


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, database
                   ) -> tuple[tvm.IRModule, int]:
    """``mod`` with its kernels of one fixed schedule scheduled (``schedules/fixed.py``: a
    database's record, perhaps of an older schedule, must not replace them), then the kernels
    ``database`` has tuned records for; and how many the database supplied. Under ``target``."""
    from mbcompile.targets.schedules.fixed import FixedSchedules
    from mbcompile.targets.tuning import apply_database_pass

    mod = ScheduleKernels(target, [FixedSchedules()])(mod)
    before = _scheduled_kernels(mod)
    mod = apply_database_pass(database)(mod)
    return mod, _scheduled_kernels(mod) - before


def build_pipeline(
    target: tvm.target.Target,
    *,
    precision: str = "fp32",
    database=None,
    on_fused: Callable[[tvm.IRModule], None] | None = None,
    on_tuned: Callable[[int], None] | None = None,
) -> tvm.transform.Pass:
    """One module pass running the four stages under ``target``.

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"int8"`` (the matmuls by constant weights; see
    ``schedules/pack_bf16.py``, ``pack_int8.py``). ``database`` (a ``targets.tuning.Database``)
    replaces the kernels it has tuned records for (``apply_database``) before stage 3
    schedules the rest; ``on_fused`` sees the module after stage 2 (for reports), ``on_tuned``
    the number of kernels the database supplied.
    """

    @tvm.transform.module_pass(opt_level=0, name="mbcompile_cpu_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = fused_module(mod, target, precision)
        if on_fused is not None:
            on_fused(mod)
        with target:
            if database is not None:
                mod, tuned = apply_database(mod, target, database)
                if on_tuned is not None:
                    on_tuned(tuned)
            return tvm.transform.Sequential(schedule_passes(target) + lower_passes(target))(mod)

    return _pipeline
