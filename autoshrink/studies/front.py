"""The front of a study: the feasible trials no other beats in both size and validation
figure, each counted with its best known figures (its retraining's where taken, the search's
otherwise), so that the front a report shows is the one retraining left."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoshrink.metric import Metric
from autoshrink.studies.retrain import retrained_figures
from autoshrink.studies.setup import SearchOptions
from autoshrink.studies.study import StudyFolder, recorded_metric, trial_summary

__all__ = ["front_trials", "retraining", "take_retrained"]


def front_trials(
    study: optuna.Study, folder: StudyFolder, options: SearchOptions
) -> list[FrozenTrial]:
    """Feasible trials that no other feasible trial matches or beats in both size and
    validation figure, smallest file first. Each trial counts with its best known figures:
    its retraining's where they were taken (:func:`retraining`), the search's otherwise.
    So the front can change after retraining: a plan the short fine-tune left behind joins it
    once retrained, and the members it then beats leave."""
    metric = recorded_metric(study)
    known = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not trial.values or trial.values[0] > options.budget:
            continue
        row = trial_summary(trial)
        figures, taken = retraining(
            folder, row, options.retrain_epochs, options.budget, metric
        )
        if taken and figures is not None:
            row = figures
        known.append((row["bytes"], metric.score(row["val_accuracy"]), trial.number, trial))
    front, best = [], -math.inf
    for _, score, _, trial in sorted(known, key=lambda k: (k[0], -k[1], k[2])):
        if score > best:
            front.append(trial)
            best = score
    return front


def retraining(
    folder: StudyFolder, row: dict[str, Any], epochs: float, budget: int, metric: Metric
) -> tuple[dict[str, Any] | None, bool]:
    """A trial's retrained figures, if it was retrained, and whether they are taken: they
    still fit the budget and validate no worse in the metric's direction (validation picks,
    as everywhere)."""
    figures = retrained_figures(folder, row, epochs) if epochs > 0 else None
    taken = figures is not None and figures["bytes"] <= budget and metric.not_worse(
        figures["val_accuracy"], row["val_accuracy"]
    )
    return figures, taken


def take_retrained(
    folder: StudyFolder, row: dict[str, Any], epochs: float, budget: int, baseline_bytes: int,
    metric: Metric,
) -> None:
    """Make a member's figures its retrained ones when they are taken
    (:func:`retraining`), keeping the search's under ``search``; ``retrained`` holds the
    schedule and whether it was ``taken``."""
    figures, taken = retraining(folder, row, epochs, budget, metric)
    if figures is None:
        return
    row["retrained"] = {
        key: figures[key] for key in ("epochs", "steps", "seconds", "bytes", "val_accuracy")
    }
    row["retrained"]["taken"] = taken
    if not taken:
        return
    keys = ("bytes", "ratio", "val_accuracy", "test_accuracy", "artifact")
    row["search"] = {key: row[key] for key in keys}
    row.update({key: figures[key] for key in keys if key in figures})
    row["ratio"] = baseline_bytes / row["bytes"]
