"""The Relax → executable pipeline for CPU targets, as named stage lists.

Stages (each a list of TVM passes), in order:

1. ``layout_passes``   – Relax level, target-specific layout (e.g. pre-packed constant weights).
2. ``legalize_passes`` – Relax ops → TIR PrimFuncs, constant folding, operator fusion.
3. ``schedule_passes`` – schedule every PrimFunc for the target (our own CPU schedules).
4. ``lower_passes``    – dataflow lowering and VM finalisation (TVM's CPU defaults).

Graph rewrites that know MobileBERT (``mbcompile.passes``) run before stage 1.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from mbcompile.targets.schedules import PackDenseWeights, ScheduleKernels, default_rules


def layout_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return [
        PackDenseWeights(target),  # matmul by a constant → packed-weight call_tir
        # softmax / exp / erf / tanh → polynomial forms that vectorise (libm's are scalar calls)
        relax.transform.FastMathTransform(),
    ]


def legalize_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return [ScheduleKernels(target, default_rules(target))]


def lower_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)


def build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """One module pass running the four stages under ``target``."""

    @tvm.transform.module_pass(opt_level=0, name="mbcompile_cpu_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                layout_passes(target)
                + legalize_passes(target)
                + schedule_passes(target)
                + lower_passes(target)
            )
            return seq(mod)

    return _pipeline
