"""MetaSchedule tuning of a model's kernels into a database folder: ``tune`` writes one,
``compile`` applies it (the folder and its files: ``tuning_database.py``).

:func:`tune_module` decides here which kernels to search and how many trials each still lacks,
then runs the search in a child process (``tuning_search.py``, which says why) and passes on its
progress lines. Ctrl-C asks the search to stop after the batch it is measuring, kills it and its
worker processes if it has not stopped ``STOP_GRACE`` seconds later, and is raised again once
the database is whole; running again resumes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import tvm

from mbcompile import errors
from mbcompile.errors import OptionError
from mbcompile.targets.metaschedule import (
    cold_cache_evaluator,
    meta_schedule,
    sigint_held,
    worker_initializer,
)
from mbcompile.targets.tuning_database import (
    FINISHED,
    MANIFEST,
    RECORDS,
    SHIPPED,
    WORKLOADS,
    Database,
    apply_database_pass,
    count_trials,
    resolve_database,
    target_key,
)
from mbcompile.targets.tuning_search import STOP_GRACE

# Importers of this module before the database and the search had files of their own keep
# finding these names here.
__all__ = [
    "FINISHED", "MANIFEST", "RECORDS", "SHIPPED", "STOP_GRACE", "WORKLOADS", "Database",
    "apply_database_pass", "cold_cache_evaluator", "meta_schedule", "resolve_database",
    "sigint_held", "target_key", "task_hash", "tune_module", "worker_initializer",
]


def tune_module(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    db: Database,
    *,
    trials: int,
    minutes: float | None = None,
    max_tasks: int | None = None,
    trials_per_batch: int = 16,
    cost_model: str = "random",
    runner: Callable | None = None,
    builder: Callable | None = None,
    log=print,
) -> dict:
    """Tune the PrimFuncs of a legalized, fused module (deduplicated tasks) into ``db``.

    ``trials`` is the budget per task. A task gets only the trials it lacks: ``trials`` less the
    records ``db`` holds for it (failed measurements count; a task without any valid one, as
    on a device that failed, is searched in full again), and none if its search ended on its
    own under this budget before (``FINISHED``). ``minutes`` stops the search early; every
    measured record is in the database then. ``max_tasks`` keeps the tasks with the most FLOPs
    per forward (kernel FLOPs × calls), for a short budget. ``runner``/``builder``: functions
    that return a MetaSchedule Runner/Builder, called in the search process, so they must
    pickle (module-level functions, or ``functools.partial`` of one).

    Ctrl-C raises KeyboardInterrupt here within ``STOP_GRACE`` seconds or so, after the search
    process and its workers have ended; the database is valid, and the same call resumes.
    """
    with sigint_held():  # TVM code that calls Python all along: Ctrl-C takes effect after it
        ms = meta_schedule()
        db.check(target)
        job = {
            "db": str(db.path),
            "target": tvm.ir.save_json(target),
            "trials": trials,
            "trials_per_batch": trials_per_batch,
            "cost_model": cost_model,
            "builder": _pickled(builder, "builder", ms.builder.Builder),
            "runner": _pickled(runner, "runner", ms.runner.Runner),
            "tasks": [],
        }
        extracted = _tasks(ms, mod, target, max_tasks)
        ms_db = db.ms_database(repair=True)  # damaged lines: skipped with a warning, cut out
        finished, counts = db.finished(), count_trials(ms_db)
        for task in extracted:
            task_mod = task.dispatched[0]
            key = task_hash(task_mod)
            lacking = trials - _trials_done(ms_db, counts, task_mod)
            if lacking > 0 and finished.get(key, 0) < trials:
                job["tasks"].append({
                    "name": task.task_name, "weight": float(task.weight), "hash": key,
                    "trials": lacking, "mod": tvm.ir.save_json(task_mod),
                })
    tasks = job["tasks"]
    summary = {"tasks": len(extracted), "already_tuned": len(extracted) - len(tasks),
               "tuned": len(tasks)}
    if not tasks:
        log(f"tune: all {len(extracted)} tasks already have {trials} trials, or a search that "
            f"ended before them, in {db.path}")
        return {**summary, "records": db.records()}
    total = sum(task["trials"] for task in tasks)
    budget = (f"{trials} trials each" if total == trials * len(tasks)
              else f"{total} trials ({trials} each, less those already measured)")
    log(f"tune: {len(extracted)} distinct kernels, {len(tasks)} to tune, {budget}")
    job["deadline"] = time.time() + minutes * 60 if minutes else None
    stopped = _run_search(job, db, log)
    if stopped is not None:  # the time budget, or a SIGTERM to the search from outside
        why = ("time budget spent" if stopped == "time budget"
               else "the search process was stopped (SIGTERM)")
        log(f"tune: {why}; the database holds every trial measured so far; run the same "
            f"command again to resume")
        summary["stopped"] = stopped
    summary["records"] = db.records()
    return summary


def task_hash(task_mod: tvm.IRModule) -> str:
    """A key for a tuning task that is the same in every process (MetaSchedule matches workloads
    by structure too)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(task_mod) & (2**64 - 1):016x}"


