"""Files of a study that readers may see while they change: written in one step, and
identified by their content."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["file_digest", "write_atomic"]


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace ``path`` in one step: a browser or a reader never sees half a file, also
    while a running search rewrites the report; a failed write (a full disk) leaves no side
    file behind."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    partial = Path(name)
    os.fchmod(handle, 0o644)  # as an ordinary file: reports are for others to read too
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)  # a unique side file: two writers never share one
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file (None when it is missing): what caches of a trial are keyed by."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None
