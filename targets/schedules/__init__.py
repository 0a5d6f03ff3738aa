"""CPU schedules applied without tuning: weight pre-packing (Relax) and per-PrimFunc rules.

``layout_passes`` of ``targets/pipeline.py`` runs :class:`PackDenseWeights`;
``schedule_passes`` runs :class:`ScheduleKernels` with :func:`default_rules`.
"""

from __future__ import annotations

import tvm
from tvm.s_tir.dlight.base import ScheduleRule

from .apply import ScheduleKernels
from .batch_matmul import BatchMatmul
from .dense import DensePacked
from .elementwise import Elementwise
from .pack_weights import PackDenseWeights
from .prefetch import PrefetchWeightPanels
from .reduction import RowReduction


def default_rules(target: tvm.target.Target) -> list[ScheduleRule]:
    """The rules in the order they are tried: most specific first."""
    return [DensePacked(), BatchMatmul(), RowReduction(), Elementwise()]


__all__ = [
    "BatchMatmul",
    "DensePacked",
    "Elementwise",
    "PackDenseWeights",
    "PrefetchWeightPanels",
    "RowReduction",
    "ScheduleKernels",
    "default_rules",
]
