"""A task from your own trained ``nn.Module`` and its data, no width factory needed.

:func:`model_task` makes the :class:`~autoshrink.tasks.Task` (its model is the baseline,
measured and never trained again); :func:`task_data` turns ``DataLoader``s, ``Dataset``s of
``(input, target)`` pairs or ``(inputs, targets)`` tensors into its splits, read a batch at a
time, with a seeded validation share carved out of ``train`` when no ``val`` is given.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from autoshrink.errors import UsageError
from autoshrink.metric import check_direction, metric_name
from autoshrink.tasks import (
    Data,
    DatasetSplit,
    Split,
    SupervisedLoss,
    Task,
    TaskData,
    accuracy,
    supervised_loss,
)

__all__ = ["MetricFn", "VALIDATION_SHARE", "model_task", "task_data", "to_split"]

#: The share of ``train`` held out for validation when no ``val`` is given.
VALIDATION_SHARE = 0.1

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def model_task(
    model: nn.Module,
    *,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    input_shape: tuple[int, ...] | None = None,
    student: Callable[[float], nn.Module] | None = None,
    metric: MetricFn = accuracy,
    direction: str = "maximize",
    loss: SupervisedLoss = supervised_loss,
    console: Console | None = None,
) -> Task:
    """A task whose model is the trained ``model`` (the baseline: measured, never trained
    again; ``student(width)`` builds narrower ones for distillation), judged by ``metric`` in
    ``direction`` (named after the function) and fine-tuned with ``loss``.

    With ``train=`` (and optionally ``val=``, ``test=``, as :func:`search` takes them) the
    task carries its data, so a function returning it can be named on the command line:
    ``autoshrink search --task mymodels:task``, and its artifacts record that reference
    (``autoshrink eval FILE --task mymodels:task`` rebuilds them). Without data its name is
    ``model:<class>`` and its data is passed to :func:`search`."""
    template = copy.deepcopy(model).float().eval()
    data = task_data(train, val, test, metric_name(metric), console) if train is not None \
        else None
    if input_shape is None and data is not None:
        input_shape = tuple(next(data.train.ordered(1))[0].shape[1:])

    def build(width: float) -> nn.Module:
        if width == 1.0:
            return copy.deepcopy(template)
        if student is None:
            raise UsageError(f"width {width} needs a student: pass `student=callable(width)`")
        return student(width)

    def given_data(_: Path | None) -> TaskData:
        if data is None:
            raise UsageError("this model's data is passed in Python: `train=`, `val=`, `test=`")
        return data

    return Task(
        name=f"model:{type(model).__qualname__}",
        build_model=build,
        load_data=given_data,
        input_shape=tuple(input_shape or ()),
        description=f"{type(model).__name__} handed over in Python",
        metric=metric,
        metric_name=metric_name(metric),
        direction=check_direction(direction),
        loss=loss,
        narrows=student is not None,
        trained=True,
    )


def task_data(train: Any, val: Any, test: Any, metric: str, console: Console | None) -> TaskData:
    """The splits from what the caller passed; without ``val`` a seeded share of ``train`` is
    held out, and the console says so (and when there is no test data)."""
    training = to_split(train, "train")
    if val is None:
        training, validation = _carve(training)
        (console or Console(stderr=True)).print(
            f"validation: {len(validation):,} examples held out of `train` (seeded); "
            "pass `val=` to choose them", highlight=False,
        )
    else:
        validation = to_split(val, "val")
    testing = to_split(test, "test") if test is not None else None
    if testing is None:
        (console or Console(stderr=True)).print(
            f"test: no `test=` data, so test {metric} is not measured "
            "(validation still steers the search)", highlight=False,
        )
    return TaskData(train=training, val=validation, test=testing)


def to_split(data: Any, what: str) -> Data:
    """A split from a ``Split``, ``(inputs, targets)`` tensors (both kept in memory), or a
    ``Dataset`` of ``(input, target)`` pairs or a ``DataLoader`` over one (read a batch at a
    time, with the loader's collate function)."""
    if isinstance(data, Split | DatasetSplit):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        # Class labels as int64 (what cross-entropy takes); regression targets stay numbers.
        return Split(data[0], data[1] if data[1].is_floating_point() else data[1].long())
    if isinstance(data, DataLoader):
        return _checked(DatasetSplit(data.dataset, data.collate_fn), what)
    if isinstance(data, Dataset) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
        and not isinstance(data, str | bytes)
    ):
        return _checked(DatasetSplit(data), what)
    raise UsageError(
        f"`{what}=`: expected a DataLoader, a Dataset of (input, target) pairs or "
        f"(inputs, targets) tensors, not {type(data).__name__}"
    )


def _checked(split: DatasetSplit, what: str) -> DatasetSplit:
    """``split`` once its first example is seen to be an (input, target) pair of tensors
    (or numbers)."""
    if len(split) == 0:
        raise UsageError(f"`{what}=` holds no examples")
    item = split.dataset[0]
    if not (isinstance(item, list | tuple) and len(item) == 2):
        raise UsageError(
            f"`{what}=`: each example must be an (input, target) pair, not {type(item).__name__}"
        )
    return split


def _carve(data: Data) -> tuple[Data, Data]:
    """A seeded validation split out of ``data``: the same examples on every call for data
    of the same length (search, resume and report agree, whatever the data's transforms)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(len(data)))
    held = max(1, round(VALIDATION_SHARE * len(data)))
    if held >= len(data):
        raise UsageError("`train=` is too small to hold out a validation split; pass `val=`")
    rest, kept = order[held:], order[:held]
    if isinstance(data, Split):
        return Split(data.x[rest], data.y[rest]), Split(data.x[kept], data.y[kept])
    return (DatasetSplit(Subset(data.dataset, rest.tolist()), data.collate),
            DatasetSplit(Subset(data.dataset, kept.tolist()), data.collate))
