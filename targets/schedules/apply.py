"""The module pass that schedules every PrimFunc with the first rule that matches it."""

from __future__ import annotations

import logging
from collections import Counter

import tvm
from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule

logger = logging.getLogger(__name__)


@tvm.transform.module_pass(opt_level=0, name="ScheduleKernels")
class ScheduleKernels:
    """Apply ``rules`` in order to each unscheduled PrimFunc; the first non-None schedule wins.

    A function no rule matches is left as is. ``last_report`` counts functions per rule
    (``"unscheduled"`` for none) and lists ``failed`` ``(function, rule, error)`` triples: a
    rule that raised instead of bailing is a bug, logged and skipped, never fatal.
    """

    def __init__(self, target: tvm.target.Target, rules: list[ScheduleRule]):
        self.target = target
        self.rules = list(rules)
        self.last_report: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        counts: Counter = Counter()
        failed = []
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            for rule in self.rules:
                try:
                    sch = rule.apply(func, self.target, False)
                except Exception as err:  # noqa: BLE001 - a buggy rule must not break the build
                    logger.warning("%s raised on %s: %s", type(rule).__name__, gvar.name_hint, err)
                    failed.append((gvar.name_hint, type(rule).__name__, str(err)))
                    continue
                if sch is not None:
                    updates[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    counts[type(rule).__name__] += 1
                    break
            else:
                counts["unscheduled"] += 1
        if updates:
            mod = mod.clone()  # a pass returns a new module: the caller's keeps its functions
            for gvar, func in updates.items():
                mod[gvar] = func
        self.last_report = {**counts, "failed": failed}
        logger.info("ScheduleKernels: %s", self.last_report)
        return mod
