"""The study journal (Optuna's JSON-lines journal file), checked before anything reads or
appends to it: a journal heals or refuses, it never breaks.

Optuna writes one JSON record per line and ends each with a newline. A search killed while
writing (or a full disk) leaves a *cut tail*: a last line without its newline. Optuna's reader
skips it, but an append would glue the next record onto it and the file would no longer parse,
so a writer first moves the tail to a side file and truncates the journal to its last
complete record. Damage anywhere else (a line that is not a record, an unknown operation) is
refused with one line; ``autoshrink doctor STUDY --repair`` keeps what can be kept, after a
backup.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from optuna.storages.journal._storage import JournalOperation

from autoshrink.errors import AutoshrinkError
from autoshrink.files import write_atomic

__all__ = ["JournalCheck", "JournalError", "check_journal", "heal_for_append", "repair"]

_OPERATIONS = {int(op) for op in JournalOperation}
#: The keys Optuna's replay reads from each operation (besides ``op_code``, ``worker_id``).
_NEEDS = {
    int(JournalOperation.CREATE_STUDY): ("study_name",),
    int(JournalOperation.DELETE_STUDY): ("study_id",),
    int(JournalOperation.SET_STUDY_USER_ATTR): ("study_id", "user_attr"),
    int(JournalOperation.SET_STUDY_SYSTEM_ATTR): ("study_id", "system_attr"),
    int(JournalOperation.CREATE_TRIAL): ("study_id",),
    int(JournalOperation.SET_TRIAL_PARAM): ("trial_id",),
    int(JournalOperation.SET_TRIAL_STATE_VALUES): ("trial_id",),
    int(JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE): ("trial_id",),
    int(JournalOperation.SET_TRIAL_USER_ATTR): ("trial_id", "user_attr"),
    int(JournalOperation.SET_TRIAL_SYSTEM_ATTR): ("trial_id", "system_attr"),
}


class JournalError(AutoshrinkError):
    """A study journal is damaged where only a repair can help."""


@dataclass
class JournalCheck:
    """What :func:`check_journal` found."""

    path: Path
    records: int = 0  # complete, valid records
    complete_bytes: int = 0  # length of the file up to the last newline
    tail: bytes = b""  # a last line without its newline
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)

    @property
    def problem(self) -> str | None:
        """The first damage that a repair must handle, in one line (None: none)."""
        if not self.bad:
            return None
        number, why = self.bad[0]
        more = f" (and {len(self.bad) - 1} more damaged line(s))" if len(self.bad) > 1 else ""
        return f"{self.path} line {number} {why}{more}"


def _record_problem(line: bytes) -> str | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except ValueError:
        return "is not a JSON record"
    if not isinstance(record, dict):
        return "is not a JSON object"
    op = record.get("op_code")
    if not isinstance(op, int) or isinstance(op, bool) or op not in _OPERATIONS:
        return f"has an unknown operation {op!r}"
    missing = [key for key in ("worker_id", *_NEEDS.get(op, ())) if key not in record]
    if missing:
        return f"lacks {', '.join(missing)} for operation {op}"
    return None


def check_journal(path: Path) -> JournalCheck:
    """Read every line of the journal at ``path`` (which must exist) and say what is wrong."""
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    found = JournalCheck(path=path, complete_bytes=complete, tail=data[complete:])
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        why = _record_problem(line)
        if why is None:
            found.records += 1
        else:
            found.bad.append((number, why))
    return found


def _side_file(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def heal_for_append(path: Path, name: str, *, has_artifacts: bool) -> str | None:
    """Make the journal at ``path`` safe to append to, or refuse with one line.

    A cut tail is moved to ``<journal>.tail-<time>`` and the journal truncated to its last
    complete record; returns the line saying so (None when nothing needed doing). Damage
    elsewhere, or an empty journal beside trial artifacts (the study's records are gone, and
    starting afresh would overwrite its files), raises :class:`JournalError` with nothing
    written."""
    if not path.is_file():
        raise JournalError(
            f"study `{name}` has no journal ({path.name} is missing); nothing to resume"
        )
    found = check_journal(path)
    if found.problem:
        raise JournalError(
            f"study journal {found.problem}; nothing was written. "
            f"`autoshrink doctor {name}` explains, `--repair` fixes it after a backup"
        )
    if found.records == 0 and has_artifacts:
        raise JournalError(
            f"study journal {path} is empty but the study has trial artifacts; nothing was "
            f"written. `autoshrink doctor {name}` explains"
        )
    if not found.tail:
        return None
    aside = _side_file(path, "tail")
    aside.write_bytes(found.tail)
    with open(path, "r+b") as journal:
        journal.truncate(found.complete_bytes)
        journal.flush()
        os.fsync(journal.fileno())
    return (
        f"the journal's last record was cut off ({len(found.tail)} bytes, e.g. a crash or a "
        f"full disk while writing); moved it to {aside.name} and continued from the "
        f"{found.records} complete records"
    )


def repair(path: Path) -> tuple[Path, str]:
    """Rewrite the journal keeping its valid records; the original goes to
    ``<journal>.bak-<time>`` first. Returns the backup's path and what was done.

    Records after a damaged line are kept when they stay consistent without it (Optuna
    numbers trials by the order they were created, so a lost create-trial record would
    shift every later record onto the wrong trial) and Optuna can replay the result;
    otherwise the journal is cut at the first damaged line."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    found = check_journal(path)
    backup = _side_file(path, "bak")
    shutil.copy2(path, backup)
    lines = path.read_bytes()[: found.complete_bytes].split(b"\n")[:-1]
    damaged = {number for number, _ in found.bad}
    good = [line for number, line in enumerate(lines, start=1) if number not in damaged]
    first = min(damaged, default=len(lines) + 1)
    attempts = [("dropped the damaged lines", good), ("cut it at the first damaged line",
                                                      lines[: first - 1])]
    for what, kept in attempts:
        if not _trials_consistent(kept):
            continue
        write_atomic(path, b"".join(line + b"\n" for line in kept))
        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
            for name in optuna.get_all_study_names(storage):
                optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except Exception:  # Optuna cannot replay it: try the next, stricter cut
            continue
        dropped = len(lines) - len(kept) + (1 if found.tail else 0)
        return backup, f"{what}: kept {len(kept)} records, dropped {dropped}"
    write_atomic(path, b"")
    return backup, "no record could be kept"


def _trials_consistent(lines: list[bytes]) -> bool:
    """Whether every record names a trial created before it (ids count creations)."""
    created = 0
    for line in lines:
        record = json.loads(line)
        if record["op_code"] == JournalOperation.CREATE_TRIAL:
            created += 1
        elif "trial_id" in record and not (
            isinstance(record["trial_id"], int) and 0 <= record["trial_id"] < created
        ):
            return False
    return True


