"""Ray backend: the same define-by-run space and study, trials run as Ray Tune trials.

Ray Tune's ``OptunaSearch`` asks the study (on the study's storage) for each trial's
parameters, so results land exactly where the local backend puts them. Workers need nothing
from the driver's disk: the driver puts the baseline's weights and the preset in Ray's
object store once; each worker loads the plugins and the task's data itself, writes the
trial's artifact to a temporary file of its own and returns its bytes with the figures in
the Tune result. The driver alone writes the study folder and the storage: it writes the
artifact, checks its size against the figure the worker measured, and records the trial
(:class:`TrialEvents`).

Two kinds of failure: an exception in a trial (a plugin or the data this worker cannot load
included) fails the trial with its reason in one line (run again it would fail again); a
worker that dies (its process killed, its node lost) is a Ray Tune failure, and Tune runs
the trial again, up to ``--max-retries`` times. Each lost attempt is recorded as a failed
trial of its own, "interrupted (worker lost ...)": like a Ctrl-C, it does not count toward
``--trials``. When no retry is left the trial itself fails with "worker lost".
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from autoshrink.errors import first_line
from autoshrink.files import write_atomic
from autoshrink.plan import Plan
from autoshrink.space import Space
from autoshrink.studies.early_stop import (
    CHECKPOINT,
    STOPPED,
    Checkpoints,
    EarlyStop,
    TrialStopped,
    checkpoints,
)
from autoshrink.studies.ray_cluster import connect
from autoshrink.studies.setup import SearchOptions, SearchSetup, WorkerInputs, worker_setup
from autoshrink.studies.storage import JOURNAL, is_journal, open_storage
from autoshrink.studies.study import (
    FAILURE,
    FITTED,
    INTERRUPTED,
    PLAN,
    StudyFolder,
    make_sampler,
    outcome_attrs,
)
from autoshrink.trial import TrialOutcome

__all__ = ["search_on_ray"]

NUMBER = "optuna_trial"
#: The result key of what a worker sends back beside the figures: the artifact's bytes, the
#: trial's time and whether it trained, or why it failed. The driver takes it out of the
#: result before Ray Tune logs or keeps it.
OUTCOME = "autoshrink"
#: The failure reason of a trial whose Ray worker died under it.
WORKER_LOST = "worker lost"
# Ray Tune asks for trials one by one (`study.ask`), which Optuna's heartbeats do not cover;
# a resume fails such trials left running (the study lock makes them dead ones).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
def _trainable(options: SearchOptions, threads: int) -> Callable[..., None]:
    def trainable(config: dict, inputs: WorkerInputs, board: Any) -> None:
        import ray
        from ray import tune

        torch.set_num_threads(threads)
        number = int(config[NUMBER])
        point: list[float] = []

        def checkpoint(size: int, value: float) -> None:
            point[:] = [size, value]
            reason = ray.get(board.judge.remote(size, value))
            if reason is not None:
                raise TrialStopped(reason)

        with tempfile.TemporaryDirectory(prefix="autoshrink-trial-") as scratch:
            try:
                setup = worker_setup(options, inputs)
                plan = setup.plan_of({k: v for k, v in config.items() if k != NUMBER})
                outcome = setup.run(plan, Path(scratch) / "artifact.safetensors", number,
                                    checkpoint if board is not None else None)
                payload = outcome.artifact.read_bytes()
            except TrialStopped as exc:  # pruned: no figures, the reason and where it stood
                stop = {STOPPED: str(exc), CHECKPOINT: point}
                tune.report({"bytes": None, "val_accuracy": None, OUTCOME: stop})
                return
            except Exception as exc:
                # Reported as no figures and a reason (see TrialEvents): raised, it would be
                # a Tune failure, and Tune would run the trial again.
                failure = f"{type(exc).__name__}: {first_line(exc)}"
                tune.report({"bytes": None, "val_accuracy": None, OUTCOME: {FAILURE: failure}})
                return
        tune.report({
            "bytes": outcome.bytes,
            "val_accuracy": outcome.val_accuracy,
            OUTCOME: {"artifact": payload, "seconds": outcome.seconds, "trained": outcome.trained,
                      CHECKPOINT: point or None,
                      FITTED: outcome.fitted and outcome.fitted.model_dump(mode="json")},
        })

    return trainable


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def search_on_ray(
    setup: SearchSetup,
    folder: StudyFolder,
    study: optuna.Study,
    *,
    trials: int | None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
) -> None:
    """Run ``trials`` trials (or until the timeout) as Ray Tune trials on the study."""
    import ray
    from ray import tune

    options = setup.options
    address = options.storage
    # Tune logs each failed trial's traceback; the progress display shows its reason.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    connect(options.ray_address, options.workers)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_trial = max(1, cpus // options.workers)
    searcher = StudySearch(
        space=DefineByRun(setup.space),
        metric=["bytes", "val_accuracy"],
        mode=["min", "min" if setup.task.direction == "minimize" else "max"],
        sampler=make_sampler(options),
        study_name=study.study_name,
        storage=(
            PicklableJournal(address.removeprefix(JOURNAL)) if is_journal(address)
            else open_storage(address)
        ),
    )
    # In the object store once; each worker gets it from there, not from any disk.
    inputs = ray.put(WorkerInputs.of(setup))
    board = None
    if options.stop_early:
        earlier = checkpoints(study.get_trials(deepcopy=False))
        board = ray.remote(Checkpoints).remote(EarlyStop(setup.task.judged_by), earlier)
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(_trainable(options, per_trial), inputs=inputs, board=board),
            {"cpu": per_trial},
        ),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=trials if trials is not None else -1,
            max_concurrent_trials=options.workers,
            time_budget_s=options.timeout,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str((folder.root / "ray").resolve()),
            verbose=0,
            callbacks=[
                TrialEvents(study, folder, open_storage(address), options.max_retries, callbacks)
            ],
            failure_config=tune.FailureConfig(max_failures=options.max_retries, fail_fast=False),
        ),
    )
    tuner.fit()


class DefineByRun:
    """The space as Ray Tune's OptunaSearch asks for it: sample a plan, record it on the
    trial, and pass the trial number on to the worker. Picklable, as Tune checkpoints it."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        plan = self.space.sample(trial)
        trial.set_user_attr(PLAN, plan.model_dump(mode="json"))
        return {NUMBER: trial.number}


