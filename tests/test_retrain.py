"""Retraining the front after a search: artifacts rewritten with longer training, both the
search's and the retrained figures kept, and the files match what pareto.json says."""

from __future__ import annotations

import json
from pathlib import Path

from autoshrink.metric import Metric
from autoshrink.settings import Settings
from autoshrink.studies.retrain import (
    member_epochs,
    members_to_retrain,
    spread_along,
    to_retrain,
)
from tests.conftest import run_cli


def test_epochs_follow_what_a_member_lost() -> None:
    accuracy, error = Metric(), Metric("mse", "minimize")
    at_baseline = {"val_accuracy": 0.90}
    assert member_epochs(2, at_baseline, 0.90, accuracy) == 1.0  # half the setting
    assert member_epochs(2, {"val_accuracy": 0.891}, 0.90, accuracy) == 2.0  # 1 % short
    assert member_epochs(2, {"val_accuracy": 0.50}, 0.90, accuracy) == 10.0  # five times
    # Better than the baseline still gets half; the search's figure is the one that counts.
    assert member_epochs(2, {"val_accuracy": 0.95}, 0.90, accuracy) == 1.0
    retrained = {"val_accuracy": 0.90, "search": {"val_accuracy": 0.8865}}
    assert member_epochs(2, retrained, 0.90, accuracy) == 3.0
    # Lower is better: a 2 % higher error counts 2.
    assert member_epochs(2, {"val_accuracy": 0.51}, 0.50, error) == 4.0
    assert member_epochs(2, {"val_accuracy": 0.49}, 0.50, error) == 1.0


def test_a_longer_search_retrains_more_members_unless_told() -> None:
    assert [members_to_retrain(t) for t in (1, 24, 60, 100, None)] == [4, 4, 5, 8, 4]
    assert Settings().retrain_top is None  # unset: the count follows the trials
    assert Settings(retrain_top=2).retrain_top == 2


def test_members_are_spread_along_the_front() -> None:
    front = [{"trial": n, "bytes": 1000 * (n + 1), "val_accuracy": 0.5 + n / 100} for n in range(7)]
    # the search's own figures count, not retrained ones
    front[6] = {**front[6], "bytes": 1, "search": dict(front[6])}
    picked = lambda k: [m["trial"] for m in spread_along(front, k, Metric())]  # noqa: E731
    assert picked(5) == [0, 2, 3, 4, 6]
    assert picked(2) == [0, 6] and picked(7) == list(range(7)) == picked(10)
    assert picked(1) == [6]  # one: the best validation figure
    assert [m["trial"] for m in spread_along(front, 1, Metric("mse", "minimize"))] == [0]


def test_starting_plans_on_the_front_are_retrained_too() -> None:
    front = [
        {"trial": n, "bytes": 1000 * (n + 1), "val_accuracy": 0.5 + n / 100, "start": None}
        for n in range(7)
    ]
    front[3]["start"] = 2
    picked = [m["trial"] for m in to_retrain(front, 2, Metric())]
    assert picked == [6, 3, 0]  # the spread's two and the start, best validation first
    front[6]["start"] = 1  # a start the spread picked already counts once
    assert [m["trial"] for m in to_retrain(front, 2, Metric())] == [6, 3, 0]


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
    # Two spread along the front (its smallest and its largest member), and the members that
    # ran the preset's starting plans.
    by_size = sorted(pareto["front"], key=lambda m: m.get("search", m)["bytes"])
    starts = {m["trial"] for m in pareto["front"] if m["start"] is not None}
    assert starts and {m["trial"] for m in tried} == {
        by_size[0]["trial"], by_size[-1]["trial"], *starts
    }
    assert all(t["start"] == t["trial"] + 1 for t in pareto["trials"][:4] if t["start"])
    cache = json.loads((folder / "retrained.json").read_text())
    assert len(cache) == len(tried)
    for member in tried:
        retrained = member["retrained"]
        expect = member_epochs(6, member, pareto["baseline"]["val_accuracy"], Metric())
        assert retrained["epochs"] == expect and 3 <= expect <= 30  # half to five times 6
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
