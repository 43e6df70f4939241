"""The MetaSchedule tuning database, one per target in the cache, checked before TVM reads it
(TVM's reader can crash the process on a damaged file)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from autoshrink.errors import first_line
from autoshrink.files import write_atomic

__all__ = ["mark_checked", "open_database"]

_DB_FILES = ("database_workload.json", "database_tuning_record.json")

def _database_problem(folder: Path) -> str | None:
    """What is wrong with the JSON lines of a tuning database, checked in Python first:
    TVM's own reader crashes the process (segfault) on some damage, e.g. a blank line."""
    workloads = 0
    for filename in _DB_FILES:
        path = folder / filename
        if not path.exists():
            continue
        lines = path.read_bytes().split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the newline that ends the file
        for number, line in enumerate(lines, start=1):
            try:
                value = json.loads(line)
            except ValueError:
                return f"{filename} line {number} is not JSON"
            if not isinstance(value, list) or len(value) != 2:
                return f"{filename} line {number} is not a [key, value] pair"
            if filename == _DB_FILES[0]:
                workloads += 1
            elif not (isinstance(value[0], int) and 0 <= value[0] < workloads):
                return f"{filename} line {number} names workload {value[0]!r}"
            elif not isinstance(value[1], list):
                return f"{filename} line {number} holds no tuning record"
    return None


def mark_checked(folder: Path) -> None:
    """Remember the files' sizes and times: unchanged files need no child-process check."""
    (folder / ".checked").write_text(json.dumps(_stamp(folder)))


def _stamp(folder: Path) -> list[list[int]]:
    return [
        [p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [0, 0]
        for p in (folder / f for f in _DB_FILES)
    ]


_CHILD = """
import json, sys
from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord, Workload
folder = sys.argv[1]
try:
    JSONDatabase(work_dir=folder, allow_missing=True)
except Exception:
    with open(folder + "/database_workload.json") as lines:
        workloads = [Workload.from_json(json.loads(line)) for line in lines]
    stale = []
    with open(folder + "/database_tuning_record.json") as lines:
        for number, line in enumerate(lines, start=1):
            index, record = json.loads(line)
            try:
                TuningRecord.from_json(record, workloads[index])
            except Exception:
                stale.append(number)
    print(json.dumps(stale))
    sys.exit(3)
"""


def _load_in_child(folder: Path) -> tuple[str | None, list[int]]:
    """Load the database in a child process first: a crash there costs nothing here.
    Returns what is wrong with it, or the line numbers of tuning records whose schedules no
    longer replay on their workload (TVM refuses the whole file for one such record)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder)],
            capture_output=True, text=True, timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "loading it took over 5 minutes", []
    if done.returncode == 0:
        return None, []
    if done.returncode == 3:
        stale = json.loads(done.stdout.strip().splitlines()[-1])
        if stale:
            return None, stale
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"TVM cannot load it ({lines[-1][:200] if lines else f'exit {done.returncode}'})", []


def _drop_records(folder: Path, stale: list[int], console: Console) -> None:
    """Rewrite the tuning records without the lines in ``stale`` (1-based)."""
    path = folder / _DB_FILES[1]
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for number, line in enumerate(lines, start=1) if number not in set(stale)]
    write_atomic(path, b"".join(kept))
    console.print(
        f"[yellow]warning:[/] tuning database {folder}: dropped {len(stale)} tuning "
        "record(s) whose schedules no longer apply to their workload",
        highlight=False,
    )


def open_database(folder: Path, console: Console | None = None) -> Any:
    """The MetaSchedule JSON database in ``folder``. Records whose schedules no longer
    replay are dropped; a database that is otherwise corrupt is moved aside to
    ``<folder>.corrupt-<time>`` and an empty one started, with a one-line warning either way.

    Checks: each line parses as JSON of the right shape (in Python), and, when the files
    changed since this code last loaded them (``.checked`` holds their sizes and times),
    TVM loads them in a child process; only then are they loaded here. Should loading here
    still fail, the child looks for records that do not replay, once.
    """
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    console = console or Console(stderr=True)
    folder.mkdir(parents=True, exist_ok=True)
    checked = folder / ".checked"
    problem = _database_problem(folder)
    known = checked.is_file() and checked.read_text() == json.dumps(_stamp(folder))
    present = any((folder / f).exists() for f in _DB_FILES)
    for attempt in range(2):
        if problem is None and present and (attempt or not known):
            problem, stale = _load_in_child(folder)
            if stale:
                _drop_records(folder, stale, console)
        if problem is not None:
            break
        try:
            database = JSONDatabase(work_dir=str(folder), allow_missing=True)
            mark_checked(folder)
            return database
        except Exception as exc:  # TVM raises RuntimeError / InternalError on bad records
            problem = None if attempt == 0 else (
                first_line(exc)
            )
    aside = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(folder), str(aside))
    folder.mkdir(parents=True)
    console.print(
        f"[yellow]warning:[/] tuning database {folder} was corrupt ({problem}); "
        f"moved to {aside.name}, tuning starts afresh",
        highlight=False,
    )
    database = JSONDatabase(work_dir=str(folder), allow_missing=True)
    mark_checked(folder)
    return database
