"""A Ray worker that dies mid-trial (its process killed, as when a node is lost): the trial is
recorded as failed with "worker lost" and run again up to ``--max-retries`` times; the search
finishes and keeps every trial recorded before."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tests.conftest import install_plugin, run_cli, write_plugin

# A dense layer whose build() kills its own process, once, in the second Ray Tune trial it
# sees (a real SIGKILL of the Ray worker, where a lost node would leave the trial), and
# raises an exception in the third: a failure of the trial, which is not run again.
KILLING = '''
import os
import signal
from pathlib import Path

from torch import nn
from autoshrink import hookimpl
from autoshrink_plugins.dense import Dense


class KillingMethod(Dense):
    name = "killing"
    applies_to = (nn.Linear,)

    def build(self, layer, config):
        marks = os.environ.get("KILLING_PLUGIN_DIR")
        if marks:
            import ray
            if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
                from ray import tune
                seen = Path(marks)
                (seen / f"trial-{tune.get_context().get_trial_id()}").touch()
                trials = len(list(seen.glob("trial-*")))
                if trials == 2 and not (seen / "killed").exists():
                    (seen / "killed").write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
                if trials == 3:
                    with open(seen / "raised", "a") as attempts:
                        attempts.write("raised\\n")
                    raise RuntimeError("exploded on purpose")
        return super().build(layer, config)


@hookimpl
def register_methods(register):
    register(KillingMethod())
'''


@pytest.fixture(autouse=True)
def _no_inherited_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def installed(factory: pytest.TempPathFactory, name: str, code: str) -> Path:
    """The plugin ``code`` installed as the distribution ``name`` (once for the module: the
    tests that use it only read it); returns its site folder."""
    root = factory.mktemp(name)
    return install_plugin(write_plugin(root / "p", name, code), root / "site")


@pytest.fixture(scope="module")
def killing_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return installed(tmp_path_factory, "autoshrink-killing", KILLING)


# Each Ray search here costs 15-25 s: the second case of each pair runs with `-m slow`.
@pytest.mark.parametrize("retries", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_lost_worker_fails_its_attempt_and_the_search_goes_on(
    tmp_path: Path, killing_site: Path, retries: int
) -> None:
    preset = tmp_path / "killing.toml"
    preset.write_text('[layers.Linear]\nstructure = ["killing"]\n'
                      'value = ["float", "quantization"]\nmodel = ["none"]\nencoding = ["none"]\n')
    marks = tmp_path / "marks"
    marks.mkdir()
    done = run_cli(
        "search", "--task", "digits-mlp", "--finetune-steps", "20", "--budget", "100kB",
        "--trials", "3", "--retrain-epochs", "0", "--space", str(preset), "--sampler", "random",
        "--backend", "ray", "--workers", "1", "--max-retries", str(retries),
        "--out", str(tmp_path / "r"), "--study", "lost",
        env={"PYTHONPATH": str(killing_site), "KILLING_PLUGIN_DIR": str(marks)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (marks / "killed").is_file()  # a Ray worker did kill itself
    # The exception failed its trial once, with its reason: it is not run again.
    assert (marks / "raised").read_text() == "raised\n"
    pareto = json.loads((tmp_path / "r" / "lost" / "pareto.json").read_text())
    trials = {t["trial"]: t for t in pareto["trials"]}
    lost = [t for t in trials.values() if "worker lost" in (t["failure"] or "")]
    assert len(lost) == 1 and lost[0]["state"] == "fail"
    raised = [t for t in trials.values() if t["failure"] == "RuntimeError: exploded on purpose"]
    assert len(raised) == 1 and raised[0]["state"] == "fail"
    study = optuna.load_study(
        study_name="lost",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "r" / "lost" / "study.journal"))),
    )
    assert all(t.state.is_finished() for t in study.trials)
    recorded = {t.number: t for t in study.trials}
    # Trial 0 ran first, before the kill, and is kept as it was: its figures and artifact.
    assert trials[0]["state"] == "complete" and recorded[0].user_attrs["artifact"]
    assert recorded[0].values[0] == trials[0]["bytes"]
    if retries:
        # The lost attempt is a failed trial of its own, not counted; the trial ran again.
        assert lost[0]["failure"].startswith("interrupted (worker lost")
        assert "retry 1 of 1" in lost[0]["failure"]
        assert [t["state"] for t in pareto["trials"]].count("complete") == 2
        number = int(re.search(r"trial (\d+) runs again", lost[0]["failure"])[1])
        assert trials[number]["state"] == "complete"
        assert trials[number]["plan"] == lost[0]["plan"]
        assert recorded[number].user_attrs["artifact"] and recorded[number].user_attrs["seconds"]
        assert len(trials) == 4
    else:
        assert lost[0]["failure"].startswith("worker lost")
        assert [t["state"] for t in pareto["trials"]].count("complete") == 1
        assert len(trials) == 3 and "artifact" not in recorded[lost[0]["trial"]].user_attrs
        artifacts = tmp_path / "r" / "lost" / "artifacts"
        assert not (artifacts / f"trial-{lost[0]['trial']:04d}.safetensors").exists()
    assert "worker lost" in done.stdout  # the progress log says so


def test_max_retries_is_a_setting(tmp_path: Path) -> None:
    bad = run_cli("search", "--task", "digits-mlp", "--budget", "30kB", "--max-retries", "-1",
                  "--out", str(tmp_path))
    assert bad.returncode == 2 and "max-retries" in bad.stderr
    assert not any(tmp_path.iterdir())


# A plugin that a Ray worker cannot import (as on a node where it is not installed), and a
# task whose data a Ray worker cannot find (as on a node without the files); the driver has
# both. No trial of the task trains (no worker loads its data), so the driver trains its
# baseline (its own, not digits-mlp's cached one) for one epoch only.
BLIND = '''
import os
from functools import partial

from torch import nn
from autoshrink import hookimpl
from autoshrink.datasets import digits
from autoshrink.errors import DataNotFoundError
from autoshrink.tasks import Task, TrainingSettings
from autoshrink_plugins.dense import Dense
from autoshrink_plugins.tasks import mlp


def _in_trial():
    import ray
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


if os.environ.get("BLIND") == "plugin" and _in_trial():
    raise ImportError("libblind.so: cannot open shared object file")


class Blind(Dense):
    name = "blind"
    applies_to = (nn.Linear,)


def load(data_dir):
    if _in_trial():
        raise DataNotFoundError("no digits on this node\\nset AUTOSHRINK_DATA")
    return digits()


@hookimpl
def register_methods(register):
    register(Blind())


@hookimpl
def register_tasks(register):
    register(Task(name="blind-digits", build_model=partial(mlp, 64, (128, 64), 10),
                  load_data=load, input_shape=(64,),
                  training=TrainingSettings(epochs=1, batch_size=64, lr=2e-3)))
'''


@pytest.fixture(scope="module")
def blind_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return installed(tmp_path_factory, "autoshrink-blind", BLIND)


@pytest.mark.parametrize("missing", ["plugin", pytest.param("data", marks=pytest.mark.slow)])
def test_a_worker_without_a_plugin_or_the_data_fails_its_trials_in_one_line(
    tmp_path: Path, blind_site: Path, missing: str
) -> None:
    preset = tmp_path / "blind.toml"
    preset.write_text('[layers.Linear]\nstructure = ["blind"]\nvalue = ["float"]\n'
                      'model = ["none"]\nencoding = ["none"]\n')
    done = run_cli(
        "search", "--task", "digits-mlp" if missing == "plugin" else "blind-digits",
        "--finetune-steps", "20", "--budget", "100kB", "--trials", "2", "--retrain-epochs", "0",
        "--space", str(preset), "--backend", "ray", "--workers", "1",
        "--out", str(tmp_path / "r"), "--study", "blind",
        env={"PYTHONPATH": str(blind_site), "BLIND": missing},
    )
    pareto = json.loads((tmp_path / "r" / "blind" / "pareto.json").read_text())
    failures = [t["failure"] for t in pareto["trials"]]
    assert [t["state"] for t in pareto["trials"]] == ["fail", "fail"], done.stderr[-3000:]
    if missing == "plugin":
        expected = (
            "UsageError: worker on {} does not have the driver's plugins: method `blind` "
            "(driver: autoshrink-blind==0.1, here: none) ("
        )
        assert all("libblind.so: cannot open shared object file" in f for f in failures)
        assert all(f.endswith("; install the same plugins on every node") for f in failures)
    else:
        expected = "UsageError: worker on {} cannot load the data of task `blind-digits`: "
        assert all(f.endswith(": no digits on this node") for f in failures)
    assert all(f.startswith(expected.format(socket.gethostname())) for f in failures), failures
    assert all("\n" not in f for f in failures)
    assert not (tmp_path / "r" / "blind" / "artifacts").exists()
