"""Study: the Optuna multi-objective search over plans, its setup and its trial records.

Objectives are artifact bytes (minimise) and the task's validation metric (in its direction:
maximise accuracy, minimise an error); the byte budget is a constraint, so over-budget trials
still teach the sampler. The study records the metric: Optuna stores the directions, and the
study's user attribute ``metric`` its name and direction, so ``resume`` and ``report`` need
not be told again (a study without it is an older one: accuracy, maximised). Everything a
study needs lives in its folder ``<out>/<study>/``: the Optuna journal, the settings, the
trials' artifacts.
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autoshrink.baseline import Baseline, load_baseline
from autoshrink.errors import UsageError, first_line
from autoshrink.metric import Metric
from autoshrink.plan import Plan
from autoshrink.registry import Registry, load_registry
from autoshrink.settings import Settings
from autoshrink.space import Preset, Space, build_space, load_preset
from autoshrink.studies.folder import Identity, StudyFolder, study_identity
from autoshrink.studies.journal import JournalError, check_journal
from autoshrink.studies.storage import address_of, display, is_journal, open_storage
from autoshrink.tasks import Task, TaskData, resolve_task
from autoshrink.trial import TrialBudget, TrialOutcome, run_trial

__all__ = [
    "Identity", "Provided", "SearchSetup", "StudyFolder", "WorkerInputs", "check_metric",
    "load_study_readonly", "open_study", "prepare", "worker_setup",
    "outcome_attrs", "recorded_metric", "resolve", "study_identity",
]

# ERROR, not WARNING: Optuna logs every failed trial with its traceback; a failure is one line
# from the progress display and its reason is in the report.
optuna.logging.set_verbosity(optuna.logging.ERROR)
# Optuna 5 deprecates samplers' `constraints_func` in favour of `Trial.set_constraint`, but Ray
# Tune's OptunaSearch tells results without a trial we could set a constraint on, so the
# budget stays a sampler constraint derived from the reported bytes (removal is planned for
# Optuna 7).
warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)

FAILURE = "failure"
#: why a complete trial was measured without training (its plan was far over the budget)
UNTRAINED = "untrained"
UNTRAINED_REASON = "over the budget before training, so not trained"
PLAN = "plan"
ARTIFACT = "artifact"
SECONDS = "seconds"
#: The study's user attribute that records its metric: ``{name, direction}``.
METRIC = "metric"
#: The failure reason of trials stopped from outside (Ctrl-C, a killed search): they do not
#: count toward ``--trials`` and their parameters are tried again on resume.
INTERRUPTED = "interrupted"


@dataclass
class SearchSetup:
    """Everything a trial needs; built once per process (the driver or a Ray worker)."""

    settings: Settings
    registry: Registry
    task: Task
    data: TaskData
    baseline: Baseline
    space: Space
    budget: TrialBudget

    def plan_of(self, params: dict) -> Plan:
        """The plan a trial's parameters describe (define-by-run replayed on fixed values)."""
        return self.space.sample(optuna.trial.FixedTrial(params))

    def run(self, plan: Plan, artifact: Path, number: int) -> TrialOutcome:
        """Trial ``number``: ``plan`` built, trained and measured with this search's task,
        data, baseline and budget, its artifact written to ``artifact`` (every backend)."""
        return run_trial(
            plan, task=self.task, data=self.data, baseline=self.baseline,
            registry=self.registry, artifact=artifact, budget=self.budget,
            seed=self.settings.seed + number,
        )


@dataclass(frozen=True)
class Provided:
    """What a Python caller hands over instead of naming a registered task: the task
    object, and optionally its data."""

    task: Task
    data: TaskData | None = None