def _tasks(ms, mod: tvm.IRModule, target: tvm.target.Target, max_tasks: int | None) -> list:
    """The kernels to tune, the most FLOPs per forward first (the search keeps this order): not
    those already scheduled, nor the matmuls on matrix tiles, NEON steps or panel steps (one
    fixed schedule, nothing to search: ``schedules/fixed.py``)."""
    from mbcompile.targets.schedules.fixed import has_fixed_schedule

    extracted = ms.relax_integration.extract_tasks(mod, target, module_equality="structural")
    extracted = [
        t for t in extracted
        if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)
        and not has_fixed_schedule(t.dispatched[0]["main"], target)
    ]
    extracted.sort(key=lambda t: -flops_per_forward(t))
    return extracted if max_tasks is None else extracted[:max_tasks]


def flops_per_forward(task) -> float:
    """A task's FLOPs per forward: its kernel's FLOPs × the calls (``weight``)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        flops = estimate_tir_flops(task.dispatched[0])
    except (RuntimeError, ValueError, TypeError):  # a kernel TVM cannot count: last
        flops = 0.0
    return float(task.weight) * flops


def _trials_done(ms_db, counts, task_mod: tvm.IRModule) -> int:
    """The trials of this task the database holds: all its records, or none if no record is a
    valid measurement (a device that failed: search it again in full)."""
    if not ms_db.has_workload(task_mod):
        return 0
    workload = ms_db.commit_workload(task_mod)  # the one already there: nothing is written
    return counts[workload] if ms_db.get_top_k(workload, 1) else 0


def _pickled(factory: Callable | None, kind: str, base: type) -> str | None:
    """``factory`` ready to be sent to the search process, after one try here (so that a missing
    cross-compiler is reported now, not by every candidate)."""
    if factory is None:
        return None
    if isinstance(factory, base) or not callable(factory):
        raise OptionError(
            f"{kind}={factory!r}: give a function that returns a MetaSchedule {kind} (it is "
            f"called in the tuning search process), e.g. functools.partial(rpc_{kind}, ...)"
        )
    made = factory()
    if not isinstance(made, base):
        raise OptionError(f"{kind}={factory!r} returned {made!r}, not a MetaSchedule {kind}")
    try:
        blob = pickle.dumps(factory)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise OptionError(
            f"{kind}={factory!r} cannot be sent to the tuning search process ({err}): give a "
            f"module-level function, or functools.partial of one"
        ) from None
    return base64.b64encode(blob).decode("ascii")


def _run_search(job: dict, db: Database, log) -> str | None:
    """Run ``tuning_search`` on ``job``, passing its progress lines to ``log``; why it stopped
    early (None: it did not). Ctrl-C: see the module docstring."""
    messages: queue.Queue = queue.Queue()
    search = reader = None
    try:
        with sigint_held():  # until it runs and has its job: then Ctrl-C can stop it in order
            search = subprocess.Popen(
                [sys.executable, "-m", "mbcompile.targets.tuning_search"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us
            )
            reader = threading.Thread(target=_read_messages, args=(search.stdout, messages))
            reader.daemon = True
            reader.start()
            with contextlib.suppress(BrokenPipeError):  # it ended at once: _relay sees its end
                search.stdin.write(json.dumps(job) + "\n")
                search.stdin.flush()
        result = _relay(messages, log)
    except KeyboardInterrupt:
        if search is None:
            raise
        os.kill(search.pid, signal.SIGTERM)  # stop after the batch being measured
        with contextlib.suppress(KeyboardInterrupt):  # asked twice: kill it now
            _relay(messages, log, until=time.monotonic() + STOP_GRACE)
        _end(search, reader, db)
        message = (
            f"tune: stopped by Ctrl-C; {db.path} holds every trial measured so far "
            f"({db.records()} records); run the same command again to resume"
        )
        raise KeyboardInterrupt(message) from None  # the CLI prints it as its one line
    finally:
        if search is not None:
            _end(search, reader, db)
    if result is None:
        raise RuntimeError(
            f"the tuning search process ended with exit status {search.returncode} before it "
            f"finished (the lines above may say why); {db.path} holds every trial measured "
            f"before that, and running the same command again resumes"
        )
    if "error" in result:
        name, text = result["error"]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.MbcompileError):
            raise cls(text)
        raise RuntimeError(f"tuning search failed: {name}: {text}")
    return result["done"]["stopped"]


def _read_messages(stream, messages: queue.Queue) -> None:
    """Put the search's JSON lines on ``messages`` (other lines as log lines), then None."""
    for line in stream:
        try:
            messages.put(json.loads(line))
        except json.JSONDecodeError:
            messages.put({"log": line.rstrip("\n")})
    messages.put(None)


def _relay(messages: queue.Queue, log, until: float | None = None) -> dict | None:
    """Pass log lines on until the search's result comes (returned), or its output ends
    (None), or the clock passes ``until`` (None)."""
    while until is None or time.monotonic() < until:
        try:
            message = messages.get(timeout=0.25)
        except queue.Empty:
            continue
        if message is None:
            return None
        if "log" in message:
            log(message["log"])
        else:
            return message
    return None


def _end(search: subprocess.Popen, reader: threading.Thread | None, db: Database) -> None:
    """Kill what is left of the search's process group (itself if still running, stray
    workers), reap it, and leave the database files ending with whole lines."""
    if search.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):  # none left
        os.killpg(search.pid, signal.SIGKILL)  # the group's id is the search's own pid
    search.wait()
    with contextlib.suppress(OSError):
        search.stdin.close()
    if reader is not None:
        reader.join(timeout=1)
    db.cut_torn_tails()
