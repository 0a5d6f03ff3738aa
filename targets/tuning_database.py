"""A tuning database: the folder ``tune`` writes and ``compile`` applies.

Its files:

- ``manifest.json`` names the LLVM target (triple, cpu, attributes) and the TVM version it was
  tuned with. Applying a database made for another target or TVM version is refused: its
  schedules may not even run here.
- ``database_workload.json`` and ``database_tuning_record.json`` are MetaSchedule's
  ``JSONDatabase``: one JSON line per kernel (``[structural hash, module]``) and one per measured
  candidate (``[line of its kernel in the workload file, record]``), appended as the search
  measures.
- ``finished_tasks.json``: see ``FINISHED``.

A line can be damaged: cut short when the process appending it was killed, or garbage from
elsewhere. MetaSchedule then refuses the whole database with a bare RuntimeError; here such a line
is skipped with a warning naming the file and the line (``database_lines.py`` reads the files
line by line). ``compile`` reads a cleaned copy and leaves the
folder as it is (it may be read-only, as the shipped databases are); ``tune``, which appends,
rewrites the files without those lines first.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tvm

from mbcompile.errors import TargetError
from mbcompile.targets.database_lines import (
    RECORDS,
    WORKLOADS,
    Lines,
    json_database,
    parse_line,
    read_lines,
    unreadable,
    write_lines,
)
from mbcompile.targets.schedules import dot_intrinsics  # noqa: F401 - records name its intrinsics

MANIFEST = "manifest.json"
# Tasks whose search ended on its own (their design space ran out of new candidates before the
# trial budget): {structural hash of the task: the per-task budget of that run}. Without it a
# resumed run would search such a task again, for nothing.
FINISHED = "finished_tasks.json"
FORMAT = "mbcompile-tuning-db"
# Fields of the LLVM target a tuned schedule depends on.
TARGET_KEYS = ("mtriple", "mcpu", "mattr")
SHIPPED = Path(__file__).resolve().parent / "databases"
# MetaSchedule databases read for applying, by folder and the files' identity (inode, size,
# mtime): opening one parses every kernel of the workload file, 2.8 s for the shipped Zen 4
# database, paid by every compile with it, not only the first one of a process. Clean folders
# only (a damaged one warns at every open). Applying only reads them (a query of a kernel the
# database has adds nothing).
_OPENED: dict[tuple, object] = {}
_OPENED_MAX = 4
_OPENED_LOCK = threading.Lock()


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


def count_trials(ms_db) -> Counter:
    """Workload → how many of its candidates the database holds (failed measurements too)."""
    return Counter(record.workload for record in ms_db.get_all_tuning_records())


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
        manifest = {"format": FORMAT, "target": target_key(target),
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
            manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TargetError(
                f"{manifest_file} is not valid JSON ({err}): this tuning database is damaged; "
                f"tune again into a new folder with `mbcompile tune`"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TargetError(
                f"{path}: not an mbcompile tuning database ({manifest_file} does not say "
                f"\"format\": {FORMAT!r})"
            )
        if not isinstance(manifest.get("target"), dict):
            raise TargetError(
                f"{manifest_file} names no target (\"target\": {{...}} is missing): this tuning "
                f"database is damaged; tune again into a new folder with `mbcompile tune`"
            )
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
                f"({why}); tune for this target into another folder (`mbcompile tune -o DIR`)"
            )

    def ms_database(self, *, repair: bool = False):
        """MetaSchedule's ``JSONDatabase`` of this folder; damaged lines are skipped with a
        warning naming the file and the line. ``repair=True`` (for appending to it) rewrites the
        files without them; otherwise a cleaned copy is read and the folder left as it is.
        Read for applying (no ``repair``), a clean folder's database is kept for the next call
        while its files stay the same."""
        key = None if repair else self._identity()
        with _OPENED_LOCK:
            if key is not None and key in _OPENED:
                return _OPENED[key]
        lines = read_lines(self.path)
        if key is not None and lines.clean:
            try:
                opened = self._open(lines, repair)
            except OSError:
                raise
            except Exception:  # noqa: BLE001 - MetaSchedule refused a line: found below
                opened = None
            if opened is not None:
                with _OPENED_LOCK:
                    while len(_OPENED) >= _OPENED_MAX:
                        del _OPENED[next(iter(_OPENED))]
                    _OPENED[key] = opened
                return opened
        for bad in lines.bad:
            bad.warn()
        try:
            return self._open(lines, repair)
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - MetaSchedule refused a line: find which, below
            pass
        lines = unreadable(lines, self.path)
        for bad in lines.bad:
            bad.warn()
        try:
            return self._open(lines, repair)
        except Exception as err:  # noqa: BLE001 - refused with every bad line skipped
            raise TargetError(
                f"MetaSchedule cannot read the tuning database {self.path} ({err}); tune again "
                f"into a new folder with `mbcompile tune`"
            ) from None

    def _identity(self) -> tuple | None:
        """The folder and its two files' inode, size and modification time (None if missing)."""
        try:
            stats = [os.stat(self.path / name) for name in (WORKLOADS, RECORDS)]
        except OSError:
            return None
        return (str(self.path.resolve()),
                *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))

    def _open(self, lines: Lines, repair: bool):
        if lines.clean:
            return json_database(self.path)
        if repair:
            write_lines(self.path / WORKLOADS, lines.workload_lines())
            write_lines(self.path / RECORDS, lines.record_lines())
            return json_database(self.path)
        with tempfile.TemporaryDirectory(prefix="mbcompile-tuning-db-") as tmp:
            write_lines(Path(tmp) / WORKLOADS, lines.workload_lines())
            write_lines(Path(tmp) / RECORDS, lines.record_lines())
            return json_database(Path(tmp))  # it reads both files now: for reading only

    def cut_torn_tails(self) -> None:
        """End both files at their last whole line, after the process appending to them was
        killed: a line cut short is dropped, a whole one that lost only its newline gets it."""
        for file in (self.path / WORKLOADS, self.path / RECORDS):
            if not file.exists() or file.stat().st_size == 0:
                continue
            with file.open("r+b") as data:
                data.seek(-1, os.SEEK_END)
                if data.read(1) == b"\n":
                    continue
                data.seek(0)
                whole = data.read()
                tail = whole[whole.rfind(b"\n") + 1:]
                if parse_line(tail, True)[1] is None:
                    data.write(b"\n")
                else:
                    data.truncate(len(whole) - len(tail))

    def finished(self) -> dict[str, int]:
        """Task hash → the trial budget its search ended under (see ``FINISHED``)."""
        file = self.path / FINISHED
        if not file.exists():
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(file.read_text()).items()}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
            warnings.warn(f"{file} is not a JSON object of task hashes to trial budgets: its "
                          f"tasks will be searched again", RuntimeWarning, stacklevel=2)
            return {}

    def mark_finished(self, task_hashes: list[str], trials: int) -> None:
        done = self.finished()
        for key in task_hashes:
            done[key] = max(done.get(key, 0), trials)
        tmp = self.path / (FINISHED + ".tmp")
        tmp.write_text(json.dumps(done, indent=1, sort_keys=True))
        os.replace(tmp, self.path / FINISHED)  # a Ctrl-C never leaves half a file

    def records(self) -> int:
        """How many whole tuning records the folder holds."""
        return len(read_lines(self.path).records)


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
