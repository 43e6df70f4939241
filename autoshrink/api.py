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

Any ``metric(outputs, targets) -> float`` judges the model, with ``direction="maximize"``
(accuracy, the default; top-k, F1) or ``"minimize"`` (mean squared error); the search, the
front, the recommended model, retraining and the reports follow it. ``loss(outputs,
targets) -> tensor`` fine-tunes the trials (default: cross-entropy; distillation keeps its own
loss). A regression model, for instance::

    autoshrink.search(model, train=..., val=..., budget="20kB", metric=mse,
                      direction="minimize", loss=torch.nn.functional.mse_loss)

``resume`` and ``report`` take the direction from the study; a custom metric must be passed
again, as the model and its data are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from autoshrink.errors import AutoshrinkError, UsageError
from autoshrink.metric import Metric, check_direction
from autoshrink.plan import Plan
from autoshrink.settings import Settings, load_settings
from autoshrink.studies.folder import StudyFolder
from autoshrink.studies.setup import Provided
from autoshrink.tasks import (
    SupervisedLoss,
    Task,
    accuracy,
    supervised_loss,
)
from autoshrink.user_task import MetricFn, model_task

__all__ = ["Member", "SearchResult", "compile", "load", "model_task",
           "report", "resume", "search"]



@dataclass(frozen=True)
class Member:
    """A model on the Pareto front: its file, size and measured figures. ``val_accuracy``
    and ``test_accuracy`` are values of the search's metric, whatever it is (also readable
    as ``val_metric`` and ``test_metric``; :attr:`SearchResult.metric` names it)."""

    trial: int
    bytes: int
    val_accuracy: float
    test_accuracy: float | None
    plan: Plan
    artifact: Path
    retrained: bool

    @property
    def val_metric(self) -> float:
        return self.val_accuracy

    @property
    def test_metric(self) -> float | None:
        return self.test_accuracy


@dataclass(frozen=True)
class SearchResult:
    """What a search left in its study folder (``summary`` is ``pareto.json``)."""

    folder: Path
    front: list[Member]
    best: Member | None
    summary: dict[str, Any]
    interrupted: bool = False

    @property
    def metric(self) -> Metric:
        """The metric the figures are values of: its name and direction."""
        return Metric.of(self.summary)


def search(
    model: nn.Module | None = None,
    *,
    budget: str | int,
    task: str | Task | None = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    student: Callable[[float], nn.Module] | None = None,
    metric: MetricFn | None = None,
    direction: str | None = None,
    loss: SupervisedLoss | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    out: str | Path | None = None,
    study: str | None = None,
    console: Console | None = None,
    **options: Any,
) -> SearchResult:
    """Search per-layer compression plans for ``model`` (with its data) or a registered
    ``task`` under ``budget`` (``"5MB"``, ``"200KiB"`` or bytes). A model is judged by
    ``metric`` (default: accuracy) in its ``direction`` (``"maximize"``, the default, or
    ``"minimize"``) and fine-tuned with ``loss`` (default: cross-entropy); a task defines its
    own. ``options`` are the other settings by name (``seed``, ``sampler``, ``space``,
    ``finetune_steps``, ``retrain_epochs``, ...). Ctrl-C stops after saving the finished
    trials and returns them with ``interrupted=True``."""
    judging = _judging(model, task, metric, direction, loss, recorded=None)
    provided = _provided(model, task, train, val, test, student, judging, console)
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
    metric: MetricFn | None = None,
    direction: str | None = None,
    loss: SupervisedLoss | None = None,
    console: Console | None = None,
) -> SearchResult:
    """Continue a study (``trials`` is the new total). A study of your own model needs the
    model and data again, as they were, and its metric and loss when they were not the
    defaults (the direction is the study's)."""
    settings = load_settings(study=study, out=out, trials=trials, timeout=timeout)
    recorded = _recorded(settings) if model is not None else None
    judging = _judging(model, None, metric, direction, loss, recorded=recorded)
    provided = _provided(model, None, train, val, test, student, judging, console)
    return _run(settings, console, resume=True, provided=provided)


