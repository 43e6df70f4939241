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


def _loads_in_child(folder: Path) -> str | None:
    """Load the database in a child process first: a crash there costs nothing here."""
    code = (
        "import sys\nfrom tvm.s_tir.meta_schedule.database import JSONDatabase\n"
        "JSONDatabase(work_dir=sys.argv[1], allow_missing=True)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "loading it took over 5 minutes"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"TVM cannot load it ({lines[-1][:200] if lines else f'exit {done.returncode}'})"


def open_database(folder: Path, console: Console | None = None) -> Any:
    """The MetaSchedule JSON database in ``folder``; a corrupt one is moved aside to
    ``<folder>.corrupt-<time>`` and an empty one started, with a one-line warning.

    Checks: each line parses as JSON of the right shape (in Python), and, when the files
    changed since this code last loaded them (``.checked`` holds their sizes and times),
    TVM loads them in a child process; only then are they loaded here.
    """
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    folder.mkdir(parents=True, exist_ok=True)
    checked = folder / ".checked"
    problem = _database_problem(folder)
    known = checked.is_file() and checked.read_text() == json.dumps(_stamp(folder))
    if problem is None and not known and any((folder / f).exists() for f in _DB_FILES):
        problem = _loads_in_child(folder)
    if problem is None:
        try:
            database = JSONDatabase(work_dir=str(folder), allow_missing=True)
            mark_checked(folder)
            return database
        except Exception as exc:  # TVM raises RuntimeError / InternalError on bad records
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    aside = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(folder), str(aside))
    folder.mkdir(parents=True)
    (console or Console(stderr=True)).print(
        f"[yellow]warning:[/] tuning database {folder} was corrupt ({problem}); "
        f"moved to {aside.name}, tuning starts afresh",
        highlight=False,
    )
    database = JSONDatabase(work_dir=str(folder), allow_missing=True)
    mark_checked(folder)
    return database

