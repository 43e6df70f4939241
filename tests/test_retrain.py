"""Retraining the front after a search: artifacts rewritten with longer training, both the
search's and the retrained figures kept, and the files match what pareto.json says."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import optuna

from autoshrink.files import file_digest
from autoshrink.metric import Metric
from autoshrink.settings import Settings
from autoshrink.studies.folder import StudyFolder
from autoshrink.studies.front import front_trials
from autoshrink.studies.retrain import (
    CACHE,
    member_epochs,
    members_to_retrain,
    spread_along,
    to_retrain,
)
from autoshrink.studies.setup import SearchOptions
from autoshrink.studies.study import ARTIFACT, START
from autoshrink.trial import TrialBudget
from tests.conftest import run_cli


def test_epochs_follow_what_a_member_lost() -> None:
    accuracy, error = Metric(), Metric("mse", "minimize")
    at_baseline = {"val_accuracy": 0.90}
    assert member_epochs(2, at_baseline, 0.90, accuracy) == 1.0  # half the setting
    assert member_epochs(2, {"val_accuracy": 0.891}, 0.90, accuracy) == 2.0  # 1 % short
    assert member_epochs(2, {"val_accuracy": 0.50}, 0.90, accuracy) == 8.0  # four times
    # Better than the baseline still gets half; the search's figure is the one that counts.
    assert member_epochs(2, {"val_accuracy": 0.95}, 0.90, accuracy) == 1.0
    retrained = {"val_accuracy": 0.90, "search": {"val_accuracy": 0.8865}}
    assert member_epochs(2, retrained, 0.90, accuracy) == 3.0
    # Lower is better: a 2 % higher error counts 2.
    assert member_epochs(2, {"val_accuracy": 0.51}, 0.50, error) == 4.0
    assert member_epochs(2, {"val_accuracy": 0.49}, 0.50, error) == 1.0


def test_a_longer_search_retrains_more_members_unless_told() -> None:
    # One member per 8 trials in all, at least 4: the starts first, the spread the rest.
    assert [members_to_retrain(t, 0) for t in (1, 24, 60, 100, None)] == [4, 4, 7, 12, 4]
    assert [members_to_retrain(t, 4) for t in (1, 24, 60, 100, None)] == [0, 0, 3, 8, 0]
    assert members_to_retrain(24, 3) == 1 and members_to_retrain(12, 6) == 0
    assert Settings().retrain_top is None  # unset: the count follows the trials
    assert Settings(retrain_top=2).retrain_top == 2


def test_members_are_spread_along_the_front() -> None:
    """The best validation figure in each of ``count`` equal slices of the front's size range
    on a log scale."""
    sizes = [1000, 1100, 1200, 12_000, 150_000, 1_000_000]
    values = [0.50, 0.70, 0.60, 0.80, 0.85, 0.90]
    front = [{"trial": n, "bytes": b, "val_accuracy": v}
             for n, (b, v) in enumerate(zip(sizes, values, strict=True))]
    # the search's own figures count, not retrained ones
    front[5] = {**front[5], "bytes": 1, "search": dict(front[5])}
    picked = lambda k: [m["trial"] for m in spread_along(front, k, Metric())]  # noqa: E731
    assert picked(3) == [1, 3, 5]  # 1,000-10,000 B: the best of three is the middle one
    assert picked(2) == [3, 5] and picked(0) == [] and picked(100) == [0, 1, 2, 3, 4, 5]
    assert picked(1) == [5]  # one: the best validation figure
    assert [m["trial"] for m in spread_along(front, 1, Metric("mse", "minimize"))] == [0]
    assert [m["trial"] for m in spread_along(front, 3, Metric("mse", "minimize"))] == [0, 3, 4]


def test_starting_plans_are_retrained_too_on_the_front_or_not() -> None:
    front = [
        {"trial": n, "bytes": 1000 * (n + 1), "val_accuracy": 0.5 + n / 100, "start": None}
        for n in range(7)
    ]
    front[3]["start"] = 2
    off_front = {"trial": 9, "bytes": 3500, "val_accuracy": 0.4, "start": 4}
    picked = [m["trial"] for m in to_retrain(front, [front[3], off_front], 2, Metric())]
    assert picked == [6, 3, 1, 9]  # the spread's two and the starts, best validation first
    front[6]["start"] = 1  # a start the spread picked already counts once
    assert [m["trial"] for m in to_retrain(front, [front[6]], 2, Metric())] == [6, 1]
    # No spread (the starts fill the default count): the starts alone.
    assert [m["trial"] for m in to_retrain(front, [front[3], off_front], 0, Metric())] == [3, 9]
    # No front (every trial over the budget but a start's): the starts alone.
    assert [m["trial"] for m in to_retrain([], [off_front], 2, Metric())] == [9]


def test_the_front_is_taken_again_over_retrained_figures(tmp_path: Path) -> None:
    folder = StudyFolder(tmp_path / "s")
    folder.retrained(0).parent.mkdir(parents=True)
    study = optuna.create_study(directions=["minimize", "maximize"])
    # Trial 0 ran a start and the search left it behind trial 1 (larger and less accurate).
    searched = {0: (5000, 0.80), 1: (3000, 0.85), 2: (2000, 0.70), 3: (9000, 0.95)}
    for number, values in searched.items():
        folder.artifact(number).write_bytes(bytes([number]) * 16)
        study.add_trial(optuna.trial.create_trial(values=list(values), user_attrs={
            ARTIFACT: str(folder.artifact(number).relative_to(folder.root)),
            START: 1 if number == 0 else None,
        }))
    options = SearchOptions(
        budget=10_000, task="t", space="default", storage="", retrain_epochs=2.0,
        trial=TrialBudget(finetune_steps=1, seconds=math.inf),
    )
    front = lambda: [t.number for t in front_trials(study, folder, options)]  # noqa: E731
    assert front() == [2, 1, 3]

    def retrain(number: int, size: int, value: float) -> None:
        path = folder.retrained(number)
        path.write_bytes(bytes([number, 1]) * 8)
        key = f"s/{number}/{file_digest(folder.artifact(number))}/2"
        cache = folder.root / CACHE
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        known[key] = {"bytes": size, "val_accuracy": value, "sha256": file_digest(path),
                      "artifact": str(path.relative_to(folder.root))}
        cache.write_text(json.dumps(known))

    retrain(0, 2500, 0.90)  # retrained, the start beats trial 1 and joins the front
    assert front() == [2, 0, 3]
    retrain(2, 12_000, 0.99)  # over the budget: not taken, the search's figures stand
    retrain(3, 8000, 0.90)  # validates worse than the search's 0.95: not taken
    assert front() == [2, 0, 3]
    assert front_trials(study, folder, replace(options, retrain_epochs=0))[1].number == 1


def _front_of(points: dict[int, tuple[int, float]]) -> set[int]:
    """Trials no other trial matches or beats in (bytes, validation accuracy)."""
    return {
        n for n, (size, value) in points.items()
        if not any(
            (s, v) != (size, value) and s <= size and v >= value for s, v in points.values()
        )
    }


def test_front_members_are_retrained_and_their_figures_hold(tmp_path: Path) -> None:
    done = run_cli(
        "search", "--task", "digits-mlp", "--finetune-steps", "20", "--budget", "40kB",
        "--seed", "5", "--trials", "4", "--retrain-epochs", "6", "--retrain-top", "2",
        "--out", str(tmp_path), "--study", "r",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "r"
    pareto = json.loads((folder / "pareto.json").read_text())
    tried = [m for m in pareto["front"] if "retrained" in m]
    # Retrained: two spread along the search's front (the best of each half of its size
    # range), and every trial that ran one of the preset's starting plans, on that front or not.
    feasible = {
        t["trial"]: (t["bytes"], t["val_accuracy"]) for t in pareto["trials"]
        if t["state"] == "complete" and t["feasible"]
    }
    searched = sorted(_front_of(feasible), key=lambda n: feasible[n])
    spread = spread_along(
        [t for t in pareto["trials"] if t["trial"] in searched], 2, Metric()
    )
    starts = {t["trial"] for t in pareto["trials"] if t["start"] is not None}
    assert all(t["start"] == t["trial"] + 1 for t in pareto["trials"][:4] if t["start"])
    cache = json.loads((folder / "retrained.json").read_text())
    by_trial = {int(key.split("/")[1]): figures for key, figures in cache.items()}
    assert len(by_trial) == len(cache) and starts
    assert set(by_trial) == {m["trial"] for m in spread} | (starts & set(feasible))
    # The front is taken again over each trial's best known figures: its retraining's where
    # they fit the budget and validate no worse, the search's otherwise.
    known = {
        n: (by_trial[n]["bytes"], by_trial[n]["val_accuracy"])
        if n in by_trial and by_trial[n]["bytes"] <= pareto["budget_bytes"]
        and by_trial[n]["val_accuracy"] >= value else (size, value)
        for n, (size, value) in feasible.items()
    }
    assert {m["trial"] for m in pareto["front"]} == _front_of(known)
    # Those the retrained plans beat are named, smallest first, and the report says so.
    assert pareto["left_front"] == [n for n in searched if n not in _front_of(known)]
    assert pareto["left_front"], "this seed's retraining moves the front"
    assert {m["trial"] for m in tried} == set(by_trial) & _front_of(known)
    for member in tried:
        retrained = member["retrained"]
        expect = member_epochs(6, member, pareto["baseline"]["val_accuracy"], Metric())
        assert retrained["epochs"] == expect and 3 <= expect <= 24  # half to four times 6
        assert retrained["steps"] >= 40
        assert (folder / f"artifacts/trial-{member['trial']:04d}-retrained.safetensors").is_file()
        if not retrained["taken"]:
            assert "search" not in member
            continue
        assert member["search"]["val_accuracy"] <= member["val_accuracy"]
        path = folder / member["artifact"]
        assert path.name.endswith("-retrained.safetensors")
        assert path.stat().st_size == member["bytes"] <= pareto["budget_bytes"]
        evaluated = run_cli("eval", str(path), "--json")
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["test_accuracy"] == member["test_accuracy"]
    best = next(m for m in pareto["front"] if m["trial"] == pareto["best"])
    assert best["val_accuracy"] == max(m["val_accuracy"] for m in pareto["front"])
    assert (folder / "best.safetensors").read_bytes() == (folder / best["artifact"]).read_bytes()
    # The report regenerates the same figures from the caches, without training again.
    again = run_cli("report", "r", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    regenerated = json.loads((folder / "pareto.json").read_text())
    assert [m["val_accuracy"] for m in regenerated["front"]] == [
        m["val_accuracy"] for m in pareto["front"]
    ]
    report = (folder / "report.md").read_text()
    left = ", ".join(str(n) for n in pareto["left_front"])
    assert f"Retraining moved the front: trials {left} were on the search's front" in report
    for member in pareto["front"]:
        if member["start"] is not None:
            assert f"| {member['trial']} (start {member['start']}) |" in report
    for member in tried:
        if member["retrained"]["taken"]:
            assert f"retrained {member['retrained']['epochs']:g} epochs" in report


def test_retraining_off(tmp_path: Path) -> None:
    done = run_cli(
        "search", "--task", "digits-mlp", "--finetune-steps", "20", "--budget", "40kB",
        "--trials", "2", "--retrain-epochs", "0", "--out", str(tmp_path), "--study", "n",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pareto = json.loads((tmp_path / "n" / "pareto.json").read_text())
    assert all("retrained" not in m for m in pareto["front"])
    assert not (tmp_path / "n" / "retrained.json").exists()
    # Two trials of four starts: the first two ran, none is left waiting in the study.
    ran = [(t["state"], t["start"]) for t in pareto["trials"]]
    assert ran == [("complete", 1), ("complete", 2)]
