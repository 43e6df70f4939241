"""The outcome of a study as data: front, recommended model, failures (``pareto.json``).

Schema of ``pareto.json`` (version ``autoshrink-pareto/1``):

- ``study``, ``task``, ``budget_bytes``
- ``baseline``: ``bytes``, ``val_accuracy``, ``test_accuracy`` of the float32 reference file
- ``front``: feasible Pareto-optimal trials by Optuna's ``best_trials``, smallest first, each
  with ``trial``, ``bytes``, ``ratio`` (baseline bytes / bytes), ``val_accuracy``,
  ``test_accuracy``, ``artifact`` (relative to the study folder), ``plan``, ``layers`` (bytes
  per layer and section of the artifact) and ``seconds``; a member compiled with
  ``--compile`` also has ``latency`` (its ``compiled/trial-NNNN/latency.json``, the schema of
  :mod:`autoshrink.compiler`)
- ``best``: trial number of the recommended model (best validation accuracy within the
  budget; ties go to the smaller file), or null when no trial fit; copied to
  ``best.safetensors``
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
from autoshrink.study import ARTIFACT, SearchSetup, StudyFolder, trial_summary
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
    """Test-set accuracy of each front member, measured once from its artifact file."""
    cache = folder.root / "test_accuracy.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    for trial in front:
        key = str(trial.number)
        path = trial.user_attrs.get(ARTIFACT)
        if key in known or path is None:
            continue
        try:
            artifact = read_artifact(folder.root / path, setup.registry, setup.task)
        except ArtifactError:
            continue  # deleted or damaged: the report shows the accuracy as unknown
        known[key] = evaluate(artifact.model, setup.data.test, setup.task.metric)
    cache.write_text(json.dumps(known, indent=2))
    return known


def _latency(folder: StudyFolder, number: int) -> dict[str, Any] | None:
    """The timings ``autoshrink.compiler`` wrote for a compiled trial, if any (unreadable
    ones are skipped: the report shows no latency rather than failing)."""
    path = folder.compiled(number) / "latency.json"
    try:
        latency = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return latency if isinstance(latency, dict) else None


def summarize(
    study: optuna.Study, folder: StudyFolder, setup: SearchSetup, *, final: bool
) -> dict[str, Any]:
    """The study's outcome. With ``final``, also copy the recommended model to
    ``best.safetensors`` and delete the artifacts of trials off the front."""
    budget = int(setup.settings.budget or 0)
    front = front_trials(study, budget)
    tests = _test_accuracies(folder, front, setup)
    baseline_bytes = setup.baseline.bytes
    members = []
    for trial in front:
        row = trial_summary(trial)
        row["ratio"] = baseline_bytes / row["bytes"]
        row["test_accuracy"] = tests.get(str(trial.number))
        path = folder.root / row["artifact"] if row["artifact"] else None
        row["layers"] = size_breakdown(path) if path and path.is_file() else {}
        latency = _latency(folder, trial.number)
        if latency is not None:
            row["latency"] = latency
            row["bundle_bytes"] = latency.get("bundle_bytes")
        members.append(row)
    best = max(members, key=lambda r: (r["val_accuracy"], -r["bytes"]), default=None)
    trials = []
    counts = {"complete": 0, "failed": 0, "over_budget": 0, "running": 0}
    for trial in study.get_trials(deepcopy=False):
        row = trial_summary(trial)
        row["feasible"] = row["bytes"] is not None and row["bytes"] <= budget
        trials.append(row)
        if trial.state == TrialState.COMPLETE:
            counts["complete"] += 1
            counts["over_budget"] += not row["feasible"]
        elif trial.state == TrialState.FAIL:
            counts["failed"] += 1
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
    if final:
        _keep_front_only(folder, study, {r["trial"] for r in members}, best)
    command = folder.root / "command.txt"
    return {
        "schema": SCHEMA,
        "study": folder.name,
        "task": setup.task.name,
        "budget_bytes": budget,
        "baseline": {
            "bytes": baseline_bytes,
            "val_accuracy": setup.baseline.val_accuracy,
            "test_accuracy": setup.baseline.test_accuracy,
        },
        "front": members,
        "best": best["trial"] if best else None,
        "best_artifact": BEST if best and final else None,
        "trials": trials,
        "counts": counts,
        "settings": json.loads(setup.settings.model_dump_json()),
        "command": command.read_text().strip() if command.is_file() else None,
        "versions": versions(),
    }


def _keep_front_only(
    folder: StudyFolder, study: optuna.Study, keep: set[int], best: dict | None
) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.number not in keep:
            folder.artifact(trial.number).unlink(missing_ok=True)
    if best is not None:
        shutil.copyfile(folder.root / best["artifact"], folder.root / BEST)


def write_json(path: Path, summary: dict[str, Any]) -> None:
    """Write ``pareto.json`` atomically."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(summary, indent=2))
    partial.replace(path)
