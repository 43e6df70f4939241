"""The whole plugin API of autoshrink: two markers and the hook specifications.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names
match a spec below. Built-in methods and tasks are registered through exactly these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from autoshrink.methods import Method
    from autoshrink.tasks import Task

hookspec = pluggy.HookspecMarker("autoshrink")
hookimpl = pluggy.HookimplMarker("autoshrink")


@hookspec
def register_methods(register: Callable[[Method], None]) -> None:
    """Register compression methods.

    Called once when the plugin manager builds its registry. Call ``register(method)`` once
    for each :class:`autoshrink.methods.Method` instance the plugin provides. Method names
    must be unique across all plugins.
    """


@hookspec
def register_tasks(register: Callable[[Task], None]) -> None:
    """Register tasks (a model factory with its data and metric).

    Called once when the plugin manager builds its registry. Call ``register(task)`` once
    for each :class:`autoshrink.tasks.Task`. Task names must be unique across all plugins.
    """
