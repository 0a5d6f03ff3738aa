"""MetaSchedule tuning: a resumable database keyed by target, applied by compile."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import tvm
from helpers import assert_matches_eager, make_model, random_inputs, tiny_config

import mbcompile
from mbcompile import TargetError
from mbcompile.targets.registry import resolve_target
from mbcompile.targets.tuning import MANIFEST, RECORDS, SHIPPED, Database, resolve_database


@pytest.fixture(scope="module")
def tuned(tiny_tuned):
    """A tiny model's two costliest kernels tuned for two trials each (``conftest``)."""
    return tiny_tuned


def test_tuning_measures_the_costliest_kernels_and_reports_progress(tuned):
    _, work_dir, summary, lines = tuned
    assert summary["tuned"] == 2 and summary["records"] >= 2
    assert any("ETA" in line and "best" in line for line in lines)
    manifest = json.loads((work_dir / MANIFEST).read_text())
    assert manifest["target"]["tvm"] == tvm.__version__
    assert manifest["target"]["mcpu"] == resolve_target("host").llvm["mcpu"]


def test_tuning_again_resumes_instead_of_starting_over(tuned, tmp_path):
    model, tuned_dir, _, _ = tuned
    work_dir = shutil.copytree(tuned_dir, tmp_path / "db")  # the shared database stays as it is
    again = mbcompile.tune(model, work_dir=work_dir, seq_len=16, trials=2, max_tasks=2, log=print)
    assert again["already_tuned"] == 2 and again["tuned"] == 0


def test_a_task_whose_space_ran_out_is_not_searched_again_on_resume(tmp_path):
    """Our design space of a dense kernel holds a few dozen distinct schedules: with a budget
    above that, the search ends before the budget, and a second run must not start it again."""
    model = make_model("base", tiny_config(num_hidden_layers=1))
    lines: list[str] = []
    first = mbcompile.tune(
        model, work_dir=tmp_path / "db", seq_len=8, trials=200, max_tasks=1, log=lines.append
    )
    assert first["tuned"] == 1 and 0 < first["records"] < 200  # the space ran out
    again = mbcompile.tune(
        model, work_dir=tmp_path / "db", seq_len=8, trials=200, max_tasks=1, log=lines.append
    )
    assert again["already_tuned"] == 1 and again["tuned"] == 0
    assert again["records"] == first["records"]
    # the budget the search ended under is kept: a larger one would search the task again
    assert list(Database.open(tmp_path / "db").finished().values()) == [200]


def _records_per_task(work_dir) -> list[int]:
    lines = (work_dir / RECORDS).read_text().splitlines()
    return sorted(Counter(json.loads(line)[0] for line in lines).values())


def test_resume_gives_a_task_only_the_trials_it_lacks(tuned, tmp_path):
    """A task with 2 of its 4 trials in the database (a run stopped early, or tuned with a
    smaller budget) gets the 2 it lacks, not 4 more; one with all its trials gets none. (From
    a copy of the module's database: two tasks of 2 trials.)"""
    model, tuned_dir, _, _ = tuned
    work_dir, lines = tmp_path / "db", []
    shutil.copytree(tuned_dir, work_dir)
    assert _records_per_task(work_dir) == [2, 2]
    again = mbcompile.tune(
        model, work_dir=work_dir, seq_len=16, trials=4, max_tasks=1, log=lines.append
    )
    assert again["tuned"] == 1 and _records_per_task(work_dir) == [2, 4]
    assert any("1 to tune, 2 trials (4 each, less those already measured)" in line
               for line in lines), lines
    third = mbcompile.tune(model, work_dir=work_dir, seq_len=16, trials=4, max_tasks=1, log=print)
    assert third["already_tuned"] == 1 and third["tuned"] == 0
    assert _records_per_task(work_dir) == [2, 4]


def test_the_time_budget_stops_the_search_after_a_batch(tmp_path):
    """``minutes``: the search stops at the first batch that ends past the budget (this once
    came out of MetaSchedule as a bare RuntimeError), after the first round's few trials."""
    from mbcompile.targets.tuning_search import FIRST_TRIALS

    model = make_model("base", tiny_config(num_hidden_layers=1))
    summary = mbcompile.tune(model, work_dir=tmp_path / "db", seq_len=16, trials=40,
                             minutes=0.01, max_tasks=1, log=print)
    assert summary["stopped"] == "time budget" and summary["records"] == FIRST_TRIALS


