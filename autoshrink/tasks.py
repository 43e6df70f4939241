"""Tasks: what a search compresses and how it is judged.

A task is a model factory with a width multiplier (distillation builds narrower students
with it), the data split into train / validation / test, a metric with its direction
(higher or lower is better), the loss that fine-tunes it and an example input.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from autoshrink.errors import UsageError
from autoshrink.metric import Direction, Metric, check_direction

__all__ = [
    "Data", "DatasetSplit", "Split", "Task", "TaskData", "TrainingSettings", "accuracy",
    "resolve_task", "supervised_loss",
]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose highest logit is the target class."""
    return (logits.argmax(dim=1) == targets).float().mean().item()


Batch = tuple[torch.Tensor, torch.Tensor]

#: loss(outputs, targets) -> scalar tensor, what fine-tuning and the baseline minimise
SupervisedLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def supervised_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of the outputs (logits) against class targets."""
    return F.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one data split, held in memory (the fast path)."""

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

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Minibatches in a fresh random order each epoch, without end."""
        while True:
            order = torch.randperm(len(self), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                index = order[start : start + batch_size]
                yield self.x[index], self.y[index]

    def ordered(self, batch_size: int) -> Iterator[Batch]:
        """The whole split in order, a batch at a time."""
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]


@dataclass(frozen=True)
class DatasetSplit:
    """A split read from a torch ``Dataset`` of ``(input, target)`` pairs a batch at a
    time: nothing needs the whole split in memory. ``collate`` is the DataLoader's."""

    dataset: Dataset
    collate: Callable[[list[Any]], Any] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """A short hash of the split's length and its first and last 64 examples: changed
        data is noticed without reading all of it (an edit in the middle of an unchanged
        length is not; give such data a new name or clear the cache)."""
        size = len(self)
        picks = sorted({*range(min(size, 64)), *range(max(0, size - 64), size)})
        digest = hashlib.sha256(str(size).encode())
        with torch.random.fork_rng():  # random transforms read the same way every time
            torch.manual_seed(0)
            for x, y in self._loader(list(picks), 64):
                digest.update(x.detach().cpu().numpy().tobytes())
                digest.update(y.detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _loader(self, indices: list[int] | None, batch_size: int, **options: Any) -> Any:
        data = self.dataset if indices is None else Subset(self.dataset, indices)
        return DataLoader(data, batch_size=batch_size, collate_fn=self.collate, **options)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        while True:
            loader = self._loader(
                None, batch_size, shuffle=True, generator=generator, drop_last=True
            )
            yield from ((x, y) for x, y in loader)

    def ordered(self, batch_size: int) -> Iterator[Batch]:
        yield from ((x, y) for x, y in self._loader(None, batch_size))


#: A data split: in memory, or read from a Dataset a batch at a time.
Data = Split | DatasetSplit


@dataclass(frozen=True)
class TaskData:
    """The three splits. Validation is carved from the training data; test steers nothing
    (None when there is no test data: test figures are then not measured)."""

    train: Data
    val: Data
    test: Data | None


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
    with instructions when its data is missing. ``metric`` judges a model (``direction`` says
    whether higher or lower is better); ``loss`` trains the baseline and fine-tunes every
    trial (distillation trains with its own loss).
    """

    name: str
    build_model: Callable[[float], nn.Module]
    load_data: Callable[[Path | None], TaskData]
    input_shape: tuple[int, ...]
    description: str = ""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy
    metric_name: str = "accuracy"
    direction: Direction = "maximize"
    loss: SupervisedLoss = supervised_loss
    #: Whether ``build_model`` takes widths below 1.0; without it the search leaves
    #: model-stage methods (distillation, which trains a narrower student) out.
    narrows: bool = True
    #: Whether ``build_model(1.0)`` returns the trained model itself (a model handed over by
    #: its user): the baseline is then measured as it is, never trained.
    trained: bool = False

    def __post_init__(self) -> None:
        check_direction(self.direction)

    @property
    def judged_by(self) -> Metric:
        """The metric's name and direction (how its values compare and read)."""
        return Metric(self.metric_name, self.direction)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input batch of the right shape (for export and compilation)."""
        return torch.zeros(batch, *self.input_shape)

    def key(self, data: TaskData) -> str:
        """A hash of everything that determines the trained baseline."""
        shapes = {k: list(v.shape) for k, v in self.build_model(1.0).state_dict().items()}
        blob = json.dumps(
            {
                **self.judging_key(),
                "task": self.name,
                "training": asdict(self.training),
                "shapes": shapes,
                "data": [s.fingerprint() if s is not None else None
                         for s in (data.train, data.val, data.test)],
                "torch": torch.__version__.split("+")[0],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def judging_key(self) -> dict[str, str]:
        """The metric and loss as a part of a cache key: empty for the defaults (accuracy,
        maximized, cross-entropy), so the keys of existing caches stay as they were."""
        key = {}
        if self.judged_by != Metric():
            key["metric"] = f"{self.metric_name}/{self.direction}"
        if self.loss is not supervised_loss:
            key["loss"] = getattr(self.loss, "__qualname__", type(self.loss).__name__)
        return key


def resolve_task(name: str, registered: dict[str, Task]) -> Task:
    """The registered task ``name``, or the Task returned by a ``module:function`` reference."""
    if name in registered:
        return registered[name]
    if name.startswith("model:"):
        raise UsageError(
            f"task `{name}` is a model handed over in Python (autoshrink.search(model, ...)); "
            "it is only available there: pass `model=` (and its data) again"
        )
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
