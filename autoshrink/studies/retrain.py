"""Retraining the front: each front member's plan trained again from the baseline with a
longer schedule, its artifact written beside the search's, its metric measured again.

The search fine-tunes every trial briefly, so its front measures how fast a plan recovers.
Pruning, quantization and low-rank papers report accuracy after retraining to convergence;
this stage does that for every trial that ran one of the preset's starting plans, on the
front or not, and for members spread along the front (:func:`spread_along`). The starts come
first: they are the literature's recipes, whose figures are claims about retrained models,
and the short fine-tune judges them worst (a distilled student starts from scratch). The
front is then taken again over the retrained figures
(:func:`autoshrink.studies.front.front_trials`).
Retraining recovers what compression cost, so each member's epochs follow what it lost: the
setting's epochs times its shortfall from the baseline's validation figure in percents of
that figure, kept between half and four times the setting (:func:`member_epochs`). A member
at the baseline's figure gets half; a distilled student trained from scratch, far below it,
gets four times.

The figures are cached in ``retrained.json`` under the study id, the trial, the search
artifact's hash and the setting, so a report never shows a figure of another plan or
schedule.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from autoshrink.artifact import read_artifact
from autoshrink.files import file_digest, write_atomic
from autoshrink.metric import Metric
from autoshrink.plan import Plan
from autoshrink.studies.folder import StudyFolder, study_identity
from autoshrink.studies.setup import SearchSetup
from autoshrink.training import evaluate, steps_for
from autoshrink.trial import TrialBudget, run_trial

__all__ = [
    "CACHE", "EPOCH_SHARES", "member_epochs", "members_to_retrain", "retrain_front",
    "retrained_figures", "spread_along", "started", "to_retrain",
]

CACHE = "retrained.json"

#: the least and the most of the setting's epochs one member gets
EPOCH_SHARES = (0.5, 4.0)
#: members retrained by default, the starts among them: one per this many trials, and at
#: least this many
TRIALS_PER_MEMBER, LEAST_MEMBERS = 8, 4


def _searched(member: dict[str, Any]) -> dict[str, Any]:
    """A front member's figures as the search measured them (before any retraining)."""
    return member.get("search", member)


