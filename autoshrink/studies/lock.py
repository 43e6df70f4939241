"""One writer per study: an OS file lock in the study folder, held while a search writes.

The lock is ``fcntl.flock`` on ``<study>/.lock``: the kernel releases it when the holding
process exits, however it exits, so a killed search never leaves a stale lock behind. The
file itself only tells a second writer who holds the lock (PID, host, since when).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from autoshrink.errors import UsageError

__all__ = ["StudyBusyError", "StudyLock"]


class StudyBusyError(UsageError):
    """Another process is writing the study."""


class StudyLock:
    """``with StudyLock(root):`` holds the study's write lock or raises
    :class:`StudyBusyError` naming the holder. Readers (``report``) never take it."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> StudyLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StudyBusyError(
                f"study `{self.path.parent.name}` is being written by {holder}; wait for that "
                "search to finish (or stop it), then try again"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # Who holds it, for a second writer's message (a full disk only loses that).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            }).encode())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            # The file stays: unlinking it would let a third process lock a new inode while
            # a second still waits on the old one.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may be mid-write: then "another process")."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"PID {int(info['pid'])} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