def resolve(
    settings: Settings, provided: Provided | None = None, preset: Preset | None = None
) -> tuple[Registry, Task, Space]:
    """Plugins, task and search space (from ``preset``, or the one the settings name):
    everything that needs no data or training."""
    registry = load_registry(strict=settings.strict_plugins)
    task = provided.task if provided else resolve_task(settings.task, registry.tasks)
    preset = preset or load_preset(settings.space)
    space = build_space(task.build_model(1.0), registry, preset, narrows=task.narrows)
    return registry, task, space


def prepare(
    settings: Settings,
    on_step: Callable[[int, int], None] | None = None,
    provided: Provided | None = None,
) -> SearchSetup:
    """Load plugins, task, data, the (cached) baseline and the search space."""
    registry, task, space = resolve(settings, provided)
    data = provided.data if provided and provided.data else task.load_data(settings.data_dir)
    pretrained = task.build_model(1.0) if task.trained else None
    baseline = load_baseline(task, data, registry, pretrained=pretrained, on_step=on_step)
    return SearchSetup(settings, registry, task, data, baseline, space, trial_budget(settings))


def trial_budget(settings: Settings) -> TrialBudget:
    """How much training each trial of a search may spend."""
    return TrialBudget(
        finetune_steps=settings.finetune_steps,
        distill_steps=3 * settings.finetune_steps,
        seconds=settings.trial_timeout,
        size_limit=untrained_limit(int(settings.budget)) if settings.budget else None,
    )


def untrained_limit(budget: int) -> int:
    """Bytes above which a plan, written before training, is not trained. Fine-tuning moves
    an artifact's size only through its entropy-coded streams and its header (the structure
    and bit widths are fixed by the plan), by a few percent, so a plan 10 % over the budget
    stays over it."""
    return budget + budget // 10


@dataclass(frozen=True, eq=False)
class WorkerInputs:
    """What the driver sends each Ray worker through Ray's object store, so that a worker
    reads nothing from the driver's disk: the baseline's weights and measured figures, the
    search-space preset, and the methods the driver's plugins provide (each with its
    distribution and version). The task and the settings travel by name."""

    #: the baseline's cache name (task and cache key): which baseline these weights are
    key: str
    bytes: int
    val_accuracy: float
    test_accuracy: float | None
    #: method name -> its distribution, as ``autoshrink-ternary==0.1.0``
    methods: dict[str, str]
    preset: Preset = field(repr=False)
    state: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def of(cls, setup: SearchSetup) -> WorkerInputs:
        baseline, registry = setup.baseline, setup.registry
        return cls(
            key=baseline.path.name, bytes=baseline.bytes, val_accuracy=baseline.val_accuracy,
            test_accuracy=baseline.test_accuracy,
            methods={name: str(registry.origins.get(name)) for name in registry.methods},
            preset=load_preset(setup.settings.space),
            state={k: v.detach().cpu() for k, v in baseline.model.state_dict().items()},
        )


_WORKER_SETUPS: dict[tuple[str, str], SearchSetup] = {}


def worker_setup(settings_json: str, inputs: WorkerInputs) -> SearchSetup:
    """A Ray worker's setup, cached per process: plugins, task and data loaded here, the
    baseline and the preset as the driver sent them (no baseline is read, trained or cached
    on this machine). Raises UsageError naming what this machine could not load."""
    cached = _WORKER_SETUPS.get((settings_json, inputs.key))
    if cached is not None:
        return cached
    settings = Settings.model_validate_json(settings_json)
    here = f"worker on {socket.gethostname()}"
    try:
        registry = load_registry(strict=settings.strict_plugins)
    except Exception as exc:
        raise UsageError(f"{here} cannot load its plugins: {first_line(exc)}") from exc
    differ = [
        f"`{name}` (driver: {origin}, here: {registry.origins.get(name, 'none')})"
        for name, origin in inputs.methods.items()
        if str(registry.origins.get(name)) != origin
    ]
    if differ:
        why = f" ({registry.problems[0]})" if registry.problems else ""
        raise UsageError(
            f"{here} does not have the driver's plugins: method {', '.join(differ)}{why}; "
            "install the same plugins on every node"
        )
    try:
        registry, task, space = resolve(settings, preset=inputs.preset)
    except Exception as exc:
        raise UsageError(f"{here} cannot load task `{settings.task}`: {first_line(exc)}") from exc
    try:
        data = task.load_data(settings.data_dir)
    except Exception as exc:
        raise UsageError(
            f"{here} cannot load the data of task `{task.name}`: {first_line(exc)}"
        ) from exc
    model = task.build_model(1.0)
    model.load_state_dict(inputs.state)
    baseline = Baseline(
        task, model.eval(), Path(inputs.key), inputs.bytes, inputs.val_accuracy,
        inputs.test_accuracy, trained=False,
    )
    setup = SearchSetup(settings, registry, task, data, baseline, space, trial_budget(settings))
    _WORKER_SETUPS[(settings_json, inputs.key)] = setup
    return setup


