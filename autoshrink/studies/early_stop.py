"""Stopping hopeless trials early: successive halving for two objectives.

Optuna's pruners judge one objective; a search here has two (bytes and the metric). So the
rule is autoshrink's own, in the manner of multi-objective successive halving: every trial
reports its validation figure once, at the same point of its fine-tune (its compressed form
complete: the structure trained, the value stage applied, about 60 % of the steps in), and
its bytes are known from the start. A trial stops there when ``beaten_by`` earlier trials
(default 2) were, at that same point, no larger and better by more than ``margin``: two
smaller plans already ahead of it at the same stage of training leave it little chance of
reaching the front. Nothing is judged before ``warmup`` trials have reported.

A stopped trial is recorded as pruned (Optuna's state for it) with the figures it had and
why it stopped; it counts toward ``--trials`` and is not run again on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from autoshrink.metric import Metric
from autoshrink.trial import Checkpoint

__all__ = ["CHECKPOINT", "STOPPED", "Checkpoints", "EarlyStop", "TrialStopped", "checkpoints"]

#: The trial user attribute holding ``[bytes, validation metric]`` at its checkpoint.
CHECKPOINT = "checkpoint"
#: The trial user attribute that says why a pruned trial stopped.
STOPPED = "stopped"


class TrialStopped(Exception):
    """Raised at a trial's checkpoint when :class:`EarlyStop` judges it hopeless."""


@dataclass(frozen=True)
class EarlyStop:
    """The rule (see the module's docstring) for a metric in its direction."""

    metric: Metric
    beaten_by: int = 2
    warmup: int = 4
    margin: float = 0.0

    def reason(self, size: int, value: float, earlier: Iterable[tuple[int, float]]) -> str | None:
        """Why a trial of ``size`` bytes at ``value`` should stop, given the checkpoints of
        earlier trials (``None``: it goes on)."""
        seen = list(earlier)
        if len(seen) < self.warmup:
            return None
        ahead = [
            (b, v) for b, v in seen
            if b <= size and self.metric.score(v) > self.metric.score(value) + self.margin
        ]
        if len(ahead) < self.beaten_by:
            return None
        best = max(ahead, key=lambda r: self.metric.score(r[1]))
        return (
            f"stopped early: {len(ahead)} trials no larger were ahead at the same point of "
            f"training (validation {self.metric.name} {self.metric.text(value)} at "
            f"{size:,} bytes; best of them {self.metric.text(best[1])} at {best[0]:,} bytes)"
        )


class Checkpoints:
    """The checkpoints of a search in one place, judged by one rule: on Ray, an actor
    (``ray.remote(Checkpoints)``), so that workers on any node share them."""

    def __init__(self, rule: EarlyStop, earlier: list[tuple[int, float]]) -> None:
        self.rule, self.points = rule, list(earlier)

    def judge(self, size: int, value: float) -> str | None:
        reason = self.rule.reason(size, value, self.points)
        self.points.append((size, value))
        return reason


def checkpoints(trials: Iterable[FrozenTrial], but: int | None = None) -> list[tuple[int, float]]:
    """The recorded checkpoints of ``trials`` (except trial number ``but``)."""
    found = []
    for trial in trials:
        point = trial.user_attrs.get(CHECKPOINT)
        if trial.number != but and isinstance(point, list) and len(point) == 2:
            found.append((int(point[0]), float(point[1])))
    return found


def study_checkpoint(rule: EarlyStop, trial: optuna.Trial) -> Checkpoint:
    """The checkpoint of a trial run in this process: records its figures on the trial and
    raises :class:`TrialStopped` when the rule stops it."""

    def checkpoint(size: int, value: float) -> None:
        trial.set_user_attr(CHECKPOINT, [size, value])
        earlier = checkpoints(trial.study.get_trials(deepcopy=False), but=trial.number)
        reason = rule.reason(size, value, earlier)
        if reason is not None:
            trial.set_user_attr(STOPPED, reason)
            raise TrialStopped(reason)

    return checkpoint
