"""Tasks: what a search compresses and how it is judged.

A task is a model factory with a width multiplier (distillation builds narrower students
with it), the data split into train / validation / test, a metric and an example input.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from autoshrink.errors import UsageError

__all__ = ["Split", "Task", "TaskData", "TrainingSettings", "accuracy", "resolve_task"]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose highest logit is the target class."""
    return (logits.argmax(dim=1) == targets).float().mean().item()


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one data split, held in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def fingerprint(self) -> str:
        """A short hash of the split's content, so caches notice changed data."""
        digest = hashlib.sha256()
        digest.update(str(tuple(self.x.shape)).encode())
        digest.update(self.y.numpy().tobytes())
        digest.update(self.x[: min(len(self.x), 256)].numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TaskData:
    """The three splits. Validation is carved from the training data; test steers nothing."""

    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class TrainingSettings:
    """How the baseline is trained; part of the baseline's cache key."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Task:
    """A model factory, its data and its metric.

    ``build_model(width)`` returns a fresh untrained model whose hidden widths are scaled by
    ``width`` (1.0 is the reference). ``load_data(data_dir)`` returns the splits; it gets the
    user's ``--data-dir`` (or None) and must raise :class:`autoshrink.errors.DataNotFoundError`
    with instructions when its data is missing.
    """

    name: str
    build_model: Callable[[float], nn.Module]
    load_data: Callable[[Path | None], TaskData]
    input_shape: tuple[int, ...]
    description: str = ""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy
    metric_name: str = "accuracy"
    #: Whether ``build_model`` takes widths below 1.0; without it the search leaves
    #: model-stage methods (distillation, which trains a narrower student) out.
    narrows: bool = True

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input batch of the right shape (for export and compilation)."""
        return torch.zeros(batch, *self.input_shape)

    def key(self, data: TaskData) -> str:
        """A hash of everything that determines the trained baseline."""
        shapes = {k: list(v.shape) for k, v in self.build_model(1.0).state_dict().items()}
        blob = json.dumps(
            {
                "task": self.name,
                "training": asdict(self.training),
                "shapes": shapes,
                "data": [s.fingerprint() for s in (data.train, data.val, data.test)],
                "torch": torch.__version__.split("+")[0],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_task(name: str, registered: dict[str, Task]) -> Task:
    """The registered task ``name``, or the Task returned by a ``module:function`` reference."""
    if name in registered:
        return registered[name]
    if ":" not in name:
        known = ", ".join(sorted(registered)) or "none"
        raise UsageError(
            f"unknown task `{name}`; registered tasks: {known} "
            "(or pass your own as `package.module:function`)"
        )
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load task `{name}`: {exc}") from exc
    if callable(factory) and not isinstance(factory, Task):
        try:
            task = factory()
        except Exception as exc:
            raise UsageError(
                f"task `{name}`: calling `{attr}()` failed ({type(exc).__name__}: {exc}); a "
                "task reference names a function that takes no arguments and returns a Task"
            ) from exc
    else:
        task = factory
    if not isinstance(task, Task):
        raise UsageError(
            f"task `{name}` returned {type(task).__name__}, expected autoshrink.tasks.Task"
        )
    # The reference, not the factory's own name, is what an artifact must record to find it.
    return replace(task, name=name)
