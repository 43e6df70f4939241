"""The Python API: what the command line does, callable from a script or a notebook.

    import autoshrink
    result = autoshrink.search(model, train=train_loader, val=val_loader, test=test_loader,
                               budget="200KB", trials=24, out="reports")
    result.front          # members: bytes, validation / test metric, plan, artifact path
    result.best           # the recommended member
    small = autoshrink.load(result.best.artifact, model=model)   # a runnable nn.Module
    autoshrink.compile(result.best.artifact, model=model, target="cpu")

``search(task="fashion-mnist-mlp", budget="5MB")`` runs a registered task, exactly as
``autoshrink search --task fashion-mnist-mlp --budget 5MB`` does: settings resolve the same
way (defaults < ``autoshrink.toml`` < ``AUTOSHRINK_*`` < arguments) and go through the same
code, so the two give the same results.

A model of your own needs no width factory: its compressible layers are found, its trained
weights are the baseline (nothing is trained again), and ``student=callable(width)`` lets the
search distil into narrower students (without it, distillation is left out of the space).
Its data comes as ``DataLoader``s or ``Dataset``s of ``(input, target)`` pairs, read a batch
at a time (nothing needs a whole split in memory), or as ``(inputs, targets)`` tensors (the
in-memory fast path). When only ``train`` is given, a seeded tenth of it becomes the
validation split.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from autoshrink.errors import UsageError
from autoshrink.plan import Plan
from autoshrink.settings import Settings, load_settings
from autoshrink.study import Provided, StudyFolder
from autoshrink.tasks import Data, DatasetSplit, Split, Task, TaskData, accuracy

__all__ = ["Member", "SearchResult", "callable_module", "compile", "load", "model_task",
           "report", "resume", "search"]

#: The share of ``train`` held out for validation when no ``val`` is given.
VALIDATION_SHARE = 0.1


@dataclass(frozen=True)
class Member:
    """A model on the Pareto front: its file, size and measured figures."""

    trial: int
    bytes: int
    val_accuracy: float
    test_accuracy: float | None
    plan: Plan
    artifact: Path
    retrained: bool


@dataclass(frozen=True)
class SearchResult:
    """What a search left in its study folder (``summary`` is ``pareto.json``)."""

    folder: Path
    front: list[Member]
    best: Member | None
    summary: dict[str, Any]
    interrupted: bool = False


def search(
    model: nn.Module | None = None,
    *,
    budget: str | int,
    task: str | Task | None = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    student: Callable[[float], nn.Module] | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy,
    trials: int | None = None,
    timeout: float | None = None,
    out: str | Path | None = None,
    study: str | None = None,
    console: Console | None = None,
    **options: Any,
) -> SearchResult:
    """Search per-layer compression plans for ``model`` (with its data) or a registered
    ``task`` under ``budget`` (``"5MB"``, ``"200KiB"`` or bytes). ``options`` are the other
    settings by name (``seed``, ``sampler``, ``space``, ``finetune_steps``,
    ``retrain_epochs``, ...). Ctrl-C stops after saving the finished trials and returns them
    with ``interrupted=True``."""
    provided = _provided(model, task, train, val, test, student, metric, console)
    name = provided.task.name if provided else (task if isinstance(task, str) else None)
    settings = load_settings(
        budget=budget, task=name, trials=trials, timeout=timeout, out=out, study=study,
        **options,
    )
    return _run(settings, console, resume=False, provided=provided)


def resume(
    study: str,
    *,
    out: str | Path | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    model: nn.Module | None = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    student: Callable[[float], nn.Module] | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy,
    console: Console | None = None,
) -> SearchResult:
    """Continue a study (``trials`` is the new total). A study of your own model needs the
    model and data again, as they were."""
    provided = _provided(model, None, train, val, test, student, metric, console)
    settings = load_settings(study=study, out=out, trials=trials, timeout=timeout)
    return _run(settings, console, resume=True, provided=provided)


def report(
    study: str,
    *,
    out: str | Path | None = None,
    model: nn.Module | None = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy,
) -> SearchResult:
    """Rebuild a study's ``index.html``, ``report.md`` and ``pareto.json`` (also while it
    runs) and return its front."""
    from autoshrink.report import regenerate
    from autoshrink.session import study_folder

    provided = _provided(model, None, train, val, test, None, metric, None)
    folder = study_folder(load_settings(study=study, out=out))
    return _result(folder, regenerate(folder, provided))


def load(
    artifact: str | Path, *, model: nn.Module | None = None, task: str | Task | None = None
) -> nn.Module:
    """The runnable model in an artifact file. A file of your own model's search needs that
    model (its architecture: the weights come from the file)."""
    from autoshrink.artifact import read_artifact
    from autoshrink.plugins import load_registry
    from autoshrink.tasks import resolve_task

    registry = load_registry()
    chosen = model_task(model) if model is not None else (
        resolve_task(task, registry.tasks) if isinstance(task, str) else task
    )
    return read_artifact(Path(artifact), registry, chosen).model


def compile(  # noqa: A001 - the name users expect, as torch.compile
    artifact: str | Path,
    *,
    target: str = "cpu",
    trials: int = 256,
    batch: int = 64,
    out: str | Path | None = None,
    threads: int | None = None,
    model: nn.Module | None = None,
    console: Console | None = None,
) -> Any:
    """Compile an artifact with TVM into a bundle (see ``autoshrink compile``); returns the
    :class:`autoshrink.compile.CompileResult`."""
    from autoshrink.compile import compile_artifact
    from autoshrink.plugins import load_registry

    return compile_artifact(
        Path(artifact), load_registry(), target=target, trials=trials, batch=batch,
        out=Path(out) if out else None, threads=threads,
        task=model_task(model) if model is not None else None, console=console,
    )


def callable_module(name: str, call: str) -> None:
    """Make module ``name`` callable as the API function ``call``: ``autoshrink.report`` is
    both the module that writes reports and ``autoshrink.report(study)``, so that the
    package attribute, which Python sets to the module on import, is also the API call."""
    import sys
    import types

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return globals()[call](*args, **kwargs)

    CallableModule.__call__.__doc__ = globals()[call].__doc__
    sys.modules[name].__class__ = CallableModule


# --- your own model as a task -----------------------------------------------------------------


def model_task(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...] | None = None,
    student: Callable[[float], nn.Module] | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy,
) -> Task:
    """A task whose model is ``model`` (its architecture; ``student(width)`` builds narrower
    ones for distillation). Its name, ``model:<class>``, is what its artifacts record."""
    template = copy.deepcopy(model).float().eval()

    def build(width: float) -> nn.Module:
        if width == 1.0:
            return copy.deepcopy(template)
        if student is None:
            raise UsageError(f"width {width} needs a student: pass `student=callable(width)`")
        return student(width)

    def no_data(_: Path | None) -> TaskData:
        raise UsageError("this model's data is passed in Python: `train=`, `val=`, `test=`")

    return Task(
        name=f"model:{type(model).__qualname__}",
        build_model=build,
        load_data=no_data,
        input_shape=tuple(input_shape or ()),
        description=f"{type(model).__name__} handed over in Python",
        metric=metric,
        narrows=student is not None,
    )


def _provided(
    model: nn.Module | None, task: str | Task | None, train: Any, val: Any, test: Any,
    student: Callable[[float], nn.Module] | None,
    metric: Callable[[torch.Tensor, torch.Tensor], float], console: Console | None,
) -> Provided | None:
    if model is None:
        if any(part is not None for part in (train, val, test)):
            raise UsageError("data was given without `model`; pass the model it belongs to")
        return Provided(task=task) if isinstance(task, Task) else None
    if task is not None:
        raise UsageError("pass either `model` (with its data) or `task`, not both")
    if train is None:
        raise UsageError("a model needs `train=` data (`val=` and `test=` are optional)")
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
            "test: no `test=` data, so test accuracy is not measured (validation still "
            "steers the search)", highlight=False,
        )
    shape = tuple(next(training.ordered(1))[0].shape[1:])
    return Provided(
        task=model_task(model, input_shape=shape, student=student, metric=metric),
        data=TaskData(train=training, val=validation, test=testing),
        pretrained=model,
    )


def to_split(data: Any, what: str) -> Data:
    """A split from a ``Split``, ``(inputs, targets)`` tensors (both kept in memory), or a
    ``Dataset`` of ``(input, target)`` pairs or a ``DataLoader`` over one (read a batch at a
    time, with the loader's collate function)."""
    if isinstance(data, Split | DatasetSplit):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return Split(data[0], data[1].long())
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


# --- results ------------------------------------------------------------------------------------


def _run(
    settings: Settings, console: Console | None, *, resume: bool, provided: Provided | None
) -> SearchResult:
    from autoshrink.session import Interrupted, run_search, study_folder

    console = console or Console()
    try:
        outcome = run_search(settings, console, resume=resume, provided=provided)
    except Interrupted as exc:  # Ctrl-C in a notebook: the finished trials are saved
        console.print(str(exc), highlight=False)
        folder = study_folder(settings)
        summary = json.loads((folder.root / "pareto.json").read_text())
        return _result(folder, summary, interrupted=True)
    return _result(outcome.folder, outcome.summary)


def _result(
    folder: StudyFolder, summary: dict[str, Any], interrupted: bool = False
) -> SearchResult:
    members = [
        Member(
            trial=m["trial"],
            bytes=m["bytes"],
            val_accuracy=m["val_accuracy"],
            test_accuracy=m.get("test_accuracy"),
            plan=Plan.model_validate(m["plan"]),
            artifact=folder.root / m["artifact"],
            retrained="search" in m,
        )
        for m in summary["front"]
    ]
    best = next((m for m in members if m.trial == summary["best"]), None)
    return SearchResult(folder.root, members, best, summary, interrupted)
