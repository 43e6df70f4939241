"""Ray backend: the same define-by-run space and study, trials run as Ray Tune trials.

Ray Tune's ``OptunaSearch`` asks the study (on the study's own journal) for each trial's
parameters, so results land exactly where the local backend puts them. Each worker builds
its own setup once (task data and the cached baseline, read from disk) and runs trials with
``torch`` limited to the CPUs Ray gave it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from autoshrink.errors import UsageError
from autoshrink.settings import Settings
from autoshrink.study import (
    ARTIFACT,
    FAILURE,
    PLAN,
    SECONDS,
    SearchSetup,
    StudyFolder,
    make_sampler,
    worker_setup,
)
from autoshrink.trial import run_trial

__all__ = ["connect", "search_on_ray"]

NUMBER = "optuna_trial"
_FORWARDED_ENV = ("AUTOSHRINK_CACHE", "AUTOSHRINK_DATA", "AUTOSHRINK_BLOCK_PLUGINS", "PYTHONPATH")


def connect(settings: Settings) -> None:
    """Join the cluster at ``--ray-address`` (``auto`` finds a running one), or start a local
    one sized by ``--workers``. Raises UsageError, in one line, when it cannot."""
    import ray

    if ray.is_initialized():
        return
    env = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"env_vars": env},
        "configure_logging": False,
    }
    try:
        if settings.ray_address:
            ray.init(address=settings.ray_address, **options)
        else:
            ray.init(num_cpus=max(settings.workers, os.cpu_count() or 1), **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = settings.ray_address or "a local cluster"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"`--ray-address` {where}: cannot connect ({first}); start a cluster with "
            "`ray start --head`, or leave the option out to start a local one"
        ) from exc


def _trainable(settings_json: str, root: str, threads: int) -> Callable[[dict], None]:
    def trainable(config: dict) -> None:
        from ray import tune

        torch.set_num_threads(threads)
        setup = worker_setup(settings_json)
        number = int(config[NUMBER])
        params = {k: v for k, v in config.items() if k != NUMBER}
        plan = setup.plan_of(params)
        folder = StudyFolder(Path(root))
        outcome = run_trial(
            plan,
            task=setup.task,
            data=setup.data,
            baseline=setup.baseline,
            registry=setup.registry,
            artifact=folder.artifact(number),
            budget=setup.budget,
            seed=setup.settings.seed + number,
        )
        tune.report(
            {
                "bytes": outcome.bytes,
                "val_accuracy": outcome.val_accuracy,
                "seconds": outcome.seconds,
            }
        )

    return trainable


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
    from ray.tune import Callback
    from ray.tune.search.optuna import OptunaSearch

    settings = setup.settings
    connect(settings)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_trial = max(1, cpus // settings.workers)
    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)

    def trial_id(number: int) -> int:
        return storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def define_by_run(trial: optuna.Trial) -> dict[str, Any]:
        plan = setup.space.sample(trial)
        trial.set_user_attr(PLAN, plan.model_dump(mode="json"))
        return {NUMBER: trial.number}

    class RecordOutcome(Callback):
        """Write each Ray trial's artifact path or failure reason into the Optuna study."""

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            number = trial.config[NUMBER]
            artifact = folder.artifact(number)
            storage.set_trial_user_attr(
                trial_id(number), ARTIFACT, str(artifact.relative_to(folder.root))
            )
            seconds = (trial.last_result or {}).get("seconds")
            if seconds is not None:
                storage.set_trial_user_attr(trial_id(number), SECONDS, round(seconds, 3))
            self._after(number)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any):
            number = trial.config[NUMBER]
            storage.set_trial_user_attr(trial_id(number), FAILURE, _error_of(trial))
            folder.artifact(number).unlink(missing_ok=True)
            self._after(number)

        def _after(self, number: int) -> None:
            frozen = study.trials[number]
            for callback in callbacks:
                callback(study, frozen)

    searcher = OptunaSearch(
        space=define_by_run,
        metric=["bytes", "val_accuracy"],
        mode=["min", "max"],
        sampler=make_sampler(settings),
        study_name=study.study_name,
        storage=storage,
    )
    tuner = tune.Tuner(
        tune.with_resources(
            _trainable(settings.model_dump_json(), str(folder.root), per_trial),
            {"cpu": per_trial},
        ),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=trials if trials is not None else -1,
            max_concurrent_trials=settings.workers,
            time_budget_s=settings.timeout,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str((folder.root / "ray").resolve()),
            verbose=0,
            callbacks=[RecordOutcome()],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    tuner.fit()


def _error_of(trial: Any) -> str:
    """The last line of a failed Ray trial's traceback: its exception and message."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).is_file():
        text = Path(path).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "failed on a Ray worker (no error message)"
