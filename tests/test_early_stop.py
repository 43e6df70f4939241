"""Stopping hopeless trials early: the rule, and a real search that stops some."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from autoshrink.metric import Metric
from autoshrink.studies.early_stop import CHECKPOINT, STOPPED, EarlyStop
from tests.conftest import run_cli

ACCURACY = EarlyStop(Metric("accuracy", "maximize"))


def test_a_trial_stops_when_two_no_larger_trials_were_ahead() -> None:
    earlier = [(1_000, 0.90), (2_000, 0.85), (9_000, 0.99), (500, 0.20)]
    reason = ACCURACY.reason(2_000, 0.80, earlier)
    assert reason is not None and "2 trials no larger" in reason and "90.00%" in reason
    # One smaller trial ahead is not enough; larger trials never count.
    assert ACCURACY.reason(1_500, 0.80, earlier) is None
    assert ACCURACY.reason(20_000, 0.995, earlier) is None
    # Equal figures are not "ahead".
    assert ACCURACY.reason(2_000, 0.90, [(1_000, 0.90), (1_000, 0.90), (1, 0.1), (1, 0.1)]) is None


def test_nothing_stops_before_the_warmup() -> None:
    assert ACCURACY.reason(5_000, 0.1, [(1, 0.9), (1, 0.9), (1, 0.9)]) is None
    assert ACCURACY.reason(5_000, 0.1, [(1, 0.9), (1, 0.9), (1, 0.9), (1, 0.9)]) is not None


def test_the_rule_follows_the_metric_direction() -> None:
    mse = EarlyStop(Metric("mse", "minimize"))
    earlier = [(100, 0.2), (100, 0.3), (100, 5.0), (100, 6.0)]
    assert mse.reason(200, 1.0, earlier) is not None  # two smaller plans had lower errors
    assert mse.reason(200, 0.1, earlier) is None
    assert EarlyStop(Metric(), margin=0.2).reason(2_000, 0.80, [
        (1_000, 0.90), (1_000, 0.95), (1, 0.1), (1, 0.1)]) is None  # within the margin


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real search with --stop-early; with this seed, random sampling stops two trials."""
    out = tmp_path_factory.mktemp("early")
    result = run_cli(
        "search", "--task", "digits-mlp", "--budget", "40kB", "--trials", "12",
        "--finetune-steps", "40", "--retrain-epochs", "0", "--sampler", "random", "--seed", "3",
        "--stop-early", "--out", str(out), "--study", "s",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped early:" in result.stdout
    return out / "s"


def test_a_stopped_trial_is_recorded_as_pruned_with_its_reason(stopped: Path) -> None:
    storage = JournalStorage(JournalFileBackend(str(stopped / "study.journal")))
    study = optuna.load_study(study_name="s", storage=storage)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "this seed stops trials early"
    for trial in pruned:
        size, value = trial.user_attrs[CHECKPOINT]
        earlier = [t.user_attrs[CHECKPOINT] for t in study.trials
                   if t.number < trial.number and CHECKPOINT in t.user_attrs]
        ahead = [p for p in earlier if p[0] <= size and p[1] > value]
        assert len(ahead) >= 2, trial.number  # the rule, checked against the record
        assert trial.user_attrs[STOPPED].startswith("stopped early:")
        assert not (stopped / "artifacts" / f"trial-{trial.number:04d}.safetensors").exists()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert all(CHECKPOINT in t.user_attrs for t in complete if "untrained" not in t.user_attrs)
    summary = json.loads((stopped / "pareto.json").read_text())
    assert summary["counts"]["pruned"] == len(pruned)
    assert len(study.trials) == 12  # a stopped trial counts toward --trials
    rows = {t["trial"]: t for t in summary["trials"]}
    for trial in pruned:
        assert rows[trial.number]["state"] == "pruned"
        assert rows[trial.number]["stopped"] == trial.user_attrs[STOPPED]
    report = (stopped / "report.md").read_text()
    assert "## Trials stopped early" in report and f"{len(pruned)} stopped early" in report
    page = (stopped / "index.html").read_text()
    assert "point stopped" in page and "Trials stopped early" in page


def test_trials_stop_early_on_ray_too(tmp_path: Path) -> None:
    """A search on a real Ray cluster (with this seed the fifth of six trials stops): workers
    judge their trials through one actor and the driver records them as pruned."""
    result = run_cli(
        "search", "--task", "digits-mlp", "--budget", "40kB", "--trials", "6",
        "--finetune-steps", "40", "--retrain-epochs", "0", "--sampler", "random", "--seed", "9",
        "--stop-early", "--backend", "ray", "--workers", "1", "--out", str(tmp_path),
        "--study", "s",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "s" / "study.journal")))
    study = optuna.load_study(study_name="s", storage=storage)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned and all(t.user_attrs[STOPPED].startswith("stopped early:") for t in pruned)
    assert all(len(t.user_attrs[CHECKPOINT]) == 2 for t in pruned)
    summary = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert summary["counts"]["pruned"] == len(pruned)
    assert summary["counts"]["complete"] + len(pruned) == 6
