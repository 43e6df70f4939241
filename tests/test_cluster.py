"""A search on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``):
a head that runs no trials and worker nodes whose working directory, baseline cache and
temporary folder are their own. The baseline reaches the workers through Ray, the driver
alone writes the study folder, and a worker node lost mid-trial costs one retried attempt."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from autoshrink.artifact import read_artifact
from autoshrink.registry import Registry
from autoshrink.tasks import resolve_task
from autoshrink.training import evaluate
from tests.conftest import CLI, install_plugin, run_cli, write_plugin

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

# Imported on a worker (as every plugin is), it writes down where that worker runs and what
# it sees; its `pausing` method (dense) holds the second Ray trial it builds until the test
# has removed the node under it.
SPY = '''
import json
import os
import tempfile
import time
from pathlib import Path

from torch import nn
from autoshrink import hookimpl
from autoshrink_plugins.dense import Dense

MARKS = os.environ.get("CLUSTER_SPY")


def _in_trial():
    import ray
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


if MARKS and _in_trial():
    import ray
    seen = {"cwd": os.getcwd(), "cache": os.environ.get("AUTOSHRINK_CACHE"),
            "tmp": tempfile.gettempdir(), "node": ray.get_runtime_context().get_node_id()}
    (Path(MARKS) / f"worker-{os.getpid()}.json").write_text(json.dumps(seen))


class Pausing(Dense):
    name = "pausing"
    applies_to = (nn.Linear,)

    def build(self, layer, config):
        if MARKS and _in_trial():
            from ray import tune
            marks = Path(MARKS)
            (marks / f"trial-{tune.get_context().get_trial_id()}").touch()
            if len(list(marks.glob("trial-*"))) == 2 and not (marks / "lost").exists():
                (marks / "waiting").write_text(str(os.getpid()))
                deadline = time.monotonic() + 300
                while not (marks / "lost").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
        return super().build(layer, config)


@hookimpl
def register_methods(register):
    register(Pausing())
'''

FAST = ["--task", "digits-mlp", "--finetune-steps", "20", "--budget", "40kB", "--seed", "3",
        "--retrain-epochs", "0", "--backend", "ray", "--sampler", "random"]
# The GCS declares a node dead after three missed health checks half a second apart (Ray's
# default takes some 30 s).
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
               "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


@dataclass
class Place:
    """Where one node's processes run: working directory, baseline cache, temporary files."""

    cwd: Path
    cache: Path
    tmp: Path

    @classmethod
    def make(cls, root: Path) -> Place:
        place = cls(root / "cwd", root / "cache", root / "tmp")
        for folder in (place.cwd, place.cache, place.tmp):
            folder.mkdir(parents=True)
        return place


class LocalCluster:
    """Worker nodes added one by one to a head without CPUs (trials run only on worker
    nodes), each started from its own :class:`Place` with the spy plugin installed."""

    def __init__(
        self, head: ray_cluster_utils.Cluster, tmp_path: Path, site: Path, marks: Path
    ) -> None:
        self.cluster, self.tmp_path, self.site, self.marks = head, tmp_path, site, marks
        self.places: list[Place] = []
        self.nodes: list[object] = []

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, cpus: int) -> tuple[object, Place]:
        place = Place.make(self.tmp_path / f"node-{len(self.places)}")
        self.places.append(place)
        env = {"AUTOSHRINK_CACHE": str(place.cache), "TMPDIR": str(place.tmp),
               "PYTHONPATH": str(self.site), "CLUSTER_SPY": str(self.marks)}
        here = Path.cwd()
        os.chdir(place.cwd)  # the node's processes start in its own folder
        try:
            node = self.cluster.add_node(num_cpus=cpus, env_vars=env)
        finally:
            os.chdir(here)
        self.nodes.append(node)
        return node, place

    def remove_workers(self) -> None:
        """Remove this test's worker nodes (those still there) and wait until the head
        counts only itself, so the next test starts from the head alone."""
        for node in self.nodes:
            if node in self.cluster.worker_nodes:
                self.cluster.remove_node(node)
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def head() -> Iterator[ray_cluster_utils.Cluster]:
    """One head for the module's tests (each adds and removes its own worker nodes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        made = ray_cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH},
        )
        try:
            yield made
        finally:
            made.shutdown()


@pytest.fixture(scope="module")
def spy_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spy")
    return install_plugin(write_plugin(root / "p", "autoshrink-spy", SPY), root / "site")


@pytest.fixture
def cluster(
    head: ray_cluster_utils.Cluster, spy_site: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[LocalCluster]:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    made = LocalCluster(head, tmp_path, spy_site, marks)
    try:
        yield made
    finally:
        made.remove_workers()


def workers_seen(marks: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in marks.glob("worker-*.json")]


def load(folder: Path) -> optuna.Study:
    journal = optuna.storages.journal.JournalFileBackend(str(folder / "study.journal"))
    return optuna.load_study(study_name=folder.name,
                             storage=optuna.storages.JournalStorage(journal))


def check_artifacts(folder: Path, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Each artifact in the study folder (the front's: the report removes the others) is a
    complete trial's, at the size its worker measured; returns the complete trials."""
    complete = {
        t.number: t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
    }
    front = json.loads((folder / "pareto.json").read_text())["front"]
    assert front
    written = sorted((folder / "artifacts").glob("trial-????.safetensors"))
    assert [p.name for p in written] == sorted(Path(m["artifact"]).name for m in front)
    for path in written:
        trial = complete[int(path.stem.removeprefix("trial-"))]
        assert folder / trial.user_attrs["artifact"] == path
        assert path.stat().st_size == int(trial.values[0]), trial.number
        assert trial.user_attrs["seconds"] > 0
    return list(complete.values())


