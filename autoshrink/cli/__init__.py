"""The ``autoshrink`` command line: the app (``app``), its commands by group
(``inspection``, ``search``, ``compile``) and the entry point that turns every failure into
one line (``main``)."""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from autoshrink.cli import compile, inspection, search  # noqa: F401, A004 - registers commands
from autoshrink.cli.app import State, app, errors
from autoshrink.errors import AutoshrinkError

__all__ = ["State", "app", "main"]


def _debugging() -> bool:
    return State.debug or os.environ.get("AUTOSHRINK_DEBUG", "") not in ("", "0")


def main() -> None:
    """Console entry point: one line per error, exit 2 for usage errors and 1 for failures;
    a traceback only with ``--debug`` or ``AUTOSHRINK_DEBUG=1``."""
    try:
        app()
    except AutoshrinkError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            errors.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        if _debugging():
            raise
        errors.print(f"[red]error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _one_line(exc: BaseException) -> str:
    """An unexpected error as one line: what failed, where to look next."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{text[:300]} (`--debug` shows where)"

