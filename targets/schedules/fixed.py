"""Kernels of one schedule, with nothing to tune: matmuls on AMX tiles (``dense_tiles``), on
NEON steps (``dense_neon``) and on panel steps (``dense_dot.on_panels``).

Tuning leaves them out (``targets/tuning.py``): a search over one candidate only measures it,
and MetaSchedule's evolutionary search spends seconds per task looking for others. And a
tuning database does not replace them: a record tuned before the kernel had its schedule (a
database made by an earlier mbcompile, as the shipped Zen 4 one's bf16 records of the 4- and
6-row tiles were) would give the older, slower schedule back. ``targets/pipeline.py``
schedules them before it applies a database::

    kernels → FixedSchedules (tiles, NEON steps, panel steps) → the database's records
            → default_rules (the rest)
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from mbcompile.targets.schedules import default_rules, dense_dot, dense_neon, dense_tiles


def has_fixed_schedule(func, target: Target) -> bool:
    """Whether ``func`` gets one of the module doc's schedules on ``target``."""
    return (dense_tiles.handles(func, target) or dense_dot.on_panels(func, target)
            or dense_neon.handles(func, target))


class FixedSchedules(ScheduleRule):
    """``default_rules``' schedule of a kernel of one schedule; None for any other kernel."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not has_fixed_schedule(func, target):
            return None
        for rule in default_rules(target):
            sch = rule.apply(func, target, False)
            if sch is not None:
                return sch
        return None
