"""A tuning database's two MetaSchedule files read line by line (``tuning_database.py`` has
the folder): a damaged line, cut short when the process appending it was killed or garbage
from elsewhere, is skipped with a warning naming the file and the line, and records keep
pointing at the right kernel when a workload line before theirs is skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from mbcompile.targets.metaschedule import meta_schedule

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


@dataclass(frozen=True)
class BadLine:
    """A line of a database file that is skipped, and why."""

    file: Path
    line: int  # counted from 1, as an editor shows it
    why: str

    def warn(self) -> None:
        warnings.warn(
            f"tuning database file {self.file}, line {self.line}: {self.why}; skipped it",
            RuntimeWarning,
            stacklevel=4,
        )


@dataclass
class Lines:
    """The usable lines of a database's two files."""

    workloads: list[tuple[int, str]]  # (line number, text)
    records: list[tuple[int, int, str]]  # (line number, index into workloads, text)
    bad: list[BadLine]
    clean: bool  # the files hold exactly these lines, each ending with a newline

    def workload_lines(self) -> list[str]:
        return [text for _, text in self.workloads]

    def record_lines(self) -> list[str]:
        return [_with_index(text, index) for _, index, text in self.records]


def _with_index(record: str, index: int) -> str:
    """A record line ``[workload index, record]`` pointing at workload ``index``; unchanged
    when it does already (the index is the number before the first comma)."""
    old, rest = record.split(",", 1)
    return record if int(old.strip().lstrip("[")) == index else f"[{index},{rest}"


def _split(file: Path) -> tuple[list[bytes], bool]:
    """The lines of ``file``, and whether the last one ends with a newline (or there is none)."""
    if not file.exists():
        return [], True
    lines = file.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
        return lines, True
    return lines, False


def parse_line(raw: bytes, unterminated: bool) -> tuple[object, str | None]:
    """The JSON value of a line, or why it has none."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError):
        if not raw.strip():
            return None, "an empty line"
        if unterminated:
            return None, "not JSON: the last line, cut short (a write interrupted by a kill?)"
        return None, "not JSON"


def read_lines(path: Path) -> Lines:
    """Parse both files of the database folder ``path``, setting aside the damaged lines."""
    bad: list[BadLine] = []
    raw_workloads, workloads_end = _split(path / WORKLOADS)
    index: dict[int, int] = {}  # workload line (from 0) -> its index among the usable ones
    workloads: list[tuple[int, str]] = []
    for i, raw in enumerate(raw_workloads):
        obj, why = parse_line(raw, not workloads_end and i == len(raw_workloads) - 1)
        if why is None and not (
            isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) for x in obj)
        ):
            why = "not a MetaSchedule workload ([structural hash, module])"
        if why is not None:
            bad.append(BadLine(path / WORKLOADS, i + 1, why))
            continue
        index[i] = len(workloads)
        workloads.append((i + 1, raw.decode("utf-8")))
    raw_records, records_end = _split(path / RECORDS)
    records: list[tuple[int, int, str]] = []
    for i, raw in enumerate(raw_records):
        obj, why = parse_line(raw, not records_end and i == len(raw_records) - 1)
        if why is None:
            if not (
                isinstance(obj, list) and len(obj) == 2 and type(obj[0]) is int
                and isinstance(obj[1], list)
            ):
                why = "not a MetaSchedule tuning record ([workload line, record])"
            elif obj[0] not in index:
                why = f"its kernel, line {obj[0] + 1} of {WORKLOADS}, is missing or skipped"
        if why is not None:
            bad.append(BadLine(path / RECORDS, i + 1, why))
            continue
        records.append((i + 1, index[obj[0]], raw.decode("utf-8")))
    clean = not bad and workloads_end and records_end
    return Lines(workloads, records, bad, clean)


def write_lines(file: Path, lines: list[str]) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, file)  # a kill never leaves half a file


def json_database(folder: Path):
    return meta_schedule().database.JSONDatabase(
        path_workload=str(folder / WORKLOADS),
        path_tuning_record=str(folder / RECORDS),
        module_equality="structural",
    )


def unreadable(lines: Lines, path: Path) -> Lines:
    """``lines`` without those that are JSON of the right shape and that MetaSchedule still
    cannot read (a module or a trace it cannot parse), found one at a time."""
    bad = []
    with tempfile.TemporaryDirectory(prefix="mbcompile-tuning-db-") as tmp:
        folder = Path(tmp)

        def readable(workload: str, records: list[str]) -> bool:
            write_lines(folder / WORKLOADS, [workload])
            write_lines(folder / RECORDS, records)
            try:
                json_database(folder)
            except Exception:  # noqa: BLE001 - any refusal by MetaSchedule means: unreadable
                return False
            return True

        kept: dict[int, int] = {}
        workloads = []
        for i, (line, text) in enumerate(lines.workloads):
            if readable(text, []):
                kept[i] = len(workloads)
                workloads.append((line, text))
            else:
                bad.append(BadLine(path / WORKLOADS, line, "MetaSchedule cannot read this kernel"))
        records = []
        for line, index, record in lines.records:
            if index not in kept:
                why = "its kernel was skipped"
            elif readable(workloads[kept[index]][1], [_with_index(record, 0)]):
                records.append((line, kept[index], record))
                continue
            else:
                why = "MetaSchedule cannot read this record"
            bad.append(BadLine(path / RECORDS, line, why))
    return Lines(workloads, records, bad, clean=False)