def report(
    study: str,
    *,
    out: str | Path | None = None,
    model: nn.Module | None = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    metric: MetricFn | None = None,
    direction: str | None = None,
) -> SearchResult:
    """Rebuild a study's ``index.html``, ``report.md`` and ``pareto.json`` (also while it
    runs) and return its front. A study of your own model needs it, its data and a metric
    other than accuracy again (the direction is the study's)."""
    from autoshrink.session import regenerate, study_folder

    settings = load_settings(study=study, out=out)
    recorded = _recorded(settings) if model is not None else None
    judging = _judging(model, None, metric, direction, None, recorded=recorded)
    provided = _provided(model, None, train, val, test, None, judging, None)
    folder = study_folder(settings)
    return _result(folder, regenerate(folder, provided))


def load(
    artifact: str | Path, *, model: nn.Module | None = None, task: str | Task | None = None
) -> nn.Module:
    """The runnable model in an artifact file. A file of your own model's search needs that
    model (its architecture: the weights come from the file)."""
    from autoshrink.artifact import read_artifact
    from autoshrink.registry import load_registry
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
    :class:`autoshrink.compiler.CompileResult`."""
    from autoshrink.compiler import compile_artifact
    from autoshrink.registry import load_registry

    return compile_artifact(
        Path(artifact), load_registry(), target=target, trials=trials, batch=batch,
        out=Path(out) if out else None, threads=threads,
        task=model_task(model) if model is not None else None, console=console,
    )


# --- your own model: how it is judged and handed to the search --------------------------------


@dataclass(frozen=True)
class _Judging:
    """How a model handed over in Python is judged and fine-tuned."""

    metric: MetricFn = accuracy
    direction: str = "maximize"
    loss: SupervisedLoss = supervised_loss


def _recorded(settings: Settings) -> Metric | None:
    """The metric an existing study was searched with (None when there is no readable study
    yet: the usual checks then say what is wrong)."""
    from autoshrink.session import study_folder
    from autoshrink.studies.study import load_study_readonly, recorded_metric

    try:
        folder = study_folder(settings)
        return recorded_metric(load_study_readonly(folder)) if folder.settings.is_file() else None
    except AutoshrinkError:
        return None


def _judging(
    model: nn.Module | None, task: str | Task | None, metric: MetricFn | None,
    direction: str | None, loss: SupervisedLoss | None, *, recorded: Metric | None,
) -> _Judging:
    """The metric, direction and loss asked for, checked; for an existing study (``recorded``)
    the direction defaults to its own, and a metric other than accuracy must be passed."""
    given = {"metric": metric, "direction": direction, "loss": loss}
    if model is None:
        named = [f"`{k}=`" for k, v in given.items() if v is not None]
        if named:
            raise UsageError(
                f"{', '.join(named)} go with `model=`; a task defines its own (Task(metric=..., "
                "metric_name=..., direction=..., loss=...))"
            )
        return _Judging()
    for key in ("metric", "loss"):
        if given[key] is not None and not callable(given[key]):
            raise UsageError(
                f"`{key}=`: expected a function of (outputs, targets), not "
                f"{type(given[key]).__name__}"
            )
    if direction is not None:
        check_direction(direction)
    if recorded is not None:
        if metric is None and recorded.name != "accuracy":
            raise UsageError(
                f"this study was searched with metric `{recorded.name}` ({recorded.direction}); "
                f"pass `metric=` that function again"
            )
        direction = direction or recorded.direction
    return _Judging(metric or accuracy, direction or "maximize", loss or supervised_loss)


def _provided(
    model: nn.Module | None, task: str | Task | None, train: Any, val: Any, test: Any,
    student: Callable[[float], nn.Module] | None, judging: _Judging, console: Console | None,
) -> Provided | None:
    if model is None:
        if any(part is not None for part in (train, val, test)):
            raise UsageError("data was given without `model`; pass the model it belongs to")
        return Provided(task=task) if isinstance(task, Task) else None
    if task is not None:
        raise UsageError("pass either `model` (with its data) or `task`, not both")
    if train is None:
        raise UsageError("a model needs `train=` data (`val=` and `test=` are optional)")
    made = model_task(
        model, train=train, val=val, test=test, student=student, metric=judging.metric,
        direction=judging.direction, loss=judging.loss, console=console,
    )
    return Provided(task=made, data=made.load_data(None))


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
