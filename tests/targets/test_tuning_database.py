"""A tuning database with damaged lines (cut short by a kill, or garbage) is read without them,
with a warning naming the file and the line, by ``compile`` and by a resumed ``tune``; a damaged
manifest is a TargetError naming it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

import mbcompile
from mbcompile import TargetError
from mbcompile.targets.registry import resolve_target
from mbcompile.targets.tuning import MANIFEST, RECORDS, WORKLOADS, Database, resolve_database

SEQ = 16


@pytest.fixture(scope="module")
def model(tiny_tuned):
    return tiny_tuned[0]


@pytest.fixture(scope="module")
def tuned(tiny_tuned):
    """The two costliest kernels of a tiny model, two trials each: two workloads and their
    records (``conftest``)."""
    work_dir = tiny_tuned[1]
    assert len((work_dir / WORKLOADS).read_text().splitlines()) == 2
    return work_dir


@pytest.fixture
def db_copy(tuned, tmp_path):
    return shutil.copytree(tuned, tmp_path / "db")


def host():
    return resolve_target("host").tvm_target()


def lines_of(path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path, lines: list[str], last_newline: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if last_newline else ""))


def tear_last_record(db) -> int:
    """Append half a record, as a kill during the append leaves it; its line number."""
    records = lines_of(db / RECORDS)
    with (db / RECORDS).open("a") as out:
        out.write(records[-1][: len(records[-1]) // 2])
    return len(records) + 1


def test_compile_skips_a_torn_last_record_with_a_warning_and_leaves_the_folder_alone(
    model, db_copy
):
    line = tear_last_record(db_copy)
    before = (db_copy / RECORDS).read_bytes()
    with pytest.warns(RuntimeWarning, match=rf"{RECORDS}, line {line}: not JSON: the last line, "
                                            r"cut short .*; skipped it"):
        compiled = mbcompile.compile(model, seq_len=SEQ, tuning_db=db_copy)
    assert compiled.metadata.tuned_kernels >= 2
    assert (db_copy / RECORDS).read_bytes() == before


def test_resume_skips_a_torn_last_record_with_a_warning_and_cuts_it_off(model, db_copy, tuned):
    line = tear_last_record(db_copy)
    with pytest.warns(RuntimeWarning, match=rf"{db_copy / RECORDS}, line {line}: not JSON"):
        again = mbcompile.tune(model, work_dir=db_copy, seq_len=SEQ, trials=2, max_tasks=2,
                               log=print)
    assert again["already_tuned"] == 2 and again["tuned"] == 0
    assert (db_copy / RECORDS).read_text() == (tuned / RECORDS).read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Database.open(db_copy).ms_database()


def test_torn_and_garbage_lines_in_the_middle_are_each_skipped_with_a_warning(db_copy):
    records = lines_of(db_copy / RECORDS)
    damaged = [records[0], records[1][:40], "not JSON at all", '{"a": 1}', *records[1:]]
    write_lines(db_copy / RECORDS, damaged)
    with pytest.warns(RuntimeWarning) as caught:
        ms_db = resolve_database(db_copy, host()).ms_database()
    messages = [str(w.message) for w in caught]
    assert any(f"{RECORDS}, line 2: not JSON; skipped it" in m for m in messages), messages
    assert any(f"{RECORDS}, line 3: not JSON; skipped it" in m for m in messages), messages
    assert any(f"{RECORDS}, line 4: not a MetaSchedule tuning record" in m for m in messages)
    assert len(ms_db.get_all_tuning_records()) == len(records)


def test_a_record_metaschedule_cannot_read_is_skipped_with_a_warning(db_copy):
    records = lines_of(db_copy / RECORDS)
    write_lines(db_copy / RECORDS, [records[0], '[0, [["no trace"], [1.0], {}, []]]', *records[1:]])
    with pytest.warns(RuntimeWarning, match=rf"{RECORDS}, line 2: MetaSchedule cannot read"):
        ms_db = Database.open(db_copy).ms_database()
    assert len(ms_db.get_all_tuning_records()) == len(records)


def test_records_keep_their_kernel_when_a_workload_line_before_it_is_damaged(tuned, db_copy):
    workloads = lines_of(db_copy / WORKLOADS)
    write_lines(db_copy / WORKLOADS, [workloads[0][:100], workloads[1]])  # the first kernel torn
    records = [json.loads(line) for line in lines_of(db_copy / RECORDS)]
    of_second = [r for r in records if r[0] == 1]
    assert of_second and len(of_second) < len(records)
    with pytest.warns(RuntimeWarning) as caught:
        ms_db = Database.open(db_copy).ms_database()
    messages = [str(w.message) for w in caught]
    assert any(f"{WORKLOADS}, line 1: not JSON" in m for m in messages), messages
    assert sum(f"its kernel, line 1 of {WORKLOADS}, is missing or skipped" in m
               for m in messages) == len(records) - len(of_second)
    # what is left are the second kernel's records, on the second kernel
    left = ms_db.get_all_tuning_records()
    assert len(left) == len(of_second)
    original = Database.open(tuned).ms_database()
    second = {tuple(round(s, 12) for s in r[1][1]) for r in of_second}
    kernels = {rec.workload for rec in original.get_all_tuning_records()
               if tuple(round(float(s), 12) for s in rec.run_secs) in second}
    assert len(kernels) == 1
    (kernel,) = kernels
    assert len(ms_db.get_top_k(ms_db.commit_workload(kernel.mod), 100)) == len(
        original.get_top_k(kernel, 100)
    )


def test_a_manifest_that_is_not_json_is_a_target_error_naming_it(db_copy):
    (db_copy / MANIFEST).write_text('{"format": "mbcompile-tuning-db", "tar')
    with pytest.raises(TargetError, match=rf"{db_copy / MANIFEST} is not valid JSON"):
        resolve_database(db_copy, host())


@pytest.mark.parametrize("manifest", ["[]", '"text"', '{"format": "mbcompile-tuning-db"}',
                                      '{"format": "mbcompile-tuning-db", "target": 3}'])
def test_a_manifest_of_another_shape_is_a_target_error_naming_it(db_copy, manifest):
    (db_copy / MANIFEST).write_text(manifest)
    with pytest.raises(TargetError, match=rf"{db_copy / MANIFEST}"):
        resolve_database(db_copy, host())


def test_a_clean_database_is_read_once_while_its_files_stay_the_same(db_copy):
    """Opening parses every kernel (seconds for a shipped database): a second compile in the
    process gets the database read before, until a tune changes the files."""
    first = Database.open(db_copy).ms_database()
    assert Database.open(db_copy).ms_database() is first
    records = lines_of(db_copy / RECORDS)
    write_lines(db_copy / RECORDS, records[:-1])  # as if another run rewrote it
    again = Database.open(db_copy).ms_database()
    assert again is not first
    assert len(again.get_all_tuning_records()) == len(records) - 1


def test_a_damaged_database_warns_at_every_open(db_copy):
    tear_last_record(db_copy)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="not JSON"):
            Database.open(db_copy).ms_database()