class PicklableJournal(JournalStorage):
    """The study's journal storage, pickled as its file path: Ray Tune pickles its searcher
    (and with it the storage) to checkpoint the experiment. (Optuna's database storage
    pickles itself.)"""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(JournalFileBackend(path))

    def __reduce__(self) -> tuple:
        return (PicklableJournal, (self.path,))


class StudySearch(OptunaSearch):
    """Ray Tune's Optuna searcher, telling the study how each trial ended: with its figures;
    failed (TrialEvents recorded why and made the figures None); or given up by Tune after
    its worker died (it is told only when no retry is left)."""

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        trial = self._ot_trials.get(trial_id)
        if trial is not None and trial_id not in self._completed_trials:
            if error and FAILURE not in trial.user_attrs:
                trial.set_user_attr(
                    FAILURE, f"{WORKER_LOST}: its Ray worker died during the trial "
                    "(no retry left; see --max-retries)"
                )
            if result and result.get(STOPPED):  # no figures and no error: Optuna's PRUNED
                result, error = None, False
            elif not result or any(result.get(key) is None for key in self.metric):
                result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)


class TrialEvents(Callback):
    """The driver's side of Ray trials: writes each trial's artifact into the study folder
    and records how the trial went (the workers touch neither); records each attempt lost
    with its worker as a failed trial (the trial itself runs again); cleans up after a trial
    Tune gave up on; and drives the progress display as trials end. Ray Tune pickles its run
    config for ``Tuner.restore``, so the pickled copy carries no state."""

    def __init__(
        self,
        study: optuna.Study,
        folder: StudyFolder,
        storage: BaseStorage,
        retries: int,
        callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
    ) -> None:
        self.study, self.folder, self.storage = study, folder, storage
        self.retries, self.callbacks = retries, callbacks

    def __getstate__(self) -> dict:
        return {}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        # Tune lets callbacks change the result in place: the artifact's bytes leave it here,
        # before Tune's loggers and its experiment state see it, and a failure's figures
        # become None (StudySearch then fails the trial).
        sent = result.pop(OUTCOME, None)
        if sent is None:
            return
        number = int(trial.config[NUMBER])
        if STOPPED in sent:
            self._record(number, {STOPPED: sent[STOPPED], CHECKPOINT: sent[CHECKPOINT]})
            result["bytes"] = result["val_accuracy"] = None
            result[STOPPED] = True  # for StudySearch, which reads this result next
            return
        failure = sent.get(FAILURE) or self._store(number, sent, result)
        if failure is not None:
            self._record(number, {FAILURE: failure})
            result["bytes"] = result["val_accuracy"] = None

    def _store(self, number: int, sent: dict, result: dict) -> str | None:
        """Write trial ``number``'s artifact as its worker sent it and record the trial;
        returns why it failed, if it did."""
        path, size = self.folder.artifact(number), int(result["bytes"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, sent["artifact"])
            written = path.stat().st_size
        except OSError as exc:
            path.unlink(missing_ok=True)
            return f"the study folder cannot be written: {exc.strerror or exc} ({path})"
        if written != size:
            path.unlink(missing_ok=True)
            return (
                f"the artifact arrived with {written:,} bytes, but its worker measured "
                f"{size:,} bytes"
            )
        outcome = TrialOutcome(
            size, float(result["val_accuracy"]), path, float(sent["seconds"]),
            trained=bool(sent["trained"]),
            fitted=Plan.model_validate(sent[FITTED]) if sent.get(FITTED) else None,
        )
        attrs = outcome_attrs(outcome, self.folder)
        if sent.get(CHECKPOINT):
            attrs[CHECKPOINT] = sent[CHECKPOINT]
        self._record(number, attrs)
        return None

    def _record(self, number: int, attrs: dict[str, Any]) -> None:
        """Set user attributes on trial ``number``, still running in the storage."""
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        number = int(trial.config[NUMBER])
        running = self.study.get_trials(deepcopy=False)[number]
        reason = (
            f"{INTERRUPTED} ({WORKER_LOST}: {_cause(trial)}; trial {number} runs again, "
            f"retry {trial.run_metadata.num_failures} of {self.retries})"
        )
        self.study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.FAIL,
                params=running.params,
                distributions=running.distributions,
                user_attrs={PLAN: running.user_attrs.get(PLAN), FAILURE: reason},
            )
        )
        self.folder.artifact(number).unlink(missing_ok=True)
        failed = self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        self._show(next(t for t in reversed(failed) if t.user_attrs.get(FAILURE) == reason))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._after(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.folder.artifact(int(trial.config[NUMBER])).unlink(missing_ok=True)
        self._after(trial)

    def _after(self, trial: Any) -> None:
        self._show(self.study.trials[int(trial.config[NUMBER])])

    def _show(self, frozen: FrozenTrial) -> None:
        for callback in self.callbacks:
            callback(self.study, frozen)


def _cause(trial: Any) -> str:
    """What Ray said of the death of ``trial``'s worker (``ActorDiedError: The actor died
    unexpectedly ...``), from the error Tune keeps beside the trial."""
    import cloudpickle

    try:
        error = cloudpickle.loads(Path(trial.pickled_error_file).read_bytes())
    except Exception:  # Tune's file: never fail the search over reading it
        return "its Ray worker process died"
    return f"{type(error).__name__}: {first_line(error)}"[:200]
