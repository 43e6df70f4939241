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

__all__ = [
    "EncodingMethod",
    "LayerCode",
    "Method",
    "MethodConfig",
    "ModelMethod",
    "Stage",
    "StructureMethod",
    "Task",
    "TaskData",
    "TrainingSettings",
    "ValueMethod",
    "__version__",
    "hookimpl",
]
