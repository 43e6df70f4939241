"""Errors autoshrink reports to its users as one line each."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class AutoshrinkError(Exception):
    """A failure explained in one line; the CLI prints it and exits with :attr:`exit_code`."""

    exit_code = 1


class UsageError(AutoshrinkError):
    """The user asked for something invalid (a bad flag, preset, task or budget)."""

    exit_code = 2


class PluginError(AutoshrinkError):
    """A plugin is broken: it failed to import, misnamed a hook or registered a bad method."""


class PlanError(UsageError):
    """A compression plan names an unknown method or an impossible combination."""


class ArtifactError(AutoshrinkError):
    """An artifact file is missing, truncated, corrupt or not an autoshrink artifact."""


class DataNotFoundError(UsageError):
    """A dataset a task needs is not on this machine."""


class CompileError(AutoshrinkError):
    """Compiling failed or the compiled model does not compute what the artifact does."""
