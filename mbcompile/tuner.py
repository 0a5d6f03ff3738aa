"""``mbcompile.tune``: MetaSchedule over a model's distinct kernels, into a database folder."""

from __future__ import annotations

import os
import time


def tune(
    model,
    *,
    work_dir: str | os.PathLike,
    target="host",
    seq_len: int = 128,
    batch_size: int = 1,
    num_choices: int | None = None,
    passes="default",
    logits_for: str = "all",
    max_masked: int = 8,
    trials: int = 64,
    minutes: float | None = None,
    max_tasks: int | None = None,
    log=print,
    runner=None,
    builder=None,
) -> dict:
    """Tune the kernels ``compile`` would build for this model and target into ``work_dir``.

    The 24 layers share their kernels, so each distinct kernel is one task. ``trials`` is the
    budget per task, ``minutes`` an optional wall-clock budget; running again with the same
    ``work_dir`` resumes (tasks that already have ``trials`` records are skipped). Ctrl-C leaves a
    valid database. Apply it with ``compile(..., tuning_db=work_dir)``. The search space holds
    the untuned schedules too, so a tuned kernel is never slower than an untuned one as measured.
    ``max_tasks`` tunes only the kernels with the most FLOPs per forward.
    """
    from mbcompile.compiler import prepare
    from mbcompile.targets.pipeline import fused_module
    from mbcompile.targets.tuning import Database, tune_module

    start = time.perf_counter()
    _, tvm_target, _, mod, _, _ = prepare(
        model,
        target=target,
        seq_len=seq_len,
        batch_size=batch_size,
        num_choices=num_choices,
        passes=passes,
        logits_for=logits_for,
        max_masked=max_masked,
    )
    db = Database.create(work_dir, tvm_target)
    summary = tune_module(
        fused_module(mod, tvm_target), tvm_target, db, trials=trials, minutes=minutes,
        max_tasks=max_tasks, log=log,
        runner=runner, builder=builder,
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["work_dir"] = str(db.path)
    return summary
