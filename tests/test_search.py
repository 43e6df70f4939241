"""Real searches on digits-mlp: local and Ray backends, kill and resume, failing plugins,
and input the search must refuse before it trains anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from autoshrink.artifact import read_header
from tests.conftest import CLI, install_plugin, run_cli, write_plugin

FAST = ["--task", "digits-mlp", "--finetune-steps", "40"]


def search(out: Path, study: str, *args: str, env: dict[str, str] | None = None):
    return run_cli("search", *FAST, "--out", str(out), "--study", study, *args, env=env)


def check_study(out: Path, study: str, budget: int, trials: int) -> dict:
    folder = out / study
    pareto = json.loads((folder / "pareto.json").read_text())
    assert pareto["budget_bytes"] == budget
    assert len(pareto["trials"]) == trials
    assert {"baseline", "front", "best", "settings", "versions", "counts"} <= set(pareto)
    assert pareto["front"], "no feasible trial"
    for member in pareto["front"]:
        path = folder / member["artifact"]
        assert path.stat().st_size == member["bytes"] <= budget
        evaluated = run_cli("eval", str(path), "--json")
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["test_accuracy"] == member["test_accuracy"]
        assert json.loads(evaluated.stdout)["bytes"] == member["bytes"]
        # The plan recorded is the one built, tightened to fit the budget or not.
        assert read_header(path)[0].plan.model_dump(mode="json") == member["plan"]
    best = next(m for m in pareto["front"] if m["trial"] == pareto["best"])
    assert best["val_accuracy"] == max(m["val_accuracy"] for m in pareto["front"])
    assert (folder / "best.safetensors").read_bytes() == (folder / best["artifact"]).read_bytes()
    assert (folder / "report.md").is_file()
    return pareto


def test_local_search(tmp_path: Path) -> None:
    result = search(tmp_path, "local", "--budget", "30kB", "--trials", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    pareto = check_study(tmp_path, "local", 30_000, 8)
    assert pareto["settings"]["backend"] == "local"
    assert "recommended: trial" in result.stdout
    # Output to a pipe reads as a log: a line per finished trial, no clipped bar.
    assert "━" not in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 8 and lines[-1].startswith("trial 7 (8/8): complete, "), lines


def test_ray_search(tmp_path: Path) -> None:
    # More trials than workers (Tune asks the study again as trials end). No retraining: it
    # runs on the driver after the search, as in test_local_search, so the front checked
    # here is the artifacts the workers sent. The whole space without starting plans: under
    # this budget the sampler's plans are mostly over it, so workers tighten them and the
    # driver records what they built.
    preset = tmp_path / "everything.toml"
    preset.write_text('description = "every method, no starting plans"\n')
    result = search(
        tmp_path, "ray", "--budget", "15kB", "--trials", "3", "--backend", "ray", "--workers", "2",
        "--retrain-epochs", "0", "--space", str(preset),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pareto = check_study(tmp_path, "ray", 15_000, 3)
    assert pareto["settings"]["backend"] == "ray"
    assert all(t["state"] == "complete" and t["bytes"] <= 15_000 for t in pareto["trials"])
    assert any(t["fitted"] for t in pareto["trials"]), pareto["trials"]


def complete_trials(journal: Path) -> int:
    """Complete trials in a study's journal, read through Optuna while the search writes."""
    if not journal.is_file():
        return 0
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return 0
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_killed_search_resumes_with_its_trials(tmp_path: Path) -> None:
    command = [*CLI, "search", *FAST, "--out", str(tmp_path), "--study", "killed",
               "--budget", "30kB", "--trials", "12", "--finetune-steps", "150"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "killed" / "study.journal"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and complete_trials(journal) < 3:
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "pareto.json").exists()
    resumed = run_cli("resume", "killed", "--out", str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    pareto = json.loads((tmp_path / "killed" / "pareto.json").read_text())
    states = [t["state"] for t in pareto["trials"]]
    assert states[:3] == ["complete"] * 3  # the earlier trials are kept
    assert set(states) <= {"complete", "fail"}
    interrupted = [t for t in pareto["trials"] if "interrupted" in (t["failure"] or "")]
    assert len(interrupted) <= 1 and all(t["state"] == "fail" for t in interrupted)
    # The killed trial does not count toward the 12, and its plan runs again.
    assert len(states) - len(interrupted) == 12
    for trial in (t for t in interrupted if t["plan"] is not None):
        assert any(t["plan"] == trial["plan"] and t["state"] == "complete"
                   for t in pareto["trials"] if t["trial"] > trial["trial"])


EXPLODING = '''
from torch import nn
from autoshrink import hookimpl
from autoshrink_plugins.dense import Dense


class Exploding(nn.Linear):
    def forward(self, x):
        if self.training:
            raise RuntimeError("exploded during fine-tune")
        return super().forward(x)


class ExplodingMethod(Dense):
    name = "exploding"
    applies_to = (nn.Linear,)

    def build(self, layer, config):
        module = Exploding(layer.in_features, layer.out_features)
        module.load_state_dict(layer.state_dict())
        return module


@hookimpl
def register_methods(register):
    register(ExplodingMethod())
'''


def test_failing_plugin_fails_its_trials_not_the_search(tmp_path: Path) -> None:
    site = install_plugin(write_plugin(tmp_path / "p", "autoshrink-exploding", EXPLODING),
                          tmp_path / "site")
    preset = tmp_path / "explode.toml"
    preset.write_text('[layers.Linear]\nstructure = ["dense", "exploding"]\nvalue = ["float"]\n'
                      'model = ["none"]\nencoding = ["none"]\n')
    result = search(tmp_path, "explode", "--budget", "100kB", "--trials", "6",
                    "--sampler", "random", "--space", str(preset),
                    env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    pareto = json.loads((tmp_path / "explode" / "pareto.json").read_text())
    failed = [t for t in pareto["trials"] if t["state"] == "fail"]
    assert failed and pareto["counts"]["failed"] == len(failed)
    assert all(t["failure"] == "RuntimeError: exploded during fine-tune" for t in failed)
    assert "exploded during fine-tune" in (tmp_path / "explode" / "report.md").read_text()
    ok = [t for t in pareto["trials"] if t["state"] == "complete"]
    for trial in ok:
        layers = trial["plan"]["layers"].values()
        assert all(layer["structure"]["method"] == "dense" for layer in layers)


def one_line(result, code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_budget_below_smallest_model_is_refused_before_training(tmp_path: Path) -> None:
    start = time.monotonic()
    line = one_line(search(tmp_path, "tiny", "--budget", "500B"))
    assert "below the smallest model this search space can express" in line
    assert "bytes" in line
    assert not (tmp_path / "tiny").exists()
    assert time.monotonic() - start < 120


def test_existing_study_is_not_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    line = one_line(search(tmp_path, "taken", "--budget", "30kB"))
    assert "already exists" in line and "autoshrink resume taken" in line
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_unknown_preset(tmp_path: Path) -> None:
    line = one_line(search(tmp_path, "p", "--budget", "30kB", "--space", "nope"))
    assert "unknown search-space preset `nope`" in line


def test_unreachable_ray_address(tmp_path: Path) -> None:
    line = one_line(
        search(tmp_path, "r", "--budget", "30kB", "--backend", "ray",
               "--ray-address", "127.0.0.1:9"),
    )
    assert "--ray-address" in line
    assert not (tmp_path / "r").exists()


def test_resume_unknown_study(tmp_path: Path) -> None:
    line = one_line(run_cli("resume", "ghost", "--out", str(tmp_path)))
    assert "no study" in line


@pytest.fixture(autouse=True)
def _no_inherited_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    os.environ.pop("RAY_ADDRESS", None)


def test_tpe_models_the_space_after_a_quarter_of_a_short_search() -> None:
    from autoshrink.studies.setup import SearchOptions
    from autoshrink.studies.study import make_sampler, startup_trials
    from autoshrink.trial import TrialBudget

    assert [startup_trials(n) for n in (None, 4, 12, 24, 40, 100)] == [10, 3, 3, 6, 10, 10]
    options = SearchOptions(
        budget=10_000, task="digits-mlp", space="default", storage="", trial=TrialBudget(),
        trials=12,
    )
    sampler = make_sampler(options)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 3  # no public accessor; the figure is what matters
