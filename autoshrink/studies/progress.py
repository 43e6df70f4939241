"""Progress displays: a bar while a baseline trains, and one while a search runs."""

from __future__ import annotations

import time

import humanize
import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from autoshrink.studies.early_stop import STOPPED
from autoshrink.studies.study import FAILURE, finished, recorded_metric

__all__ = ["SearchProgress", "TrainingBar"]


class TrainingBar:
    """A progress bar for the baseline's training (invisible when it comes from the cache)."""

    def __init__(self, console: Console, what: str) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]training the {what}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def __enter__(self):
        self.progress.__enter__()
        return self.progress, self.progress.add_task("train", total=None)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


class SearchProgress:
    """Trials done, ETA, failures and the best feasible trial so far: a live bar on a
    terminal; in a log (CI, ``nohup``, a batch job) one line per finished trial instead."""

    def __init__(self, console: Console, study: optuna.Study, total: int | None, budget: int):
        self.study, self.budget, self.total = study, budget, total
        self.console = console
        self.metric = recorded_metric(study)
        self.start = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not console.is_terminal,
        )
        done = finished(study)
        self.bar = self.progress.add_task(
            "trials", total=total, completed=min(done, total or done), status=self.status()
        )

    def status(self) -> str:
        trials = self.study.get_trials(deepcopy=False)
        failed = sum(t.state == TrialState.FAIL for t in trials)
        stopped = sum(t.state == TrialState.PRUNED for t in trials)
        feasible = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE and t.values and t.values[0] <= self.budget
        ]
        best = self.metric.best(feasible, lambda t: t.values[1], lambda t: t.values[0])
        text = f"failed {failed}" + (f" | stopped early {stopped}" if stopped else "")
        if best is not None:
            text += (
                f" | best in budget: {self.metric.text(best.values[1])} at "
                f"{humanize.naturalsize(best.values[0])} (trial {best.number})"
            )
        return text

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.console.is_terminal:
            self.console.print(self.log_line(trial), highlight=False, soft_wrap=True)
        if trial.state == TrialState.FAIL:
            reason = (str(trial.user_attrs.get(FAILURE) or "no reason recorded").splitlines()
                      or [""])[0]
            self.progress.console.print(
                f"trial {trial.number} failed: {reason[:300]}", highlight=False
            )
        elif trial.state == TrialState.PRUNED:
            self.progress.console.print(
                f"trial {trial.number} {str(trial.user_attrs.get(STOPPED, 'stopped early'))[:300]}",
                highlight=False,
            )
        self.progress.update(self.bar, advance=1, status=self.status())

    def log_line(self, trial: FrozenTrial) -> str:
        """``trial 7 (8/24): complete, 100,539 B, validation 88.49%, 61 s | failed 0 | best
        ...``: what the bar shows, as one line of a log."""
        done = finished(self.study)
        of = f"{done}/{self.total}" if self.total else f"{done}"
        what = trial.state.name.lower()
        if trial.values:
            what += f", {int(trial.values[0]):,} B, validation {self.metric.text(trial.values[1])}"
        elapsed = humanize.naturaldelta(time.monotonic() - self.start)
        return f"trial {trial.number} ({of}): {what}, {elapsed} | {self.status()}"

    def __enter__(self) -> SearchProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
