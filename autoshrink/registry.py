"""The plugin manager: built-ins and third-party plugins, registered through the same hooks.

Third-party plugins are found through the entry-point group ``autoshrink``; a plugin's own
tests register it in-process instead (``load_registry(extra_plugins=[module])``). Set
``AUTOSHRINK_BLOCK_PLUGINS=name,other`` to skip plugins by name (entry-point names, or the
built-ins' ``autoshrink.<module>`` names) and ``AUTOSHRINK_TRACE_HOOKS=1`` to log hook calls.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions
from importlib.metadata import version as distribution_version
from typing import TypeVar

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

__all__ = ["BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "Origin", "Registry", "load_registry"]

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
M = TypeVar("M", bound=Method)


@dataclass(frozen=True)
class Origin:
    """The distribution (and its version, when installed) a method or task comes from."""

    distribution: str
    version: str | None = None

    def __str__(self) -> str:
        """As a requirement: ``autoshrink-ternary==0.1.0`` (the bare name without a version)."""
        return f"{self.distribution}=={self.version}" if self.version else self.distribution

    @classmethod
    def parse(cls, text: str) -> Origin:
        """The origin written as :meth:`__str__` writes it."""
        distribution, _, version = text.partition("==")
        return cls(distribution, version or None)


def _module_origin(plugin: object) -> Origin:
    """The installed distribution holding ``plugin``'s module (a module, or an object whose
    class lives in one); the top-level module's name when no installed one holds it."""
    module = getattr(plugin, "__name__", None) if inspect.ismodule(plugin) else None
    top = (module or type(plugin).__module__).partition(".")[0]
    for distribution in packages_distributions().get(top, []):
        try:
            return Origin(distribution, distribution_version(distribution))
        except PackageNotFoundError:
            continue
    return Origin(top)


@dataclass
class Registry:
    """Every method and task the loaded plugins registered, and what went wrong loading."""

    methods: dict[str, Method] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    #: method or task name -> the distribution that provides it, as ``autoshrink plugins``
    #: shows it
    sources: dict[str, str] = field(default_factory=dict)
    #: method or task name -> its distribution and version (artifacts record these)
    origins: dict[str, Origin] = field(default_factory=dict)
    #: one line for each plugin or registration that was skipped
    problems: list[str] = field(default_factory=list)

    def method(self, name: str, stage: Stage | None = None) -> Method:
        """The method called ``name`` (of ``stage`` when given), or a UsageError."""
        method = self.methods.get(name)
        kind = f"{stage} method" if stage else "method"
        known = ", ".join(m.name for m in self.by_stage(stage)) or "none"
        if method is None:
            raise UsageError(f"unknown {kind} `{name}`; registered: {known}")
        if stage is not None and method.stage != stage:
            raise UsageError(
                f"`{name}` is a {method.stage} method, not a {kind}; {stage} methods: {known}"
            )
        return method

    def _typed(self, name: str, stage: Stage, kind: type[M]) -> M:
        method = self.method(name, stage)
        if not isinstance(method, kind):
            raise UsageError(
                f"method `{name}` says it is a {stage} method but does not subclass "
                f"{kind.__name__}; fix the plugin that registers it"
            )
        return method

    def structure(self, name: str) -> StructureMethod:
        """The structure method called ``name``, or a UsageError naming the registered ones."""
        return self._typed(name, Stage.STRUCTURE, StructureMethod)

    def value(self, name: str) -> ValueMethod:
        """The value method called ``name``, or a UsageError naming the registered ones."""
        return self._typed(name, Stage.VALUE, ValueMethod)

    def encoder(self, name: str) -> EncodingMethod:
        """The encoding method called ``name``, or a UsageError naming the registered ones."""
        return self._typed(name, Stage.ENCODING, EncodingMethod)

    def model(self, name: str) -> ModelMethod:
        """The model method called ``name``, or a UsageError naming the registered ones."""
        return self._typed(name, Stage.MODEL, ModelMethod)

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


def _plugin_manager(
    problems: list[str], strict: bool, extra_plugins: tuple[object, ...]
) -> tuple[pluggy.PluginManager, dict[str, Origin]]:
    """The plugins, registered (built-ins, then entry points, then ``extra_plugins``), and
    the origin of each by its name in the manager."""
    pm = pluggy.PluginManager("autoshrink")
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda message: sys.stderr.write(message))
        pm.enable_tracing()
    for name in os.environ.get(BLOCK_ENV, "").split(","):
        if name.strip():
            pm.set_blocked(name.strip())
    origins: dict[str, Origin] = {}
    builtin = Origin("autoshrink", distribution_version("autoshrink"))
    for module in BUILTIN_PLUGINS:
        name = f"autoshrink.{module}"
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(f"autoshrink_plugins.{module}"), name=name)
            origins[name] = builtin
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
        _check_pending(pm, ep.name, f"plugin `{ep.name}` from {dist}")
        origins[ep.name] = Origin(dist, ep.dist.version if ep.dist else None)
    for plugin in extra_plugins:
        if pm.is_registered(plugin):  # installed as well: registered once
            continue
        name = pm.register(plugin)
        if name is None:  # its canonical name is blocked
            continue
        _check_pending(pm, name, f"plugin {plugin!r}")
        origins[name] = _module_origin(plugin)
    return pm, origins


def _check_pending(pm: pluggy.PluginManager, name: str, label: str) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        raise PluginError(
            f"{label}: {exc}; fix the hook's name, or skip the plugin with {BLOCK_ENV}={name}"
        ) from exc


def load_registry(*, strict: bool = False, extra_plugins: Iterable[object] = ()) -> Registry:
    """Load every plugin and collect what it registers (cached; ``cache_clear()`` reloads).

    ``extra_plugins`` are plugin objects (modules, or objects with ``@hookimpl`` methods)
    registered in-process after the installed ones, as an entry point would register them:
    for a plugin's own tests, with nothing installed. A registry with extras is made fresh on
    every call. A plugin that fails to import, or registers a duplicate or invalid method,
    is skipped and reported in :attr:`Registry.problems`; with ``strict`` it raises
    PluginError instead.
    """
    extra = tuple(extra_plugins)
    return _load(strict, extra) if extra else _cached(strict)


@functools.cache
def _cached(strict: bool) -> Registry:
    return _load(strict, ())


load_registry.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]


def _load(strict: bool, extra_plugins: tuple[object, ...]) -> Registry:
    registry = Registry()
    pm, origins = _plugin_manager(registry.problems, strict, extra_plugins)

    def skip(message: str) -> None:
        registry.problems.append(message)
        if strict:
            raise PluginError(message)

    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        origin = origins[plugin_name]
        source = BUILTIN_SOURCE if origin.distribution == "autoshrink" else origin.distribution
        others = [p for n, p in pm.list_name_plugin() if n != plugin_name and p is not None]

        def register_method(
            method: Method, *, _plugin: str = plugin_name, _source: str = source,
            _origin: Origin = origin,
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
            registry.origins[method.name] = _origin

        def register_task(
            task: Task, *, _plugin: str = plugin_name, _source: str = source,
            _origin: Origin = origin,
        ) -> None:
            if not isinstance(task, Task):
                return skip(f"plugin `{_plugin}` registered {task!r}, not an autoshrink Task")
            if task.name in registry.tasks:
                return skip(f"plugin `{_plugin}` registered task `{task.name}` twice; skipped")
            registry.tasks[task.name] = task
            registry.sources[task.name] = _source
            registry.origins[task.name] = _origin

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
