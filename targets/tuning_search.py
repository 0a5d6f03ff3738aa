"""The MetaSchedule search of ``tune``, in a process of its own
(``python -m mbcompile.targets.tuning_search``, started by ``tuning.tune_module``).

Why a process of its own: MetaSchedule's task scheduler is C++ that keeps calling Python (the
builder and runner, which wait on their worker processes; the measure callbacks; its logger), so
a Ctrl-C raises KeyboardInterrupt inside one of those calls, and the exception crosses C++. Raised
in the logger, which MetaSchedule calls from a destructor (``~PyLogMessage``,
``src/s_tir/meta_schedule/utils.h``), it ends in ``std::terminate``, which TVM's crash handler
reports as a segfault: 2 of 3 Ctrl-Cs did that. Other times the worker processes were left
running, or the interrupt came out as a bare RuntimeError. Here nothing is raised at random:

- this process has a session of its own: a terminal's Ctrl-C reaches neither it nor its workers;
  the parent asks it to stop with SIGTERM (SIGINT does the same);
- the signal only sets a flag, read by the measure callback after each batch, once the batch's
  records are in the database, and before each group of tasks;
- the parent kills the process group if the search has not stopped ``STOP_GRACE`` seconds after
  it asked; if the parent is gone (our stdin ends), this process does the same itself.

Protocol: the job comes as one JSON line on stdin; messages go out as JSON lines on stdout:
``{"log": line}`` per progress line, then ``{"done": {"stopped": null | "time budget" |
"interrupted"}}`` or ``{"error": [exception class name, message]}``.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import sys
import threading
import time

# Seconds a search asked to stop may take to finish its batch before it is killed. A batch of 16
# candidates of a seq-128 matmul takes longer than that to build and time on 2 cores; its records
# are lost then, and the lines already written stay whole (``Database.cut_torn_tails``).
STOP_GRACE = 5.0
# Tasks per tune_tasks call (``calls``): their first batches are built before any is measured.
CHUNK_TASKS = 16
# Trials of every task before any task gets more (``calls``)
FIRST_TRIALS = 4


class StopRequest:
    """Set by SIGTERM/SIGINT or by the end of stdin, read between batches. A plain flag, since a
    signal handler must not take a lock (``threading.Event.set`` does)."""

    asked = False


class Stop(Exception):
    """Raised from the measure callback to end the search early. It comes back out of
    MetaSchedule's C++ as a bare RuntimeError, so why it was raised is kept aside (``ended``)."""


def hand_schedules(func, target) -> list | None:
    """Our design spaces for ``func``: the schedule the no-tuning path applies
    (targets/schedules/) and, where the rule has knobs, the same rule with them left to sampling
    (register-tile rows, K unroll: ``tunable=True``). None when no rule of ours matches."""
    from mbcompile.targets.schedules import default_rules

    def first(tunable: bool):
        for rule in default_rules(target):
            try:
                out = rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a rule that cannot schedule this task
                out = None
            if out is not None:
                return out[0] if isinstance(out, list) else out
        return None

    fixed = first(False)
    if fixed is None:
        return None
    spaces = [fixed]
    knobs = first(True)
    if knobs is not None and any(inst.kind.name.startswith("Sample") for inst in knobs.trace.insts):
        spaces.append(knobs)
    return spaces


def design_space(ms, func, target):
    """Our own space where one of our rules schedules ``func``, MetaSchedule's default space
    elsewhere.

    Not the union of both: a database tuned over the union on this 2-core Zen 3 picked
    default-space matmuls (fastest as measured alone, hot in cache) and made the seq-128 encoder
    slower in the model: 72.9 → 78.4 ms on 1 thread, outputs equal bit for bit. Our space holds
    the untuned schedule as one of its candidates.
    """
    spaces = hand_schedules(func, target)
    if spaces is None:
        return ms.space_generator.PostOrderApply()
    return ms.space_generator.ScheduleFn(
        lambda _sch: spaces,
        sch_rules=[],
        postprocs=[],
        mutator_probs={ms.mutator.MutateTileSize(): 1.0},
    )


def _progress_callback(ms, names: list[str], total: int, deadline: float | None,
                       stop: StopRequest, ended: list[str], log):
    """A MeasureCallback printing trials done, ETA and the best latency per task (``names``:
    those of the current tune_tasks call, by task id); it ends the search (``Stop``, and why in
    ``ended``) once a stop is asked for or the time budget (``deadline``) is spent."""
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.done = 0
            self.start = time.monotonic()
            self.best: dict[str, float] = {}

        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            if candidates:  # a task whose space is used up is polled once more: no news
                self.report(names[task_id], len(candidates), runner_results)
            if stop.asked:
                ended.append("interrupted")
            elif deadline is not None and time.time() > deadline:
                ended.append("time budget")
            if ended:
                raise Stop(ended[0])

        def report(self, name: str, measured: int, runner_results) -> None:
            for result in runner_results:
                if result.run_secs:
                    secs = [float(s) for s in result.run_secs]
                    self.best[name] = min(self.best.get(name, float("inf")), sum(secs) / len(secs))
            self.done += measured
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * max(total - self.done, 0)
            best = self.best.get(name)
            best_text = f"{best * 1e6:.1f} us" if best is not None else "none valid yet"
            log(
                f"tune: {self.done}/{total} trials, {elapsed:.0f} s elapsed, ETA {eta:.0f} s; "
                f"{name} best {best_text}"
            )

    return Progress()


def _made(blob: str | None):
    """The builder or runner made by the factory the parent pickled, or None."""
    return pickle.loads(base64.b64decode(blob))() if blob else None


