"""The plugin manager: built-ins and third-party plugins, registered through the same hooks.

Third-party plugins are found through the entry-point group ``autoshrink``. Set
``AUTOSHRINK_BLOCK_PLUGINS=name,other`` to skip plugins by name (entry-point names, or the
built-ins' ``autoshrink.<module>`` names) and ``AUTOSHRINK_TRACE_HOOKS=1`` to log hook calls.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

import autoshrink.hookspecs as hookspecs
from autoshrink.errors import PluginError, UsageError
from autoshrink.knobs import config_distributions
from autoshrink.methods import (
    EncodingMethod,
    Method,
    ModelMethod,
    Stage,
    StructureMethod,
    ValueMethod,
)
from autoshrink.tasks import Task

__all__ = ["BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "Registry", "load_registry"]

ENTRY_POINT_GROUP = "autoshrink"
BLOCK_ENV = "AUTOSHRINK_BLOCK_PLUGINS"
TRACE_ENV = "AUTOSHRINK_TRACE_HOOKS"
BUILTIN_SOURCE = "autoshrink (built-in)"
#: Built-in plugin modules; each is registered under the name ``autoshrink.<module>``.
BUILTIN_PLUGINS = (
    "tasks", "dense", "floating", "hashing", "lowrank", "pruning", "quantization", "entropy",
    "distillation",
)
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_STAGE_CLASSES = {
    Stage.MODEL: ModelMethod,
    Stage.STRUCTURE: StructureMethod,
    Stage.VALUE: ValueMethod,
    Stage.ENCODING: EncodingMethod,
}


@dataclass
class Registry:
    """Every method and task the loaded plugins registered, and what went wrong loading."""

    methods: dict[str, Method] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    #: method or task name -> the distribution that provides it
    sources: dict[str, str] = field(default_factory=dict)
    #: one line for each plugin or registration that was skipped
    problems: list[str] = field(default_factory=list)

    def method(self, name: str, stage: Stage | None = None) -> Method:
        """The method called ``name`` (of ``stage`` when given), or a UsageError."""
        method = self.methods.get(name)
        if method is None or (stage is not None and method.stage != stage):
            kind = f"{stage} method" if stage else "method"
            known = ", ".join(m.name for m in self.by_stage(stage)) if stage else ""
            known = known or ", ".join(sorted(self.methods))
            raise UsageError(f"unknown {kind} `{name}`; registered: {known}")
        return method

    def by_stage(self, stage: Stage | None) -> list[Method]:
        """Registered methods of one stage, in registration order."""
        return [m for m in self.methods.values() if stage is None or m.stage == stage]


def check_method(method: object) -> None:
    """Raise ValueError unless ``method`` honours the method contract."""
    if not isinstance(method, Method):
        raise ValueError(f"{method!r} is not an autoshrink.methods.Method")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"method name {name!r} must match {_NAME.pattern}")
    stage = getattr(method, "stage", None)
    if stage not in _STAGE_CLASSES or not isinstance(method, _STAGE_CLASSES[stage]):
        raise ValueError(f"method `{name}` must subclass one of StructureMethod, ValueMethod, ...")
    try:
        method.config()
    except Exception as exc:
        raise ValueError(f"method `{name}`: every Config field needs a default ({exc})") from exc
    config_distributions(method.Config, owner=name)


def _plugin_manager(problems: list[str], strict: bool) -> tuple[pluggy.PluginManager, dict]:
    pm = pluggy.PluginManager("autoshrink")
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda message: sys.stderr.write(message))
        pm.enable_tracing()
    for name in os.environ.get(BLOCK_ENV, "").split(","):
        if name.strip():
            pm.set_blocked(name.strip())
    sources: dict[str, str] = {}
    for module in BUILTIN_PLUGINS:
        name = f"autoshrink.{module}"
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(f"autoshrink_plugins.{module}"), name=name)
            sources[name] = BUILTIN_SOURCE
    pm.check_pending()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if ep.dist else "unknown distribution"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the tool down with it
            problems.append(f"plugin `{ep.name}` from {dist} failed to load: {exc}")
            if strict:
                raise PluginError(problems[-1]) from exc
            continue
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=ep.name)
            raise PluginError(
                f"plugin `{ep.name}` from {dist}: {exc}; fix the hook's name, or skip the plugin "
                f"with {BLOCK_ENV}={ep.name}"
            ) from exc
        sources[ep.name] = dist
    return pm, sources


@functools.cache
def load_registry(*, strict: bool = False) -> Registry:
    """Load every plugin and collect what it registers (cached; ``cache_clear()`` reloads).

    A plugin that fails to import, or registers a duplicate or invalid method, is skipped
    and reported in :attr:`Registry.problems`; with ``strict`` it raises PluginError instead.
    """
    registry = Registry()
    pm, sources = _plugin_manager(registry.problems, strict)

    def skip(message: str) -> None:
        registry.problems.append(message)
        if strict:
            raise PluginError(message)

    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        source = sources.get(plugin_name, plugin_name)
        others = [p for n, p in pm.list_name_plugin() if n != plugin_name and p is not None]

        def register_method(
            method: Method, *, _plugin: str = plugin_name, _source: str = source
        ) -> None:
            try:
                check_method(method)
            except ValueError as exc:
                return skip(f"plugin `{_plugin}` registered an invalid method: {exc}")
            if method.name in registry.methods:
                return skip(
                    f"plugin `{_plugin}` registered method `{method.name}`, already registered "
                    f"by {registry.sources[method.name]}; skipped"
                )
            registry.methods[method.name] = method
            registry.sources[method.name] = _source

        def register_task(
            task: Task, *, _plugin: str = plugin_name, _source: str = source
        ) -> None:
            if not isinstance(task, Task):
                return skip(f"plugin `{_plugin}` registered {task!r}, not an autoshrink Task")
            if task.name in registry.tasks:
                return skip(f"plugin `{_plugin}` registered task `{task.name}` twice; skipped")
            registry.tasks[task.name] = task
            registry.sources[task.name] = _source

        hooks: list[tuple[str, Callable]] = [
            ("register_methods", register_method),
            ("register_tasks", register_task),
        ]
        for hook_name, callback in hooks:
            caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(register=callback)
            except PluginError:
                raise
            except Exception as exc:
                skip(f"plugin `{plugin_name}` failed in {hook_name}: {exc}")
    return registry
