"""The outcome of a study as data: front, recommended model, failures (``pareto.json``).

Three steps, each named for what it does: :func:`measure_tests` measures the test figures
the front lacks (it needs the data, so only a search runs it); :func:`collect` reads the
study and its folder into an :class:`Outcome` and changes nothing, so a report can be
rendered at any time from the folder alone; :func:`keep_front_only` deletes the artifacts
off the front and copies the recommended one to ``best.safetensors``.

Schema of ``pareto.json`` (version ``autoshrink-pareto/1``):

- ``study``, ``task``, ``budget_bytes``
- ``metric``: ``name`` and ``direction`` (``maximize`` or ``minimize``) of the task's metric.
  Every ``val_accuracy`` / ``test_accuracy`` below is a value of that metric (the keys keep
  their first name so that older files and readers still work); a file without ``metric`` is
  an older one, whose metric was accuracy, maximised
- ``baseline``: ``bytes``, ``val_accuracy``, ``test_accuracy`` of the float32 reference file
- ``front``: feasible Pareto-optimal trials, each with its best known figures (retrained where
  retraining was taken, see :func:`autoshrink.studies.front.front_trials`), smallest first, each
  with ``trial``, ``bytes``, ``ratio`` (baseline bytes / bytes), ``val_accuracy``,
  ``test_accuracy``, ``artifact`` (relative to the study folder), ``plan``, ``layers`` (bytes
  per layer and section of the artifact) and ``seconds``; a member compiled with
  ``--compile`` also has ``latency`` and ``bundle_bytes`` (its
  ``compiled/trial-NNNN/latency.json``, see :mod:`autoshrink.compile`, used only when it
  was measured on this very artifact); a member retrained after the search
  (:mod:`autoshrink.studies.retrain`) has ``retrained`` (``epochs``, ``steps``, ``seconds``, its
  ``bytes`` and ``val_accuracy``, and ``taken``): when taken, ``bytes`` to ``artifact`` are
  the retrained figures and ``search`` holds the search's
- ``left_front``: the trials on the search's front (its figures alone) that left it after
  retraining, a retrained plan beating them
- ``best``: trial number of the recommended model (the best validation metric in its
  direction within the budget; ties go to the smaller file), or null when no trial fit;
  ``best_artifact`` names ``best.safetensors`` when that file is a copy of it
- ``trials``: every trial with ``state`` (complete / fail / pruned / running), ``bytes``,
  ``val_accuracy``, ``feasible``, ``failure`` (the reason a trial failed), ``plan`` (the plan
  built), ``untrained`` / ``fitted`` (why it was measured untrained / why its plan is not the
  one sampled: tightened to fit the budget), ``start`` (the number of the preset's starting
  plan it ran), and for a trial stopped early (pruned)
  ``stopped`` (why) and ``checkpoint`` (its bytes and validation metric where it stopped)
- ``counts``: ``complete``, ``failed``, ``over_budget``, ``running``, ``pruned``
- ``settings``, ``command`` and ``versions``: what reproduces the run
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel

from autoshrink.artifact import read_artifact, size_breakdown
from autoshrink.errors import ArtifactError, UsageError
from autoshrink.files import file_digest, write_atomic
from autoshrink.studies.front import front_trials, take_retrained
from autoshrink.studies.setup import SearchOptions, SearchSetup
from autoshrink.studies.study import (
    ARTIFACT,
    START,
    StudyFolder,
    recorded_metric,
    study_identity,
    trial_summary,
)
from autoshrink.training import evaluate

__all__ = [
    "SCHEMA", "Facts", "Outcome", "collect", "facts_of", "keep_front_only",
    "measure_tests", "read_facts", "record_facts", "versions",
]

SCHEMA = "autoshrink-pareto/1"
BEST = "best.safetensors"
TESTS = "test_accuracy.json"


class Figures(BaseModel):
    """Size and metric figures of one model file."""

    bytes: int
    val_accuracy: float | None = None
    test_accuracy: float | None = None


class TrialRow(BaseModel):
    """One trial of ``trials``: how it ended and, when it finished, its figures."""

    trial: int
    state: str
    bytes: int | None
    val_accuracy: float | None
    artifact: str | None
    seconds: float | None
    failure: str | None
    untrained: str | None
    plan: dict[str, Any] | None
    #: why ``plan`` is not the plan sampled (it was tightened to fit the budget)
    fitted: str | None = None
    #: the preset's starting plan this trial ran (its number among the ``[[start]]`` entries)
    start: int | None = None
    #: why a pruned trial stopped early, and its ``[bytes, validation metric]`` there
    stopped: str | None = None
    checkpoint: list[float] | None = None
    feasible: bool | None = None


class Member(TrialRow):
    """One member of the front (complete, so with figures). ``retrained``, ``search``,
    ``latency`` and ``bundle_bytes`` are there only when the member was retrained or
    compiled."""

    bytes: int
    val_accuracy: float
    ratio: float
    test_accuracy: float | None
    layers: dict[str, Any]
    retrained: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    bundle_bytes: int | None = None


class Counts(BaseModel):
    complete: int = 0
    failed: int = 0
    over_budget: int = 0
    running: int = 0
    #: stopped early (see :mod:`autoshrink.studies.early_stop`)
    pruned: int = 0


class Outcome(BaseModel):
    """A study's outcome: what ``pareto.json`` holds (see the module's docstring)."""

    schema_: str = SCHEMA
    study: str
    task: str
    budget_bytes: int
    metric: dict[str, str]
    baseline: Figures
    notes: list[str]
    front: list[Member]
    #: trials on the search's front that left it after retraining (a retrained plan beats
    #: them); their search figures stay under ``trials``
    left_front: list[int] = []
    best: int | None
    best_artifact: str | None
    trials: list[TrialRow]
    counts: Counts
    settings: dict[str, Any]
    command: str | None
    versions: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        """The outcome as ``pareto.json`` writes it (a member's optional keys only when
        set)."""
        return {"schema": self.schema_, **self.model_dump(mode="json", exclude={"schema_"},
                                                          exclude_unset=True)}


class Facts(BaseModel):
    """What a study's outcome needs beyond its trials, recorded in its folder
    (``facts.json``) when the search starts, so that a report needs no data and no
    baseline: the task's name, the baseline's figures and the space's notes."""

    task: str
    baseline: Figures
    notes: list[str] = []