def members_to_retrain(trials: int | None, starts: int) -> int:
    """How many members spread along the front are retrained unless the user says: the
    ``starts`` come first, and the spread makes up the rest of one member per
    :data:`TRIALS_PER_MEMBER` trials, at least :data:`LEAST_MEMBERS` (a search bounded by
    time alone gets the least)."""
    return max(0, max(LEAST_MEMBERS, (trials or 0) // TRIALS_PER_MEMBER) - starts)


def member_epochs(epochs: float, member: dict[str, Any], baseline: float, metric: Metric) -> float:
    """The epochs one front member is retrained for: ``epochs`` times its search-time
    shortfall from the ``baseline``'s validation figure, counted in percents of that figure
    (so a loss of 1 % of the baseline's accuracy, or a 1 % higher error, counts 1), within
    :data:`EPOCH_SHARES`."""
    searched = _searched(member)["val_accuracy"]
    unit = abs(baseline) / 100 or 1e-2
    shortfall = (metric.score(baseline) - metric.score(searched)) / unit
    low, high = EPOCH_SHARES
    return round(epochs * min(high, max(low, shortfall)), 2)


def spread_along(front: list[dict[str, Any]], count: int, metric: Metric) -> list[dict[str, Any]]:
    """Members spread along the front by size, so retraining shows the whole trade-off, not
    only its accurate end: the front's size range cut into ``count`` equal slices on a log
    scale (as the report plots it), and in each slice that holds members the one of best
    validation figure, the plan most likely to keep its accuracy at that size (one slice:
    the member of best validation figure). Sizes and figures are the search's."""
    if count == 0 or not front:
        return []
    sizes = [math.log(_searched(m)["bytes"]) for m in front]
    low, width = min(sizes), (max(sizes) - min(sizes)) / count or 1.0
    best: dict[int, dict[str, Any]] = {}
    for member, size in zip(front, sizes, strict=True):
        cut = min(count - 1, int((size - low) / width))
        held = best.get(cut)
        if held is None or metric.better(
            _searched(member)["val_accuracy"], _searched(held)["val_accuracy"]
        ):
            best[cut] = member
    return [best[cut] for cut in sorted(best)]


def started(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The complete trials within the budget that ran a starting plan and still have their
    artifact, on the front or not."""
    return [
        row for row in summary["trials"]
        if row.get("start") is not None and row["state"] == "complete" and row.get("feasible")
        and row.get("artifact")
    ]


def to_retrain(
    front: list[dict[str, Any]], starts: list[dict[str, Any]], count: int, metric: Metric
) -> list[dict[str, Any]]:
    """The members retrained, best validation figure first: ``count`` spread along the front
    (:func:`spread_along`), and the ``starts``."""
    chosen = spread_along(front, count, metric)
    numbers = {m["trial"] for m in chosen}
    chosen += [m for m in starts if m["trial"] not in numbers]
    return sorted(chosen, key=lambda m: -metric.score(_searched(m)["val_accuracy"]))


def _key(folder: StudyFolder, member: dict[str, Any], epochs: float) -> str | None:
    search = _searched(member)
    digest = file_digest(folder.root / search["artifact"]) if search.get("artifact") else None
    if digest is None:
        return None
    return f"{study_identity(folder).id}/{member['trial']}/{digest}/{epochs:g}"


def _load(folder: StudyFolder) -> dict[str, Any]:
    path = folder.root / CACHE
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def retrained_figures(
    folder: StudyFolder, member: dict[str, Any], epochs: float
) -> dict[str, Any] | None:
    """The cached retraining of a front member, if its artifact file still exists."""
    key = _key(folder, member, epochs)
    found = _load(folder).get(key) if key else None
    if not isinstance(found, dict) or "artifact" not in found:
        return None
    # The file must still be the one measured (a later schedule rewrites the same name).
    if file_digest(folder.root / str(found["artifact"])) != found.get("sha256"):
        return None
    return found


def _retrain(
    folder: StudyFolder, member: dict[str, Any], setup: SearchSetup, budget: TrialBudget,
    path: Path, console: Console,
) -> dict[str, Any]:
    """Train one member's plan again into ``path``; its measured figures."""
    start = time.monotonic()
    with console.status(f"retraining trial {member['trial']} ({budget.finetune_steps} steps)"):
        outcome = run_trial(
            Plan.model_validate(member["plan"]),
            task=setup.task,
            data=setup.data,
            baseline=setup.baseline,
            registry=setup.registry,
            artifact=path,
            budget=budget,
            seed=setup.options.seed + member["trial"],
        )
        model = read_artifact(path, setup.registry, setup.task).model
        test = (evaluate(model, setup.data.test, setup.task.metric)
                if setup.data.test is not None else None)
    return {
        "bytes": outcome.bytes,
        "val_accuracy": outcome.val_accuracy,
        "test_accuracy": test,
        "artifact": str(path.relative_to(folder.root)),
        "sha256": file_digest(path),
        "seconds": round(time.monotonic() - start, 3),
    }


def retrain_front(
    folder: StudyFolder, summary: dict[str, Any], setup: SearchSetup, console: Console
) -> int:
    """Retrain the members :func:`to_retrain` picks (``retrain_top`` spread along the front,
    or :func:`members_to_retrain` when unset, and the starting plans), each for its
    :func:`member_epochs` (those not already cached); returns how many were trained."""
    options = setup.options
    epochs = options.retrain_epochs
    starts = started(summary)
    if epochs <= 0 or not (summary["front"] or starts):
        return 0
    metric = setup.task.judged_by
    count = (options.retrain_top if options.retrain_top
             else members_to_retrain(options.trials, len(starts)))
    done = 0
    for member in to_retrain(summary["front"], starts, count, metric):
        key = _key(folder, member, epochs)
        if key is None or retrained_figures(folder, member, epochs) is not None:
            continue
        own = member_epochs(epochs, member, setup.baseline.val_accuracy, metric)
        # Never shorter than the search's own fine-tune (small data sets have short epochs).
        steps = max(
            steps_for(own, len(setup.data.train), setup.trial_budget.batch_size),
            2 * setup.trial_budget.finetune_steps,
        )
        budget = TrialBudget(
            finetune_steps=steps,
            distill_steps=3 * steps,
            batch_size=setup.trial_budget.batch_size,
            lr=setup.trial_budget.lr,
            seconds=math.inf,
        )
        path = folder.retrained(member["trial"])
        try:
            figures = _retrain(folder, member, setup, budget, path, console)
        except Exception as exc:  # a finished search keeps its search-time figures
            path.unlink(missing_ok=True)
            first = (str(exc).strip().splitlines() or [""])[0]
            console.print(
                f"[yellow]warning:[/] retraining trial {member['trial']} failed "
                f"({type(exc).__name__}: {first[:200]}); its search figures stand",
                highlight=False,
            )
            continue
        known = _load(folder)
        known[key] = {**figures, "epochs": own, "steps": steps}
        write_atomic(folder.root / CACHE, json.dumps(known, indent=2))
        console.print(
            f"retrained trial {member['trial']}: validation {metric.name} "
            f"{metric.text(member['val_accuracy'])} -> {metric.text(figures['val_accuracy'])}, "
            f"{figures['bytes']:,} bytes", highlight=False,
        )
        done += 1
    return done
