"""autoshrink: search per-layer mixes of compression methods under a hard byte budget."""

from __future__ import annotations

from autoshrink.hookspecs import hookimpl
from autoshrink.methods import (
    EncodingMethod,
    LayerCode,
    Method,
    MethodConfig,
    ModelMethod,
    Stage,
    StructureMethod,
    ValueMethod,
)
from autoshrink.tasks import Task, TaskData, TrainingSettings

__version__ = "0.1.0"

#: The Python API (autoshrink.api), loaded on first use: plugin authors who import only the
#: method contract do not pay for Optuna and the search.
_API = (
    "Member", "SearchResult", "compile", "load", "model_task", "report", "resume", "search",
)


def __getattr__(name: str) -> object:
    if name in _API:
        from autoshrink import api

        return getattr(api, name)
    raise AttributeError(f"module 'autoshrink' has no attribute {name!r}")


__all__ = [
    "EncodingMethod",
    "LayerCode",
    "Member",
    "Method",
    "MethodConfig",
    "ModelMethod",
    "SearchResult",
    "Stage",
    "StructureMethod",
    "Task",
    "TaskData",
    "TrainingSettings",
    "ValueMethod",
    "__version__",
    "compile",
    "hookimpl",
    "load",
    "model_task",
    "report",
    "resume",
    "search",
]
