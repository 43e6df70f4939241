"""The outcome of a study as data: front, recommended model, failures (``pareto.json``).

Schema of ``pareto.json`` (version ``autoshrink-pareto/1``):

- ``study``, ``task``, ``budget_bytes``
- ``metric``: ``name`` and ``direction`` (``maximize`` or ``minimize``) of the task's metric.
  Every ``val_accuracy`` / ``test_accuracy`` below is a value of that metric (the keys keep
  their first name so that older files and readers still work); a file without ``metric`` is
  an older one, whose metric was accuracy, maximised
- ``baseline``: ``bytes``, ``val_accuracy``, ``test_accuracy`` of the float32 reference file
- ``front``: feasible Pareto-optimal trials by Optuna's ``best_trials``, smallest first, each
  with ``trial``, ``bytes``, ``ratio`` (baseline bytes / bytes), ``val_accuracy``,
  ``test_accuracy``, ``artifact`` (relative to the study folder), ``plan``, ``layers`` (bytes
  per layer and section of the artifact) and ``seconds``; a member compiled with
  ``--compile`` also has ``latency`` and ``bundle_bytes`` (its
  ``compiled/trial-NNNN/latency.json``, see :mod:`autoshrink.compile`, used only when it
  was measured on this very artifact); a member retrained after the search
  (:mod:`autoshrink.studies.retrain`) has ``retrained`` (``epochs``, ``steps``, ``seconds``, its
  ``bytes`` and ``val_accuracy``, and ``taken``): when taken, ``bytes`` to ``artifact`` are
  the retrained figures and ``search`` holds the search's
- ``best``: trial number of the recommended model (the best validation metric in its
  direction within the budget; ties go to the smaller file), or null when no trial fit; copied
  to ``best.safetensors``
- ``trials``: every trial with ``state`` (complete / fail / running), ``bytes``,
  ``val_accuracy``, ``feasible`` and ``failure`` (the reason a trial failed)
- ``counts``: ``complete``, ``failed``, ``over_budget``, ``running``
- ``settings``, ``command`` and ``versions``: what reproduces the run
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoshrink.artifact import read_artifact, size_breakdown
from autoshrink.errors import ArtifactError
from autoshrink.files import file_digest, write_atomic
from autoshrink.metric import Metric
from autoshrink.studies.retrain import retrained_figures
from autoshrink.studies.storage import display
from autoshrink.studies.study import (
    ARTIFACT,
    SearchSetup,
    StudyFolder,
    study_identity,
    trial_summary,
)
from autoshrink.training import evaluate

__all__ = ["SCHEMA", "front_trials", "summarize", "versions"]

SCHEMA = "autoshrink-pareto/1"
BEST = "best.safetensors"


def versions() -> dict[str, str]:
    """Versions of autoshrink and the libraries whose behaviour shapes its numbers."""
    found = {}
    for name in ("autoshrink", "torch", "optuna", "ray", "apache-tvm", "pydantic", "pluggy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def front_trials(study: optuna.Study, budget: int) -> list[FrozenTrial]:
    """Feasible Pareto-optimal trials (Optuna's ``best_trials``), smallest file first."""
    front = [t for t in study.best_trials if t.values and t.values[0] <= budget]
    return sorted(front, key=lambda t: t.values[0])


def _test_accuracies(folder: StudyFolder, front: list[FrozenTrial], setup: SearchSetup) -> dict:
    """Test-set metric of each front member (by trial number), measured once from its
    artifact file. The cache is keyed by the study's id, the trial number and the file's
    hash: a figure of another study, or of an earlier file, is never shown."""
    cache = folder.root / "test_accuracy.json"
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    study_id = study_identity(folder).id
    found = {}
    for trial in front:
        path = trial.user_attrs.get(ARTIFACT)
        digest = file_digest(folder.root / path) if path else None
        if digest is None or setup.data.test is None:
            continue  # deleted, or no test data: the report shows the figure as unknown
        key = f"{study_id}/{trial.number}/{digest}"
        if not isinstance(known.get(key), float):
            try:
                artifact = read_artifact(folder.root / path, setup.registry, setup.task)
            except ArtifactError:
                continue  # damaged: unknown, as above
            known[key] = evaluate(artifact.model, setup.data.test, setup.task.metric)
        found[str(trial.number)] = known[key]
    write_atomic(cache, json.dumps(known, indent=2))
    return found


def _take_retrained(
    folder: StudyFolder, row: dict[str, Any], epochs: float, budget: int, baseline_bytes: int,
    metric: Metric,
) -> None:
    """Make a front member's figures its retrained ones when it was retrained, still fits
    the budget and validates no worse in the metric's direction (validation picks, as
    everywhere), keeping the search's under ``search``; ``retrained`` holds the schedule and
    whether it was ``taken``."""
    figures = retrained_figures(folder, row, epochs) if epochs > 0 else None
    if figures is None:
        return
    row["retrained"] = {
        key: figures[key] for key in ("epochs", "steps", "seconds", "bytes", "val_accuracy")
    }
    row["retrained"]["taken"] = taken = (
        figures["bytes"] <= budget
        and metric.not_worse(figures["val_accuracy"], row["val_accuracy"])
    )
    if not taken:
        return
    keys = ("bytes", "ratio", "val_accuracy", "test_accuracy", "artifact")
    row["search"] = {key: row[key] for key in keys}
    row.update({key: figures[key] for key in keys if key in figures})
    row["ratio"] = baseline_bytes / row["bytes"]


def _latency(folder: StudyFolder, number: int, artifact: Path | None) -> dict[str, Any] | None:
    """The timings ``autoshrink compile`` wrote for a compiled trial, if any, and only when
    they were measured on this very artifact file (unreadable or stale ones are skipped: the
    report shows no latency rather than a wrong one)."""
    path = folder.compiled(number) / "latency.json"
    try:
        latency = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(latency, dict) or artifact is None:
        return None
    return latency if latency.get("artifact_sha256") == file_digest(artifact) else None


def summarize(
    study: optuna.Study, folder: StudyFolder, setup: SearchSetup, *, final: bool
) -> dict[str, Any]:
    """The study's outcome. With ``final``, also copy the recommended model to
    ``best.safetensors`` and delete the artifacts of trials off the front."""
    budget = int(setup.settings.budget or 0)
    metric = setup.task.judged_by
    front = front_trials(study, budget)
    tests = _test_accuracies(folder, front, setup)
    baseline_bytes = setup.baseline.bytes
    members = []
    for trial in front:
        row = trial_summary(trial)
        row["ratio"] = baseline_bytes / row["bytes"]
        row["test_accuracy"] = tests.get(str(trial.number))
        _take_retrained(
            folder, row, setup.settings.retrain_epochs, budget, baseline_bytes, metric
        )
        path = folder.root / row["artifact"] if row["artifact"] else None
        row["layers"] = size_breakdown(path) if path and path.is_file() else {}
        latency = _latency(folder, trial.number, path)
        if latency is not None:
            row["latency"] = latency
            row["bundle_bytes"] = latency.get("bundle_bytes")
        members.append(row)
    best = metric.best(members, lambda r: r["val_accuracy"], lambda r: r["bytes"])
    if final:
        _keep_front_only(folder, study, {r["trial"] for r in members}, best)
    trials = []
    counts = {"complete": 0, "failed": 0, "over_budget": 0, "running": 0}
    for trial in study.get_trials(deepcopy=False):
        row = trial_summary(trial)
        row["feasible"] = row["bytes"] is not None and row["bytes"] <= budget
        if row["artifact"] and not (folder.root / row["artifact"]).is_file():
            row["artifact"] = None  # deleted (off the front): name no missing file
        trials.append(row)
        if trial.state == TrialState.COMPLETE:
            counts["complete"] += 1
            counts["over_budget"] += not row["feasible"]
        elif trial.state == TrialState.FAIL:
            counts["failed"] += 1
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
    command = folder.root / "command.txt"
    return {
        "schema": SCHEMA,
        "study": folder.name,
        "task": setup.task.name,
        "budget_bytes": budget,
        "metric": metric.block(),
        "baseline": {
            "bytes": baseline_bytes,
            "val_accuracy": setup.baseline.val_accuracy,
            "test_accuracy": setup.baseline.test_accuracy,
        },
        "notes": list(setup.space.notes),
        "front": members,
        "best": best["trial"] if best else None,
        "best_artifact": BEST if best and final else None,
        "trials": trials,
        "counts": counts,
        "settings": {
            **json.loads(setup.settings.model_dump_json()),
            "storage": display(setup.settings.storage) or None,
        },
        "command": command.read_text().strip() if command.is_file() else None,
        "versions": versions(),
    }


def _keep_front_only(
    folder: StudyFolder, study: optuna.Study, keep: set[int], best: dict | None
) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.number not in keep:
            folder.artifact(trial.number).unlink(missing_ok=True)
            folder.retrained(trial.number).unlink(missing_ok=True)
    if best is not None:
        shutil.copyfile(folder.root / best["artifact"], folder.root / BEST)


def write_json(path: Path, summary: dict[str, Any]) -> None:
    """Write ``pareto.json`` atomically."""
    write_atomic(path, json.dumps(summary, indent=2))
