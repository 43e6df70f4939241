"""The trials of a search, run in this process (the local backend) or on Ray.

:func:`run_trials` is the one entry: it hands the study to Ray Tune
(:mod:`autoshrink.studies.ray_backend`) or runs :class:`Objective` through Optuna's own loop.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial

from autoshrink.errors import AutoshrinkError
from autoshrink.studies.early_stop import EarlyStop, TrialStopped, study_checkpoint
from autoshrink.studies.folder import StudyFolder
from autoshrink.studies.setup import SearchSetup
from autoshrink.studies.study import (
    FAILURE,
    INTERRUPTED,
    PLAN,
    finished,
    outcome_attrs,
)

__all__ = ["Objective", "StorageFull", "run_trials"]


class Objective:
    """The local backend's objective: one trial, failures recorded with their reason. When
    the study folder stops taking writes, the search stops and :attr:`stopped_by` says why."""

    def __init__(self, setup: SearchSetup, folder: StudyFolder) -> None:
        self.setup, self.folder = setup, folder
        self.stopped_by: StorageFull | None = None
        self.early = EarlyStop(setup.task.judged_by) if setup.options.stop_early else None

    def __call__(self, trial: optuna.Trial) -> tuple[int, float]:
        setup = self.setup
        plan = setup.space.sample(trial)
        trial.set_user_attr(PLAN, plan.model_dump(mode="json"))
        path = self.folder.artifact(trial.number)
        checkpoint = study_checkpoint(self.early, trial) if self.early else None
        try:
            outcome = setup.run(plan, path, trial.number, checkpoint)
        except TrialStopped as exc:
            path.unlink(missing_ok=True)
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr(FAILURE, f"{INTERRUPTED} (Ctrl-C)")
            trial.study.enqueue_trial(trial.params)  # tried again on resume
            path.unlink(missing_ok=True)
            raise
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno not in STORAGE_ERRNOS:
                trial.set_user_attr(FAILURE, f"{type(exc).__name__}: {exc}")
                raise
            # The study folder cannot take writes: this trial fails, and so would every next
            # one. Record it if the journal still can, and stop the search.
            with contextlib.suppress(OSError):
                trial.set_user_attr(FAILURE, unwritable(exc))
            trial.study.stop()
            self.stopped_by = StorageFull(f"{unwritable(exc)}; {AFTER_FREEING}")
            raise self.stopped_by from exc
        except Exception as exc:
            trial.set_user_attr(FAILURE, f"{type(exc).__name__}: {exc}")
            path.unlink(missing_ok=True)
            raise
        for key, value in outcome_attrs(outcome, self.folder).items():
            trial.set_user_attr(key, value)
        return outcome.bytes, outcome.val_accuracy


class StorageFull(AutoshrinkError):
    """The study folder stopped taking writes (disk full, read-only, over quota)."""


#: OS errors that mean "the study folder cannot be written at all" rather than a failed trial.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
AFTER_FREEING = "free space, then `autoshrink resume`"


def unwritable(exc: OSError) -> str:
    """Why the study folder takes no more writes, in words."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"the study folder cannot be written: {exc.strerror}{where}"


def storage_failure(exc: BaseException | None) -> OSError | None:
    """The OS error of :data:`STORAGE_ERRNOS` behind ``exc``, if any. Optuna may raise an
    error of its own while handling one (a journal write that fails as a trial ends leaves
    it asserting on the trial's state), so the chain of causes is searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def run_trials(
    setup: SearchSetup,
    folder: StudyFolder,
    study: optuna.Study,
    *,
    trials: int | None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
) -> None:
    """Run trials until ``trials`` have finished in total or the timeout passes, on the
    backend the options name."""
    options = setup.options
    remaining = None if trials is None else max(0, trials - finished(study))
    if remaining == 0:
        return
    if options.backend == "ray":
        from autoshrink.studies.ray_backend import search_on_ray

        search_on_ray(setup, folder, study, trials=remaining, callbacks=callbacks)
        return
    run = Objective(setup, folder)
    try:
        study.optimize(
            run,
            n_trials=remaining,
            timeout=options.timeout,
            catch=(Exception,),
            callbacks=list(callbacks),
            gc_after_trial=True,
        )
    except Exception as exc:
        full = storage_failure(exc)
        if full is None or run.stopped_by is not None:
            raise
        # A journal write failed outside the trial's own code (as Optuna records its end).
        raise StorageFull(f"{unwritable(full)}; {AFTER_FREEING}") from exc
    if run.stopped_by is not None:
        raise run.stopped_by