def test_compile_applies_the_database_and_stays_exact(tuned):
    model, work_dir, _, _ = tuned
    compiled = mbcompile.compile(model, seq_len=16, tuning_db=work_dir)
    assert compiled.metadata.tuning_db == str(work_dir)
    assert compiled.metadata.tuned_kernels >= 2  # the two tuned tasks
    ids, mask, types = random_inputs(model.config, (1, 16), pad=3)
    assert_matches_eager(compiled, model, ids, mask, types)


def test_database_for_another_target_is_refused(tmp_path):
    other = resolve_target("x86-64-avx512").tvm_target()
    Database.create(tmp_path / "avx512", other)
    model = make_model("base", tiny_config(num_hidden_layers=1))
    with pytest.raises(TargetError, match="another target or TVM version.*mcpu"):
        mbcompile.compile(model, seq_len=8, tuning_db=tmp_path / "avx512")


def test_folder_without_manifest_is_not_a_database(tmp_path):
    with pytest.raises(TargetError, match="not an mbcompile tuning database"):
        resolve_database(tmp_path, resolve_target("host").tvm_target())


def test_default_database_is_skipped_when_no_shipped_one_matches():
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "btver2"})
    assert resolve_database("default", target) is None


def test_meta_schedule_starts_without_the_gpu_intrinsics():
    code = (
        "import sys, time; t = time.time()\n"
        "from mbcompile.targets.tuning import meta_schedule\n"
        "ms = meta_schedule(); ms.TuneContext\n"
        "assert 'tvm.s_tir.tensor_intrin.cuda' not in sys.modules\n"
        "print(time.time() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 30


# -- the database shipped in targets/databases/ ------------------------------------------------

# Zen 3 (AVX2) and Zen 4 (AVX-512, scheduled with 256-bit vectors): the machine kinds the
# project's machines have been; each database was made by `mbcompile tune` on one of them.
SHIPPED_X86 = {"znver3": SHIPPED / "x86-64-znver3", "znver4": SHIPPED / "x86-64-znver4"}


@pytest.mark.parametrize("cpu", sorted(SHIPPED_X86))
def test_the_shipped_database_was_tuned_by_mbcompile_for_this_tvm_and_its_cpu(cpu):
    db = Database.open(SHIPPED_X86[cpu])
    assert db.manifest["target"]["mtriple"] == "x86_64-linux-gnu"
    assert db.manifest["target"]["mcpu"] == cpu
    assert db.manifest["target"]["tvm"] == tvm.__version__
    assert db.records() >= 24  # every distinct kernel of the default encoder at seq 128


@pytest.fixture(scope="module")
def default_layer():
    """One layer of the google/mobilebert-uncased architecture: the 24 layers' kernels."""
    from mbcompile.capture.models import named_config, random_model

    return random_model(named_config("mobilebert-uncased", num_hidden_layers=1), "base")


# (cpu, precision) → the compile options whose kernels its database holds: Zen 4's was tuned
# again on a Zen 4 for every length the default compile makes (fp32 in session 17, bf16 in
# session 18, int8 in session 22); Zen 3's holds seq 128's in fp32 (tuned on a Zen 3) and in
# int8 (session 22: tuned for the znver3 target on a Zen 4, which runs its AVX2 code; no Zen 3
# has been at hand since 2026-11-24)
SHIPPED_OPTIONS = {
    ("znver3", "fp32"): {"seq_len": 128},
    ("znver3", "int8"): {"seq_len": 128},
    ("znver4", "fp32"): {},
    ("znver4", "bf16"): {},
    ("znver4", "int8"): {},
}


@pytest.mark.parametrize("cpu, precision", sorted(SHIPPED_OPTIONS))
def test_the_shipped_database_holds_every_kernel_of_the_default_encoder_it_was_tuned_for(
    default_layer, cpu, precision
):
    from mbcompile.compiler import prepare
    from mbcompile.options import CompileOptions
    from mbcompile.targets.pipeline import fused_module
    from mbcompile.targets.tuning import _tasks, meta_schedule

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    options = CompileOptions(target="host", **SHIPPED_OPTIONS[cpu, precision])
    mod = prepare(default_layer, options).mod
    # the hand-written attention kernel comes scheduled, and the panel kernels of bf16 and int8
    # have one schedule (schedules/fixed.py): not tuning tasks
    tunable = _tasks(meta_schedule(), fused_module(mod, target, precision), target, None)
    assert len(tunable) >= 20
    ms_db = Database.open(SHIPPED_X86[cpu]).ms_database()
    missing = [
        t.task_name
        for t in tunable
        if ms_db.query_tuning_record(t.dispatched[0], target, "main") is None
    ]
    # a gather whose measurement failed (random ids out of range) has no valid record and keeps
    # its untuned schedule, and so does the elementwise kernel that masks the padding's word
    # embeddings (made after the databases were tuned); every kernel with FLOPs has one
    with_flops = [t.task_name for t in tunable if t.task_name in missing
                  and _has_reduction(t.dispatched[0]["main"])]
    assert with_flops == [], missing
    assert all(any(w in name for w in ("take", "index", "where", "multiply")) for name in missing)


def _has_reduction(func) -> bool:
    """Whether a PrimFunc has a block with a reduction axis (a matmul, a sum: FLOPs to tune)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    todo, found = list(sch.get_child_blocks(sch.get_sblock("root"))), False
    while todo:
        block = todo.pop()
        todo += list(sch.get_child_blocks(block))
        found |= any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)
    return found


def test_compile_applies_the_shipped_database_by_default_on_zen3_or_zen4_and_stays_exact(
    default_layer,
):
    host = resolve_target("host").tvm_target()
    matching = [path for path in SHIPPED_X86.values() if Database.open(path).mismatch(host) is None]
    if not matching:
        pytest.skip(f"no shipped database is for this CPU ({host.attrs.get('mcpu')}) and TVM "
                    f"{tvm.__version__}: they are for {sorted(SHIPPED_X86)}")
    compiled = mbcompile.compile(default_layer, seq_len=128)
    assert compiled.metadata.tuning_db == str(matching[0])
    # a layer runs 15 kernels, 14 of them tunable (the attention kernel comes scheduled); with the
    # embedding's and the pooler's, 19 distinct kernels come from the database
    assert compiled.metadata.tuned_kernels >= 18
    ids, mask, types = random_inputs(default_layer.config, (1, 128), pad=5)
    assert_matches_eager(compiled, default_layer, ids, mask, types)


def test_the_search_runs_every_task_a_few_trials_first_the_costliest_first_in_small_calls():
    """MetaSchedule builds every task's first batch of a call before it measures any (27
    minutes for an int8 build's 235 kernels, stopped by a 24-minute budget with one trial): the
    search gives every task a few trials first, then the rest, in calls of at most a chunk of
    tasks in the order tune_module gives them (the most FLOPs first), and marks a task finished
    only in its last call."""
    from mbcompile.targets.tuning_search import calls

    # as tune_module gives them: the most FLOPs per forward first
    tasks = [{"hash": name, "trials": trials}
             for name, trials in [("b", 40), ("e", 4), ("c", 3), ("d", 40), ("a", 40)]]
    got = [([t["hash"] for t in group], budget, last)
           for group, budget, last in calls(tasks, first_trials=4, chunk=2)]
    assert got == [
        (["b", "e"], 4, {"b": False, "e": True}),  # a few trials each, the costliest first
        (["d", "a"], 4, {"d": False, "a": False}),
        (["c"], 3, {"c": True}),
        (["b", "d"], 36, {"b": True, "d": True}),  # then what each lacks
        (["a"], 36, {"a": True}),
    ]
    # every task's trials in all: its budget
    total = {}
    for group, budget, _ in calls(tasks, first_trials=4, chunk=2):
        for t in group:
            total[t["hash"]] = total.get(t["hash"], 0) + budget
    assert total == {t["hash"]: t["trials"] for t in tasks}
