"""Trials per hour of one small search on a local Ray cluster of 1 and of 2 worker nodes.

    python benchmarks/cluster.py [--task digits-mlp] [--trials 8] [--finetune-steps 100]
                                 [--budget 40kB] [--cpus 2] [--out /tmp/bench]

Each cluster (``ray.cluster_utils.Cluster``) has a head that runs no trials and ``--cpus``
CPUs in all on its worker nodes: one node with all of them, or two nodes with half each. Each
node starts in a folder of its own with an empty baseline cache, so the workers get the
baseline through Ray (the driver trains it before the timing). The search (random sampling:
the same plans on both clusters, 2 trials at once) runs through the product's own path with
``--ray-address``. Trials per hour are given twice: over the whole search (driver start and
report included) and over its trials (first trial's start to last trial's end, as the study
records them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna
import ray
from ray.cluster_utils import Cluster
from rich.console import Console
from rich.table import Table

from autoshrink.session import run_search, search_options, study_folder
from autoshrink.settings import load_settings
from autoshrink.studies.setup import prepare
from autoshrink.studies.study import load_study_readonly


def start_cluster(root: Path, nodes: int, cpus: int) -> Cluster:
    """A head without CPUs and ``nodes`` worker nodes sharing ``cpus`` CPUs, each started
    in its own folder with an empty baseline cache."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    here = Path.cwd()
    for number in range(nodes):
        place = root / f"node-{number}"
        (place / "cache").mkdir(parents=True)
        os.chdir(place)
        try:
            cluster.add_node(num_cpus=cpus // nodes,
                             env_vars={"AUTOSHRINK_CACHE": str(place / "cache")})
        finally:
            os.chdir(here)
    return cluster


def trial_hours(study: optuna.Study) -> float:
    """Hours from the first trial's start to the last trial's end."""
    done = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    return (end - start).total_seconds() / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--budget", default="40kB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-")))
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    console = Console(width=150)
    table = Table(
        title=f"{args.task}: {args.trials} trials, {args.finetune_steps} fine-tune steps, "
        f"budget {args.budget}, {args.cpus} CPUs in all, 2 trials at once"
    )
    for column in ("worker nodes", "CPUs a node", "search s", "trials/hour (search)",
                   "trial phase s", "trials/hour (trials)", "complete"):
        table.add_column(column)
    base = dict(
        task=args.task, trials=args.trials, seed=args.seed, budget=args.budget,
        finetune_steps=args.finetune_steps, sampler="random", retrain_epochs=0, out=args.out,
    )
    driver = load_settings(**base)  # the driver's baseline, trained once outside the timing
    prepare(search_options(driver, study_folder(driver)))
    rates = {}
    for nodes in (1, 2):
        cluster = start_cluster(args.out / f"cluster-{nodes}", nodes, args.cpus)
        try:
            settings = load_settings(
                **base, backend="ray", workers=2, ray_address=cluster.address,
                study=f"nodes{nodes}",
            )
            start = time.monotonic()
            outcome = run_search(settings, console, resume=False)
            seconds = time.monotonic() - start
        finally:
            ray.shutdown()
            cluster.shutdown()
        study = load_study_readonly(outcome.folder)
        hours = trial_hours(study)
        complete = outcome.summary["counts"]["complete"]
        rates[nodes] = args.trials / hours
        table.add_row(str(nodes), str(args.cpus // nodes), f"{seconds:.0f}",
                      f"{args.trials / (seconds / 3600):.0f}", f"{hours * 3600:.0f}",
                      f"{rates[nodes]:.0f}", str(complete))
    console.print(table)
    console.print(f"2 nodes / 1 node, trials/hour over the trials: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
