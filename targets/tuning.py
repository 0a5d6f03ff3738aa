"""MetaSchedule tuning and its databases, kept apart: ``tune`` writes one, ``compile`` applies it.

A database is a folder holding MetaSchedule's ``JSONDatabase`` files and ``manifest.json``, which
names the LLVM target (triple, cpu, attributes) and the TVM version it was tuned with. Applying a
database made for another target or TVM version is refused: its schedules may not even run here.

MetaSchedule registers every tensor intrinsic (CUDA's, ROCm's, Hexagon's …) when a tuning context
starts, which takes about a minute on 2 cores; :func:`meta_schedule` registers the CPU ones only.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object

from ..errors import TargetError

MANIFEST = "manifest.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
# Tasks whose search ended on its own (their design space ran out of new candidates before the
# trial budget): {structural hash of the task: the per-task budget of that run}. Without it a
# resumed run would search such a task again, for nothing.
FINISHED = "finished_tasks.json"
# Fields of the LLVM target a tuned schedule depends on.
TARGET_KEYS = ("mtriple", "mcpu", "mattr")


def meta_schedule():
    """``tvm.s_tir.meta_schedule`` with only the CPU tensor intrinsics registered."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        package = types.ModuleType(name)
        package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        package.__package__ = name
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
        for sub in ("x86", "arm_cpu"):
            setattr(package, sub, importlib.import_module(f"{name}.{sub}"))
    from tvm.s_tir import meta_schedule as ms

    return ms


def cold_cache_evaluator(repeats: int = 10):
    """How every candidate is timed: ``repeats`` single runs, each after flushing the weights
    and the output from the caches (the first argument, the activation, stays warm).

    That is how a kernel runs inside the model, whose 80 MB of weights do not fit the L3: timed
    warm, MetaSchedule picked variants that won alone and lost in the model (1–2%, measured).
    """
    ms = meta_schedule()
    return ms.runner.EvaluatorConfig(
        number=1, repeat=repeats, min_repeat_ms=0, enable_cpu_cache_flush=True
    )


def worker_initializer() -> None:
    """For MetaSchedule's builder and runner worker processes: CPU intrinsics only."""
    meta_schedule()


def target_key(target: tvm.target.Target) -> dict:
    """What a database must agree on with the target it is applied to."""
    attrs = target.attrs
    key = {"kind": str(target.kind.name), "tvm": tvm.__version__}
    for field in TARGET_KEYS:
        value = attrs.get(field)
        if value is not None and not isinstance(value, str):
            value = sorted(str(v) for v in value)
        key[field] = value if value is None or isinstance(value, list) else str(value)
    return key


@dataclass
class Database:
    """A tuning database folder and its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def create(cls, path: str | os.PathLike, target: tvm.target.Target) -> Database:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest_file = path / MANIFEST
        if manifest_file.exists():
            db = cls.open(path)
            db.check(target)
            return db
        manifest = {"format": "mbcompile-tuning-db", "target": target_key(target),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        manifest_file.write_text(json.dumps(manifest, indent=2))
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Database:
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise TargetError(f"{path}: not an mbcompile tuning database (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as err:
            raise TargetError(f"{path}: corrupt {MANIFEST} ({err})") from None
        if manifest.get("format") != "mbcompile-tuning-db":
            raise TargetError(f"{path}: not an mbcompile tuning database")
        return cls(path, manifest)

    def mismatch(self, target: tvm.target.Target) -> str | None:
        """Why this database does not fit ``target`` (None if it does)."""
        want, have = target_key(target), self.manifest["target"]
        diffs = [f"{k}: database {have.get(k)!r}, target {want.get(k)!r}"
                 for k in want if have.get(k) != want.get(k)]
        return "; ".join(diffs) or None

    def check(self, target: tvm.target.Target) -> None:
        why = self.mismatch(target)
        if why is not None:
            raise TargetError(
                f"tuning database {self.path} was made for another target or TVM version "
                f"({why}); tune again for this target with `mbcompile tune`"
            )

    def ms_database(self):
        ms = meta_schedule()
        return ms.database.JSONDatabase(
            path_workload=str(self.path / WORKLOADS),
            path_tuning_record=str(self.path / RECORDS),
            module_equality="structural",
        )

    def finished(self) -> dict[str, int]:
        """Task hash → the trial budget its search ended under (see ``FINISHED``)."""
        file = self.path / FINISHED
        if not file.exists():
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(file.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            return {}  # unreadable: the tasks are searched again, which is safe

    def mark_finished(self, task_hashes: list[str], trials: int) -> None:
        done = self.finished()
        for key in task_hashes:
            done[key] = max(done.get(key, 0), trials)
        tmp = self.path / (FINISHED + ".tmp")
        tmp.write_text(json.dumps(done, indent=1, sort_keys=True))
        os.replace(tmp, self.path / FINISHED)  # a Ctrl-C never leaves half a file

    def records(self) -> int:
        file = self.path / RECORDS
        return sum(1 for line in file.open() if line.strip()) if file.exists() else 0


SHIPPED = Path(__file__).resolve().parent / "databases"


def resolve_database(spec, target: tvm.target.Target) -> Database | None:
    """The database ``compile(tuning_db=spec)`` applies: a folder, "default" or None."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec == "default":
        for manifest in sorted(SHIPPED.glob(f"*/{MANIFEST}")):
            db = Database.open(manifest.parent)
            if db.mismatch(target) is None:
                return db
        return None
    db = spec if isinstance(spec, Database) else Database.open(spec)
    db.check(target)
    return db