class BudgetConstraint:
    """Optuna constraint: bytes over budget (> 0 means infeasible). A class, not a closure,
    so samplers holding it can be pickled (Ray Tune checkpoints its searcher)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, trial: FrozenTrial) -> Sequence[float]:
        return [trial.values[0] - self.budget] if trial.values else [0.0]


def make_sampler(settings: Settings) -> optuna.samplers.BaseSampler:
    """The sampler ``--sampler`` names, seeded, with the budget as its constraint."""
    assert settings.budget is not None
    constraint = BudgetConstraint(int(settings.budget))
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed, constraints_func=constraint)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.NSGAIISampler(
        seed=settings.seed, constraints_func=constraint, population_size=16
    )


def storage_address(folder: StudyFolder, settings: Settings) -> str:
    """Where the study's trials are recorded (see :mod:`autoshrink.studies.storage`)."""
    return address_of(settings.storage, folder.journal)


def recorded_metric(study: optuna.Study) -> Metric:
    """The metric a study was searched with: its directions say which way, its ``metric``
    attribute the name (accuracy for studies older than the attribute)."""
    name = (study.user_attrs.get(METRIC) or {}).get("name", "accuracy")
    direction = "minimize" if study.directions[-1] == StudyDirection.MINIMIZE else "maximize"
    return Metric(str(name), direction)


def check_metric(study: optuna.Study, task: Task) -> None:
    """Refuse to go on with a task judged otherwise than the study was searched: its front
    and every recorded trial are figures of that metric, in that direction."""
    recorded, asked = recorded_metric(study), task.judged_by
    if METRIC not in study.user_attrs:  # an older study: only its direction is known
        asked = Metric(recorded.name, asked.direction)
    if recorded != asked:
        raise UsageError(
            f"study `{study.study_name}` was searched with metric `{recorded.name}` "
            f"({recorded.direction}), not `{asked.name}` ({asked.direction}); pass that metric "
            "and direction again (a registered task must still define them so)"
        )


def open_study(
    folder: StudyFolder, settings: Settings, identity: Identity, *, create: bool,
    task: Task | None = None,
) -> optuna.Study:
    """The study's Optuna object on its storage (created, or loaded to resume). ``task``'s
    metric sets the second objective's direction of a new study (and is recorded); a loaded
    study must have been searched with the same metric."""
    metric = task.judged_by if task is not None else Metric()
    storage = open_storage(storage_address(folder, settings))
    names = optuna.get_all_study_names(storage)
    if create and identity.name in names:
        raise UsageError(
            f"study `{identity.name}` already exists in {display(settings.storage)}; continue "
            f"it with `autoshrink resume`, or choose another `--study` name"
        )
    if not create and identity.name not in names:
        raise UsageError(
            f"{display(settings.storage) if settings.storage else folder.journal} holds no "
            f"study `{identity.name}`; was the database moved or emptied?"
        )
    study = optuna.create_study(
        study_name=identity.name,
        storage=storage,
        sampler=make_sampler(settings),
        directions=["minimize", metric.direction],
        load_if_exists=not create,
    )
    if create:
        study.set_user_attr(METRIC, metric.block())
    elif task is not None:
        check_metric(study, task)
    return study


