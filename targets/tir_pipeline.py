"""The TIR pipeline ``codegen`` builds every kernel with, registered with TVM as ``"mbcompile"``:
TVM's default lowering, then mbcompile's passes on the lowered functions, then TVM's
finalization (which turns allocations into stack slots or workspace calls)::

    TVM's lowering → round_instruction (fp32 → bf16 in one instruction, where the CPU has it)
                   → tiles_on_stack (a parallel body's small scratch buffers on the stack)
                   → TVM's host finalization → LLVM

Tuning builds its candidates with it too (``metaschedule.build_candidate``), so a candidate is
timed as the compiled kernel runs.
"""

from __future__ import annotations

import tvm
from tvm.tirx import compilation_pipeline

from mbcompile.targets.round_instruction import RoundWithInstruction
from mbcompile.targets.tiles_on_stack import TilesOnStack

PIPELINE = "mbcompile"


def _pipeline():
    lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default")
    passes = tvm.transform.Sequential([lower, RoundWithInstruction, TilesOnStack])
    return passes, finalize_host, finalize_device


compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)