def apply_database_pass(db: Database) -> tvm.transform.Pass:
    """Replace every PrimFunc the database has a record for by its best tuned schedule."""
    ms_db = db.ms_database()

    @tvm.transform.module_pass(opt_level=0, name="mbcompile_apply_tuning_db")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with ms_db:
            return tvm.relax.transform.MetaScheduleApplyDatabase()(mod)

    return _apply


class Stop(Exception):
    """Raised from the progress callback when the time budget is spent."""


def _progress_callback(ms, total: int, deadline: float | None, log):
    """A MeasureCallback printing trials done, ETA and the best latency per task."""

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.done = 0
            self.start = time.monotonic()
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            if not candidates:  # a task whose space is used up is polled once more: no news
                return
            for result in runner_results:
                if result.run_secs:
                    secs = [float(s) for s in result.run_secs]
                    best = sum(secs) / len(secs)
                    if best < self.best.get(task_id, float("inf")):
                        self.best[task_id] = best
            self.done += len(candidates)
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * max(total - self.done, 0)
            best = self.best.get(task_id)
            best_text = f"{best * 1e6:.1f} us" if best is not None else "none valid yet"
            log(
                f"tune: {self.done}/{total} trials, {elapsed:.0f} s elapsed, ETA {eta:.0f} s; "
                f"task {task_id} best {best_text}"
            )
            if deadline is not None and time.monotonic() > deadline:
                raise Stop()

    return Progress()


def hand_schedules(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> list | None:
    """Our design spaces for ``func``: the schedule the no-tuning path applies
    (targets/schedules/) and, where the rule has knobs, the same rule with them left to sampling
    (register-tile rows, K unroll: ``tunable=True``). None when no rule of ours matches."""
    from .schedules import default_rules

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


def _design_space(ms, func: tvm.tirx.PrimFunc, target: tvm.target.Target):
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
    runner=None,
    builder=None,
    log=print,
) -> dict:
    """Tune the PrimFuncs of a legalized, fused module (deduplicated tasks) into ``db``.

    ``trials`` is the budget per task; a task that already has records in ``db`` gets only what
    is left of it (so an interrupted run resumes). Ctrl-C or the ``minutes`` budget stop early;
    every measured record is already in the database then. ``max_tasks`` keeps the tasks with
    the most FLOPs per forward (kernel FLOPs × calls), for a short budget.
    """
    ms = meta_schedule()
    db.check(target)
    extracted = ms.relax_integration.extract_tasks(mod, target, module_equality="structural")
    extracted = [
        t for t in extracted if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)
    ]
    if max_tasks is not None:
        from tvm.s_tir.analysis import estimate_tir_flops

        extracted.sort(key=lambda t: -t.weight * estimate_tir_flops(t.dispatched[0]))
        extracted = extracted[:max_tasks]
    ms_db = db.ms_database()
    finished = db.finished()
    contexts, weights, hashes, skipped = [], [], [], 0
    for task in extracted:
        task_mod = task.dispatched[0]
        key = task_hash(task_mod)
        done = 0
        if ms_db.has_workload(task_mod):
            done = len(ms_db.get_top_k(ms_db.commit_workload(task_mod), trials))
        if done >= trials or finished.get(key, 0) >= trials:
            skipped += 1
            continue
        hashes.append((key, task_mod))
        contexts.append(
            ms.TuneContext(
                mod=task.dispatched[0],
                target=target,
                space_generator=_design_space(ms, task_mod["main"], target),
                search_strategy="evolutionary",
                task_name=task.task_name,
                num_threads="physical",
            )
        )
        weights.append(float(task.weight))
    summary = {"tasks": len(extracted), "already_tuned": skipped, "tuned": len(contexts)}
    if not contexts:
        log(f"tune: all {len(extracted)} tasks already have {trials} trials, or a search that "
            f"ended before them, in {db.path}")
        return {**summary, "records": db.records()}
    total = trials * len(contexts)
    deadline = time.monotonic() + minutes * 60 if minutes else None
    log(f"tune: {len(extracted)} distinct kernels, {len(contexts)} to tune, {trials} trials each")
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [
        _progress_callback(ms, total, deadline, log)
    ]
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(db.path),
            max_trials_global=total,
            max_trials_per_task=trials,
            num_trials_per_iter=trials_per_batch,
            builder=builder or ms.builder.LocalBuilder(initializer=worker_initializer),
            runner=runner
            or ms.runner.LocalRunner(
                evaluator_config=cold_cache_evaluator(), initializer=worker_initializer
            ),
            database=ms_db,
            cost_model=cost_model,
            measure_callbacks=callbacks,
        )
    except Stop:
        log("tune: time budget spent; the database holds every trial measured so far")
        summary["stopped"] = "time budget"
    except KeyboardInterrupt:
        log(f"tune: interrupted; {db.path} is valid; run the same command again to resume")
        summary["stopped"] = "interrupted"
    else:
        # Every task's search ended: at its budget, or with its space exhausted. A task with no
        # valid measurement (a device that failed, a gather) stays open for the next run.
        db.mark_finished(
            [key for key, mod in hashes if ms_db.get_top_k(ms_db.commit_workload(mod), 1)], trials
        )
    summary["records"] = db.records()
    return summary


def task_hash(task_mod: tvm.IRModule) -> str:
    """A key for a tuning task that is the same in every process (MetaSchedule matches workloads
    by structure too)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(task_mod) & (2**64 - 1):016x}"