def facts_of(setup: SearchSetup) -> Facts:
    """The facts of a prepared search."""
    return Facts(
        task=setup.task.name,
        baseline=Figures(
            bytes=setup.baseline.bytes,
            val_accuracy=setup.baseline.val_accuracy,
            test_accuracy=setup.baseline.test_accuracy,
        ),
        notes=list(setup.space.notes),
    )


def record_facts(folder: StudyFolder, facts: Facts) -> None:
    """Write (or refresh) the folder's ``facts.json``."""
    write_atomic(folder.facts, facts.model_dump_json(indent=2))


def read_facts(folder: StudyFolder) -> Facts | None:
    """The folder's recorded facts; ``None`` for a study made before they were recorded."""
    if not folder.facts.is_file():
        return None
    try:
        return Facts.model_validate_json(folder.facts.read_bytes())
    except ValueError as exc:
        raise UsageError(
            f"{folder.facts} is damaged ({str(exc).splitlines()[0]}); `autoshrink resume` "
            "writes it again"
        ) from None


def versions() -> dict[str, str]:
    """Versions of autoshrink and the libraries whose behaviour shapes its numbers."""
    found = {}
    for name in ("autoshrink", "torch", "optuna", "ray", "apache-tvm", "pydantic", "pluggy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _tests_cache(folder: StudyFolder) -> dict[str, Any]:
    """``test_accuracy.json``: test figures keyed by the study's id, the trial number and the
    artifact's hash, so a figure of another study, or of an earlier file, is never shown."""
    cache = folder.root / TESTS
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    return known if isinstance(known, dict) else {}


def _test_key(folder: StudyFolder, study_id: str, trial: FrozenTrial) -> str | None:
    path = trial.user_attrs.get(ARTIFACT)
    digest = file_digest(folder.root / path) if path else None
    return f"{study_id}/{trial.number}/{digest}" if digest else None


def measure_tests(study: optuna.Study, folder: StudyFolder, setup: SearchSetup) -> None:
    """Measure the test-set metric of each front member that has none yet, once, from its
    artifact file, into ``test_accuracy.json`` (nothing to do without test data)."""
    if setup.data.test is None:
        return
    known = _tests_cache(folder)
    study_id = study_identity(folder).id
    for trial in front_trials(study, folder, setup.options):
        key = _test_key(folder, study_id, trial)
        if key is None or isinstance(known.get(key), float):
            continue  # deleted (the figure stays unknown), or measured already
        try:
            artifact = read_artifact(
                folder.root / trial.user_attrs[ARTIFACT], setup.registry, setup.task
            )
        except ArtifactError:
            continue  # damaged: unknown, as above
        known[key] = evaluate(artifact.model, setup.data.test, setup.task.metric)
    write_atomic(folder.root / TESTS, json.dumps(known, indent=2))


def _known_tests(folder: StudyFolder, front: list[FrozenTrial]) -> dict[int, float]:
    known = _tests_cache(folder)
    study_id = study_identity(folder).id
    found = {}
    for trial in front:
        key = _test_key(folder, study_id, trial)
        if key is not None and isinstance(known.get(key), float):
            found[trial.number] = known[key]
    return found


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


def collect(
    study: optuna.Study, folder: StudyFolder, facts: Facts, options: SearchOptions
) -> Outcome:
    """The study's outcome, read from the study and its folder; nothing is written. Test
    figures are those :func:`measure_tests` measured (unknown until it has)."""
    budget = options.budget
    metric = recorded_metric(study)
    front = front_trials(study, folder, options)
    kept = {trial.number for trial in front}
    searched = front_trials(study, folder, replace(options, retrain_epochs=0))
    tests = _known_tests(folder, front)
    baseline_bytes = facts.baseline.bytes
    members = []
    for trial in front:
        row = trial_summary(trial)
        row["ratio"] = baseline_bytes / row["bytes"]
        row["test_accuracy"] = tests.get(trial.number)
        take_retrained(folder, row, options.retrain_epochs, budget, baseline_bytes, metric)
        path = folder.root / row["artifact"] if row["artifact"] else None
        row["layers"] = size_breakdown(path) if path and path.is_file() else {}
        latency = _latency(folder, trial.number, path)
        if latency is not None:
            row["latency"] = latency
            row["bundle_bytes"] = latency.get("bundle_bytes")
        members.append(row)
    best = metric.best(members, lambda r: r["val_accuracy"], lambda r: r["bytes"])
    trials = []
    counts = {"complete": 0, "failed": 0, "over_budget": 0, "running": 0, "pruned": 0}
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
        elif trial.state == TrialState.PRUNED:
            counts["pruned"] += 1
    command = folder.root / "command.txt"
    return Outcome(
        study=folder.name,
        task=facts.task,
        budget_bytes=budget,
        metric=metric.block(),
        baseline=facts.baseline,
        notes=facts.notes,
        front=members,
        left_front=[trial.number for trial in searched if trial.number not in kept],
        best=best["trial"] if best else None,
        best_artifact=BEST if best and _is_copy(folder.root / BEST, folder, best) else None,
        trials=trials,
        counts=Counts(**counts),
        settings=json.loads(options.record),
        command=command.read_text().strip() if command.is_file() else None,
        versions=versions(),
    )


def _is_copy(copy: Path, folder: StudyFolder, best: dict[str, Any]) -> bool:
    """Whether ``best.safetensors`` is (still) a copy of the recommended model's file."""
    source = folder.root / best["artifact"] if best["artifact"] else None
    return bool(source and copy.is_file() and file_digest(copy) == file_digest(source))


def keep_front_only(
    folder: StudyFolder, study: optuna.Study, outcome: Outcome, *, starts: bool = False
) -> None:
    """A finished search's clean-up: delete the artifacts of complete trials off the front
    (and their retrained files), and copy the recommended model to ``best.safetensors``.
    With ``starts``, the trials that ran a starting plan keep theirs too (retraining is
    about to train them again, on the front or not)."""
    keep = {member.trial for member in outcome.front}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.number not in keep and not (
            starts and trial.user_attrs.get(START) is not None
        ):
            folder.artifact(trial.number).unlink(missing_ok=True)
            folder.retrained(trial.number).unlink(missing_ok=True)
    best = next((m for m in outcome.front if m.trial == outcome.best), None)
    if best is not None and best.artifact:
        shutil.copyfile(folder.root / best.artifact, folder.root / BEST)


def write_json(path: Path, summary: dict[str, Any]) -> None:
    """Write ``pareto.json`` atomically."""
    write_atomic(path, json.dumps(summary, indent=2))