def test_workers_need_nothing_from_the_drivers_disk(
    tmp_path: Path, cluster: LocalCluster, isolated_cache: Path, registry: Registry
) -> None:
    cluster.add_worker(cpus=2)
    driver = Place.make(tmp_path / "driver")
    # `--out` is relative: a worker writing the study folder would write it in its own
    # working directory.
    done = run_cli("search", *FAST, "--trials", "3", "--workers", "2",
                   "--ray-address", cluster.address, "--out", "r", "--study", "c",
                   env={"PYTHONPATH": str(cluster.site)}, cwd=driver.cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    worker = cluster.places[0]
    seen = workers_seen(cluster.marks)
    assert seen, "no trial ran on the worker node"
    for one in seen:
        assert Path(one["cwd"]) == worker.cwd != driver.cwd
        assert Path(one["cache"]) == worker.cache != isolated_cache
        assert Path(one["tmp"]) == worker.tmp
    # The baseline came through Ray: the driver's cache holds it, the worker's nothing.
    assert list((isolated_cache / "baselines").glob("digits-mlp-*.safetensors"))
    assert not any(worker.cache.iterdir())
    # Worker-side artifacts were temporary files, removed; the study folder is the driver's.
    left = sorted(str(p.relative_to(worker.tmp)) for p in worker.tmp.rglob("*") if p.is_file())
    assert not left, left
    assert not (worker.cwd / "r").exists()
    folder = driver.cwd / "r" / "c"
    study = load(folder)
    assert len(study.trials) == 3
    complete = check_artifacts(folder, study)
    # The file the driver wrote is the model the worker measured: its validation accuracy
    # again here, and `autoshrink eval` agrees with the report.
    pareto = json.loads((folder / "pareto.json").read_text())
    member = pareto["front"][0]
    trial = next(t for t in complete if t.number == member["trial"])
    task = resolve_task("digits-mlp", registry.tasks)
    artifact = read_artifact(folder / member["artifact"], registry, task)
    assert evaluate(artifact.model, task.load_data(None).val, task.metric) == trial.values[1]
    evaluated = run_cli("eval", str(folder / member["artifact"]), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["bytes"] == member["bytes"] == int(trial.values[0])
    assert json.loads(evaluated.stdout)["test_accuracy"] == member["test_accuracy"]


def wait_for(path: Path, search: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if search.poll() is not None:
            out, err = search.communicate()
            pytest.fail(f"the search ended before {path.name}: {err[-3000:]}")
        if time.monotonic() > deadline:
            search.kill()
            pytest.fail(f"no {path.name} after {seconds:g} s")
        time.sleep(0.2)


def test_a_lost_node_costs_one_retried_attempt(tmp_path: Path, cluster: LocalCluster) -> None:
    first, _ = cluster.add_worker(cpus=1)
    preset = tmp_path / "pausing.toml"
    preset.write_text('[layers.Linear]\nstructure = ["pausing"]\n'
                      'value = ["float", "quantization"]\nmodel = ["none"]\nencoding = ["none"]\n')
    out = tmp_path / "r"
    search = subprocess.Popen(
        [*CLI, "search", *FAST, "--trials", "3", "--workers", "1", "--max-retries", "1",
         "--space", str(preset), "--ray-address", cluster.address, "--out", str(out),
         "--study", "lost"],
        env={**os.environ, "PYTHONPATH": str(cluster.site)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(cluster.marks / "waiting", search, 240)
        # The first trial is recorded; the second is in its worker on the first node.
        folder = out / "lost"
        before = load(folder).trials[0]
        assert before.state == optuna.trial.TrialState.COMPLETE
        kept = (folder / before.user_attrs["artifact"]).read_bytes()
        cluster.cluster.remove_node(first, allow_graceful=False)
        (cluster.marks / "lost").touch()
        cluster.add_worker(cpus=1)  # a fresh node, its cache empty, takes the retry
        stdout, stderr = search.communicate(timeout=300)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, stderr[-3000:]
    assert "worker lost" in stdout
    pareto = json.loads((folder / "pareto.json").read_text())
    trials = {t["trial"]: t for t in pareto["trials"]}
    lost = [t for t in trials.values() if "worker lost" in (t["failure"] or "")]
    assert len(lost) == 1 and lost[0]["state"] == "fail"
    assert lost[0]["failure"].startswith("interrupted (worker lost: ")
    assert "trial 1 runs again, retry 1 of 1" in lost[0]["failure"]
    assert [t["state"] for t in trials.values()].count("complete") == 3 and len(trials) == 4
    assert trials[1]["state"] == "complete" and trials[1]["plan"] == lost[0]["plan"]
    # Nothing recorded before the loss is lost: trial 0's record stands, and its file if
    # it is on the front (the report keeps only the front's).
    study = load(folder)
    after = study.trials[0]
    assert (after.state, after.values, after.user_attrs) == (
        before.state, before.values, before.user_attrs)
    if trials[0]["artifact"]:
        assert (folder / trials[0]["artifact"]).read_bytes() == kept
    check_artifacts(folder, study)
    # The retry ran on the new node, which had no baseline of its own either.
    second = cluster.places[1]
    assert any(Path(one["cwd"]) == second.cwd for one in workers_seen(cluster.marks))
    assert not any(second.cache.iterdir()) and not any(cluster.places[0].cache.iterdir())
