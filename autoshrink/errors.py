"""Errors autoshrink reports to its users as one line each."""

from __future__ import annotations


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