def fail_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed search as failed (interrupted) and queue their
    parameters to be tried again; returns how many.

    The study lock lets one search write a study at a time, so at resume every RUNNING trial
    is a dead one, on any storage. (Optuna's heartbeats, on a database, fail the trials of
    workers that die while a search goes on; trials Ray Tune asks for have none.)"""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    storage = study._storage
    for trial in stale:
        study.enqueue_trial(trial.params)
        storage.set_trial_user_attr(
            trial._trial_id, FAILURE, f"{INTERRUPTED} (the search was stopped)"
        )
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stale)


def was_interrupted(trial: FrozenTrial) -> bool:
    """Stopped from outside (Ctrl-C, a killed search): tried again, not counted."""
    return str(trial.user_attrs.get(FAILURE, "")).startswith(INTERRUPTED)


def outcome_attrs(outcome: TrialOutcome, folder: StudyFolder) -> dict[str, object]:
    """The user attributes that record a finished trial's artifact, time and, for a plan too
    large to train, why it was measured untrained (the same on every backend)."""
    attrs: dict[str, object] = {
        ARTIFACT: str(outcome.artifact.relative_to(folder.root)),
        SECONDS: round(outcome.seconds, 3),
    }
    if not outcome.trained:
        attrs[UNTRAINED] = UNTRAINED_REASON
    return attrs


def finished(study: optuna.Study) -> int:
    """Trials that ran to an end (complete, failed or pruned), not counting interrupted ones:
    they are tried again."""
    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and not was_interrupted(t)
    )


def save_settings(folder: StudyFolder, settings: Settings, identity: Identity) -> None:
    """Record the study's identity, settings and command line, so that it can be resumed
    and reproduced (its folder exists already: creating it is how a search claims a name)."""
    folder.identity.write_text(json.dumps({"name": identity.name, "id": identity.id}) + "\n")
    folder.settings.write_text(settings.model_dump_json(indent=2))
    command = ["autoshrink", *(display(word) for word in sys.argv[1:])]
    (folder.root / "command.txt").write_text(shlex.join(command) + "\n")


def trial_summary(trial: FrozenTrial) -> dict:
    """A finished trial as the reports show it."""
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "bytes": int(trial.values[0]) if trial.values else None,
        "val_accuracy": trial.values[1] if trial.values else None,
        "artifact": trial.user_attrs.get(ARTIFACT),
        "seconds": trial.user_attrs.get(SECONDS),
        "failure": trial.user_attrs.get(FAILURE),
        "untrained": trial.user_attrs.get(UNTRAINED),
        "plan": trial.user_attrs.get(PLAN),
    }


def load_study_readonly(folder: StudyFolder) -> optuna.Study:
    """The study in a folder's journal, read without writing to it.

    ``open_study(..., create=False)`` goes through ``create_study(load_if_exists=True)``,
    which appends a create-study record to the journal on every call; a report, which may be
    regenerated often and while a search writes the same journal, only reads.
    """
    settings = folder.load_settings()
    address = storage_address(folder, settings)
    if is_journal(address):
        if not folder.journal.is_file():
            raise UsageError(
                f"no study journal in {folder.root}; start one with `autoshrink search`"
            )
        found = check_journal(folder.journal)
        if found.problem:  # a cut tail is fine: Optuna's reader skips it
            raise JournalError(
                f"study journal {found.problem}. `autoshrink doctor {folder.name}` explains, "
                "`--repair` fixes it after a backup"
            )
    identity = study_identity(folder)
    storage = open_storage(address)
    if identity.name not in optuna.get_all_study_names(storage):
        raise UsageError(f"{display(address)} holds no study named `{identity.name}`")
    return optuna.load_study(study_name=identity.name, storage=storage)
