"""Where a study's trials are recorded: the Optuna journal file in the study folder (the
default), or a database named by an Optuna storage URL (``--storage``), which lets machines
that share no file system record trials of one study.

A storage is named by one string, its *address*: the URL, or ``journal:<path>`` for the
journal file. Ray workers get the address and open the storage themselves.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

from optuna.exceptions import ExperimentalWarning
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend

from autoshrink.errors import UsageError, first_line

__all__ = ["JOURNAL", "address_of", "display", "is_journal", "open_storage"]


def is_journal(address: str) -> bool:
    return address.startswith(JOURNAL)

JOURNAL = "journal:"
#: The database driver each URL scheme needs (SQLAlchemy's names), and the extra that
#: installs it; sqlite's comes with Python.
_DRIVERS: dict[str, tuple[str, str] | None] = {
    "sqlite": None,
    "postgresql": ("psycopg2", "postgres"),
    "postgresql+psycopg2": ("psycopg2", "postgres"),
    "mysql+pymysql": ("pymysql", "mysql"),
}
#: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the `postgres` extra installs psycopg2.
_DIALECTS = {"postgresql": "postgresql+psycopg2"}
#: A running trial records a heartbeat this often (s); one silent for the grace period is
#: failed by Optuna's fail_stale_trials and retried once.
HEARTBEAT, GRACE = 30, 120


def address_of(url: str | None, journal: Path) -> str:
    """The storage address for ``--storage url`` (None: the journal file)."""
    if url is None:
        return f"{JOURNAL}{journal}"
    scheme = url.split("://", 1)[0]
    if scheme not in _DRIVERS or "://" not in url:
        raise UsageError(
            f"`--storage` {display(url)!r}: expected sqlite:///path, postgresql://... or "
            "mysql+pymysql://... (or leave it out for the journal file in the study folder)"
        )
    if scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if url in ("sqlite://", "sqlite:///") or ":memory:" in path or path == url:
            raise UsageError(
                f"`--storage` {url}: a study needs a database file that outlives the search, "
                "e.g. sqlite:///path/trials.sqlite"
            )
        # A relative path would name another file when `resume` runs elsewhere.
        return f"sqlite:///{Path(path).resolve()}"
    return url


def open_storage(address: str) -> BaseStorage:
    """The storage at ``address`` (a database's is opened once per process). A missing
    database driver or an unreachable database is one line naming what to do."""
    if address.startswith(JOURNAL):
        return JournalStorage(JournalFileBackend(address.removeprefix(JOURNAL)))
    return _database(address)


@cache
def _database(address: str) -> BaseStorage:
    scheme = address.split("://", 1)[0]
    driver = _DRIVERS.get(scheme)
    if driver is not None:
        try:
            __import__(driver[0])
        except ImportError:
            raise UsageError(
                f"`--storage` {scheme}: the database driver `{driver[0]}` is not installed; "
                f"pip install 'autoshrink[{driver[1]}]'"
            ) from None
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 4
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(
                _DIALECTS.get(scheme, scheme) + address.removeprefix(scheme),
                heartbeat_interval=HEARTBEAT,
                grace_period=GRACE,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:  # SQLAlchemy's errors: unreachable, refused, bad database
        first = first_line(exc)
        raise UsageError(f"`--storage`: cannot open {display(address)}: {first[:200]}") from None


def display(url: str | None) -> str:
    """``url`` (or any text holding one) without its password, for files people share."""
    if url is None or "://" not in url:
        return url or ""
    head, sep, tail = url.partition("://")
    if "@" in tail:
        credentials, _, rest = tail.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{head}{sep}{user}:***@{rest}"
    return url
