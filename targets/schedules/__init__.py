"""CPU schedules applied without tuning: weight pre-packing (Relax) and per-PrimFunc rules.

``layout_passes`` of ``targets/pipeline.py`` runs :class:`PackDenseWeights`,
:class:`Bf16Attention` and :class:`NeonAttention`;
``schedule_passes`` runs :class:`ScheduleKernels` with :func:`default_rules`.
"""

from __future__ import annotations

import tvm
from tvm.s_tir.dlight.base import ScheduleRule

from mbcompile.targets.schedules.apply import ScheduleKernels
from mbcompile.targets.schedules.batch_matmul import BatchMatmul
from mbcompile.targets.schedules.bf16_attention import Bf16Attention
from mbcompile.targets.schedules.dense import DensePacked
from mbcompile.targets.schedules.dense_dot import DenseDot
from mbcompile.targets.schedules.dense_neon import DenseNeon
from mbcompile.targets.schedules.dense_tiles import DenseTiles
from mbcompile.targets.schedules.elementwise import Elementwise
from mbcompile.targets.schedules.neon_attention import NeonAttention
from mbcompile.targets.schedules.pack_weights import PackDenseWeights
from mbcompile.targets.schedules.prefetch import PrefetchWeightPanels
from mbcompile.targets.schedules.reduction import RowReduction


def default_rules(target: tvm.target.Target) -> list[ScheduleRule]:
    """The rules in the order they are tried: most specific first."""
    return [DenseTiles(), DenseDot(), DenseNeon(), DensePacked(), BatchMatmul(), RowReduction(), Elementwise()]


__all__ = [
    "BatchMatmul",
    "DenseDot",
    "DenseNeon",
    "DenseTiles",
    "DensePacked",
    "Elementwise",
    "NeonAttention",
    "PackDenseWeights",
    "PrefetchWeightPanels",
    "RowReduction",
    "ScheduleKernels",
    "Bf16Attention",
    "default_rules",
]
