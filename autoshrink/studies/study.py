"""Study: the Optuna multi-objective search over plans and its trial records.

Objectives are artifact bytes (minimise) and the task's validation metric (in its direction:
maximise accuracy, minimise an error); the byte budget is a constraint, so over-budget trials
still teach the sampler. The study records the metric: Optuna stores the directions, and the
study's user attribute ``metric`` its name and direction, so ``resume`` and ``report`` need
not be told again (a study without it is an older one: accuracy, maximised). Everything a
study needs lives in its folder ``<out>/<study>/``: the Optuna journal, the settings, the
trials' artifacts.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autoshrink.errors import UsageError
from autoshrink.metric import Metric
from autoshrink.studies.early_stop import CHECKPOINT, STOPPED
from autoshrink.studies.folder import Identity, StudyFolder, study_identity
from autoshrink.studies.journal import JournalError, check_journal
from autoshrink.studies.setup import SearchOptions
from autoshrink.studies.storage import address_of, display, is_journal, open_storage
from autoshrink.tasks import Task
from autoshrink.trial import TrialOutcome

__all__ = [
    "Identity", "StudyFolder", "check_metric", "load_study_readonly", "make_sampler",
    "open_study", "outcome_attrs", "recorded_metric", "study_identity",
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
#: why a trial's plan is not the one sampled: it was tightened to fit the budget
FITTED = "fitted"
#: the number in the preset of the starting plan a trial ran (see ``[[start]]``)
START = "start"
FITTED_REASON = "tightened to fit the budget before training"
PLAN = "plan"
ARTIFACT = "artifact"
SECONDS = "seconds"
#: The study's user attribute that records its metric: ``{name, direction}``.
METRIC = "metric"
#: The failure reason of trials stopped from outside (Ctrl-C, a killed search): they do not
#: count toward ``--trials`` and their parameters are tried again on resume.
INTERRUPTED = "interrupted"


class BudgetConstraint:
    """Optuna constraint: bytes over budget (> 0 means infeasible). A class, not a closure,
    so samplers holding it can be pickled (Ray Tune checkpoints its searcher)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, trial: FrozenTrial) -> Sequence[float]:
        return [trial.values[0] - self.budget] if trial.values else [0.0]


def startup_trials(trials: int | None) -> int:
    """TPE's random trials before it models the space: a quarter of the search, at least
    3 and at most Optuna's own 10. The search's fitted starts count among them, so a short
    search under a tight budget spends few trials on random plans, most of which land over
    it; a search of 40 trials or more starts as Optuna's default does."""
    return 10 if trials is None else min(10, max(3, trials // 4))


def make_sampler(options: SearchOptions) -> optuna.samplers.BaseSampler:
    """The sampler ``--sampler`` names, seeded, with the budget as its constraint."""
    constraint = BudgetConstraint(options.budget)
    if options.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=options.seed,
            constraints_func=constraint,
            n_startup_trials=startup_trials(options.trials),
        )
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=options.seed)
    return optuna.samplers.NSGAIISampler(
        seed=options.seed, constraints_func=constraint, population_size=16
    )


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
    folder: StudyFolder, options: SearchOptions, identity: Identity, *, create: bool,
    task: Task | None = None,
) -> optuna.Study:
    """The study's Optuna object on its storage (created, or loaded to resume). ``task``'s
    metric sets the second objective's direction of a new study (and is recorded); a loaded
    study must have been searched with the same metric."""
    metric = task.judged_by if task is not None else Metric()
    storage = open_storage(options.storage)
    names = optuna.get_all_study_names(storage)
    where = folder.journal if is_journal(options.storage) else display(options.storage)
    if create and identity.name in names:
        raise UsageError(
            f"study `{identity.name}` already exists in {where}; continue "
            f"it with `autoshrink resume`, or choose another `--study` name"
        )
    if not create and identity.name not in names:
        raise UsageError(
            f"{where} holds no study `{identity.name}`; was the database moved or emptied?"
        )
    study = optuna.create_study(
        study_name=identity.name,
        storage=storage,
        sampler=make_sampler(options),
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
    large to train, why it was measured untrained, and for a plan tightened to fit the
    budget, the plan built (the same on every backend)."""
    attrs: dict[str, object] = {
        ARTIFACT: str(outcome.artifact.relative_to(folder.root)),
        SECONDS: round(outcome.seconds, 3),
    }
    if not outcome.trained:
        attrs[UNTRAINED] = UNTRAINED_REASON
    if outcome.fitted is not None:
        attrs[PLAN] = outcome.fitted.model_dump(mode="json")
        attrs[FITTED] = FITTED_REASON
    return attrs


def finished(study: optuna.Study) -> int:
    """Trials that ran to an end (complete, failed or pruned), not counting interrupted ones:
    they are tried again."""
    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and not was_interrupted(t)
    )


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
        "fitted": trial.user_attrs.get(FITTED),
        "start": trial.user_attrs.get(START),
        "plan": trial.user_attrs.get(PLAN),
        "stopped": trial.user_attrs.get(STOPPED),
        "checkpoint": trial.user_attrs.get(CHECKPOINT),
    }


def load_study_readonly(folder: StudyFolder) -> optuna.Study:
    """The study in a folder's journal, read without writing to it.

    ``open_study(..., create=False)`` goes through ``create_study(load_if_exists=True)``,
    which appends a create-study record to the journal on every call; a report, which may be
    regenerated often and while a search writes the same journal, only reads.
    """
    address = address_of(folder.recorded_storage(), folder.journal)
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