def search(job: dict, stop: StopRequest, log) -> dict:
    """Run the job's tasks, each for the trials it lacks, into the job's database folder."""
    import tvm

    from mbcompile.targets.metaschedule import (
        cold_cache_evaluator,
        local_builder,
        meta_schedule,
        worker_initializer,
    )
    from mbcompile.targets.tuning_database import Database

    ms = meta_schedule()
    target = tvm.ir.load_json(job["target"])
    db = Database.open(job["db"])
    ms_db = db.ms_database()
    builder = _made(job["builder"]) or local_builder()
    runner = _made(job["runner"]) or ms.runner.LocalRunner(
        evaluator_config=cold_cache_evaluator(), initializer=worker_initializer
    )
    tasks = [{**task, "mod": tvm.ir.load_json(task["mod"])} for task in job["tasks"]]
    names: list[str] = []
    ended: list[str] = []
    progress = _progress_callback(
        ms, names, sum(task["trials"] for task in tasks), job["deadline"], stop, ended, log
    )
    for index, (group, budget, last) in enumerate(calls(tasks)):
        if stop.asked:
            return {"stopped": "interrupted"}
        # between calls too (a call may end on its own, its tasks' budgets spent); the first
        # call measures at least a batch, however short the budget
        if index and job["deadline"] is not None and time.time() > job["deadline"]:
            return {"stopped": "time budget"}
        names[:] = [task["name"] for task in group]
        contexts = [
            ms.TuneContext(
                mod=task["mod"],
                target=target,
                space_generator=design_space(ms, task["mod"]["main"], target),
                search_strategy="evolutionary",
                task_name=task["name"],
                num_threads="physical",
            )
            for task in group
        ]
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[task["weight"] for task in group],
                work_dir=job["db"],
                max_trials_global=budget * len(group),
                max_trials_per_task=budget,
                num_trials_per_iter=job["trials_per_batch"],
                builder=builder,
                runner=runner,
                database=ms_db,
                cost_model=job["cost_model"],
                measure_callbacks=ms.measure_callback.MeasureCallback.create("default")
                + [progress],
            )
        except Exception:
            if ended:  # our Stop
                return {"stopped": ended[0]}
            raise
        # Every task's search ended: at its budget, or with its space exhausted. A task with no
        # valid measurement (a device that failed, a gather) stays open for the next run.
        db.mark_finished(
            [t["hash"] for t in group
             if last[t["hash"]] and ms_db.get_top_k(ms_db.commit_workload(t["mod"]), 1)],
            job["trials"],
        )
    return {"stopped": None}


def calls(tasks: list[dict], first_trials: int = FIRST_TRIALS, chunk: int = CHUNK_TASKS):
    """The ``tune_tasks`` calls that run ``tasks``: ``(group, trials per task, {hash: whether
    this is the task's last call})``.

    MetaSchedule builds and submits the first batch of every task of a call before it measures
    any (no progress line, no record, no look at the clock until then: 27 minutes for the 235
    kernels of an int8 build of every length on this Zen 4, which a 24-minute budget then
    stopped with one trial measured). So the tasks run in two rounds, ``first_trials`` each
    (the untuned schedule among them) and then the rest of their budget, each round in calls
    of at most ``chunk`` tasks in the order given (``tune_module``'s: the most FLOPs per
    forward first): a time budget then ends with every task measured, or with the costliest ones, and a progress line comes
    after each call's first batches. Within a call every task has the same budget (MetaSchedule
    gives all of a call's tasks one)."""
    first = [{**task, "trials": min(task["trials"], first_trials)} for task in tasks]
    rest = [{**task, "trials": task["trials"] - first_trials} for task in tasks
            if task["trials"] > first_trials]
    finishing = {task["hash"] for task in tasks if task["trials"] <= first_trials}
    for round_tasks in (first, rest):
        for budget in sorted({task["trials"] for task in round_tasks}, reverse=True):
            same = [task for task in round_tasks if task["trials"] == budget]
            for start in range(0, len(same), chunk):
                group = same[start : start + chunk]
                last = {task["hash"]: round_tasks is rest or task["hash"] in finishing
                        for task in group}
                yield group, budget, last


def _watch_parent(stop: StopRequest) -> None:
    """The parent holds our stdin open: its end means the parent is gone. Stop then, and kill
    this process group (this process, its workers) if the batch is not done in time."""
    sys.stdin.read()
    stop.asked = True
    time.sleep(STOP_GRACE)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    stop = StopRequest()

    def ask_to_stop(signum, frame) -> None:
        stop.asked = True

    signal.signal(signal.SIGTERM, ask_to_stop)
    signal.signal(signal.SIGINT, ask_to_stop)
    messages = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what MetaSchedule or a worker prints goes to stderr, not into the messages

    def send(**message) -> None:
        try:
            messages.write(json.dumps(message) + "\n")
            messages.flush()
        except OSError:  # the parent is gone: nobody to tell
            stop.asked = True

    code = 1
    try:
        job = json.loads(sys.stdin.readline())
        threading.Thread(target=_watch_parent, args=(stop,), daemon=True).start()
        send(done=search(job, stop, lambda line: send(log=line)))
        code = 0
    except BaseException as err:  # noqa: BLE001 - the parent raises it again
        send(error=[type(err).__name__, str(err)])
    # Leave at once: the finalizers of MetaSchedule's worker pools only print noise ("cannot join
    # current thread"), and the parent kills what is left of the process group.
    os._exit(code)


if __name__ == "__main__":
    main()
