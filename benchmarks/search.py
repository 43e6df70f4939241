"""Mixed per-layer search against single-method searches and random sampling, and Ray scaling.

    python benchmarks/search.py [--task fashion-mnist-mlp] [--trials 24] [--seed 0]
                                [--finetune-steps 200] [--budget 5MB] [--out /tmp/bench]
                                [--only tpe random ...] [--skip-ray]

Every search is a real study run through the product's own path (same trial count, seed and
fine-tune steps). Hypervolume is computed with moocore on the feasible trials, objectives
(log10 bytes, -validation accuracy), reference point (log10 budget, 0). "Smallest within one
point" is the smallest front member whose test accuracy is at most one point below the
baseline's. Trials per hour compare ``--backend ray`` with 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import moocore
import numpy as np
from rich.console import Console
from rich.table import Table

from autoshrink.session import run_search
from autoshrink.settings import load_settings

ALONE = {
    "hashing": {"structure": ["hashing"], "value": ["float"]},
    "lowrank": {"structure": ["lowrank"], "value": ["float"]},
    "pruning": {"structure": ["pruning"], "value": ["float"]},
    "quantization": {"structure": ["dense"], "value": ["quantization"]},
    "distillation": {"structure": ["dense"], "value": ["float"], "model": ["distillation"]},
}


def preset(folder: Path, name: str, choices: dict[str, list[str]]) -> Path:
    """A preset that allows one method family on every layer type."""
    lines = [f"model = {json.dumps(choices.get('model', ['none']))}", 'encoding = ["none"]']
    for kind in ("Linear", "Conv2d"):
        lines += [
            f"[layers.{kind}]",
            f"structure = {json.dumps(choices['structure'])}",
            f"value = {json.dumps(choices['value'])}",
        ]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(summary: dict, budget: int) -> dict:
    points = [
        (math.log10(t["bytes"]), -t["val_accuracy"])
        for t in summary["trials"]
        if t["state"] == "complete" and t["bytes"] <= budget
    ]
    hv = (
        float(moocore.hypervolume(np.array(points), ref=[math.log10(budget), 0.0])) if points else 0
    )
    floor = summary["baseline"]["test_accuracy"] - 0.01
    within = [m for m in summary["front"] if (m["test_accuracy"] or 0) >= floor]
    smallest = min(within, key=lambda m: m["bytes"], default=None)
    return {
        "hypervolume": hv,
        "feasible": len(points),
        "smallest_within_1pt": smallest["bytes"] if smallest else None,
        "its_test": smallest["test_accuracy"] if smallest else None,
        "failed": summary["counts"]["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-mlp")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--budget", default="5MB")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-")))
    parser.add_argument("--ray-trials", type=int, default=8)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument(
        "--only", nargs="*", default=[], help="run only searches whose label holds a word given"
    )
    args = parser.parse_args()
    console = Console(width=150)  # tables stay whole when the output goes to a file
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, dict]] = [
        ("mixed (tpe, the default)", {"sampler": "tpe"}),
        ("mixed (nsga2)", {"sampler": "nsga2"}),
        ("mixed, random sampling", {"sampler": "random"}),
    ]
    for name, choices in ALONE.items():
        runs.append((f"{name} alone", {"space": str(preset(args.out, name, choices))}))
    if args.only:
        runs = [run for run in runs if any(word in run[0] for word in args.only)]
    table = Table(
        title=f"{args.task}: {args.trials} trials, seed {args.seed}, "
        f"{args.finetune_steps} fine-tune steps, budget {args.budget}"
    )
    for column in (
        "search",
        "hypervolume",
        "feasible",
        "smallest within 1 pt",
        "its test",
        "failed",
        "minutes",
    ):
        table.add_column(column)
    base = dict(
        task=args.task,
        trials=args.trials,
        seed=args.seed,
        budget=args.budget,
        finetune_steps=args.finetune_steps,
        out=args.out,
    )
    for number, (label, extra) in enumerate(runs):
        settings = load_settings(**base, **extra, study=f"run{number}")
        start = time.monotonic()
        outcome = run_search(settings, console, resume=False)
        minutes = (time.monotonic() - start) / 60
        result = measure(outcome.summary, int(settings.budget))
        row = (
            label,
            f"{result['hypervolume']:.4f}",
            str(result["feasible"]),
            f"{result['smallest_within_1pt']:,}" if result["smallest_within_1pt"] else "-",
            f"{result['its_test']:.2%}" if result["its_test"] else "-",
            str(result["failed"]),
            f"{minutes:.1f}",
        )
        console.print(" | ".join(row), highlight=False)
        table.add_row(*row)
    console.print(table)
    if args.skip_ray:
        return
    rates = {}
    for workers in (1, 2):
        settings = load_settings(
            **{**base, "trials": args.ray_trials},
            backend="ray",
            workers=workers,
            study=f"ray{workers}",
        )
        start = time.monotonic()
        run_search(settings, console, resume=False)
        rates[workers] = args.ray_trials / ((time.monotonic() - start) / 3600)
        console.print(
            f"ray, {workers} worker(s): {rates[workers]:.0f} trials/hour "
            "(wall clock of the whole search, setup included)"
        )
    console.print(f"speed-up with 2 workers: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
