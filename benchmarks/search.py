"""Which sampler finds the best front: TPE, NSGA-II and random sampling over several seeds,
against the strongest single methods, and what stopping hopeless trials early saves.

    python benchmarks/search.py [--task fashion-mnist-mlp] [--trials 60] [--seeds 0 1 2]
                                [--alone hashing pruning] [--stop-early-seeds 0 1 2]
                                [--finetune-steps 300] [--budget 5MB] [--out /tmp/bench]
                                [--only WORD ...] [--ray-scaling]

Every search is a real study run through the product's own path with the same trial count,
fine-tune steps and budget, and no retraining (the samplers are compared on what they find,
not on what retraining adds). Runs are recorded one by one in ``OUT/results.json``: run the
same command again and the finished runs are read back, not searched again, and a
run cut short is resumed, so a long benchmark can be stopped and continued.

Figures per search:
- hypervolume (moocore) of the feasible complete trials in (log10 bytes, -validation accuracy)
  against the reference point (log10 budget, 0), i.e. decades of size saved x accuracy;
- the smallest front member whose test accuracy is within 0.5 and within 1 point of the
  baseline's (test data the search never saw);
- trials stopped early, minutes of wall clock (the machine's load is printed beside them).
Rows over several seeds show the median and, in brackets, the lowest and highest value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import moocore
import numpy as np
from rich.console import Console
from rich.markup import escape
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


def smallest_within(summary: dict, points: float) -> int | None:
    floor = summary["baseline"]["test_accuracy"] - points / 100
    within = [m["bytes"] for m in summary["front"] if (m["test_accuracy"] or 0) >= floor]
    return min(within, default=None)


def measure(summary: dict, budget: int) -> dict:
    points = [
        (math.log10(t["bytes"]), -t["val_accuracy"])
        for t in summary["trials"]
        if t["state"] == "complete" and t["bytes"] <= budget
    ]
    reference = [math.log10(budget), 0.0]
    hv = float(moocore.hypervolume(np.array(points), ref=reference)) if points else 0.0
    return {
        "hypervolume": hv,
        "feasible": len(points),
        "within_half": smallest_within(summary, 0.5),
        "within_one": smallest_within(summary, 1.0),
        "stopped": summary["counts"].get("pruned", 0),
        "failed": summary["counts"]["failed"],
    }


def spread(values: list[float | None], form: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(values) == 1:
        return form.format(known[0])
    missing = len(values) - len(known)
    text = f"{form.format(statistics.median(known))} [{form.format(min(known))}, "
    text += f"{form.format(max(known))}]"
    return text + (f", none in {missing}" if missing else "")


def runs_asked(args, out: Path) -> list[tuple[str, int, dict]]:
    """(label, seed, extra settings) in the order they run: every sampler at one seed before
    the next seed, so a benchmark cut short still compares the samplers."""
    runs = []
    for seed in args.seeds:
        for sampler in ("tpe", "nsga2", "random"):
            runs.append((f"mixed, {sampler}", seed, {"sampler": sampler}))
    for name in args.alone:
        space = str(preset(out, name, ALONE[name]))
        runs.append((f"{name} alone (tpe)", args.seeds[0], {"space": space}))
    for seed in args.stop_early_seeds:
        runs.append(("mixed, tpe, --stop-early", seed, {"sampler": "tpe", "stop_early": True}))
    if args.only:
        runs = [run for run in runs if any(word in run[0] for word in args.only)]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-mlp")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alone", nargs="*", default=["hashing", "pruning"], choices=ALONE)
    parser.add_argument("--stop-early-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--budget", default="5MB")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-")))
    parser.add_argument("--ray-scaling", action="store_true", help="also time Ray, 1 vs 2 workers")
    parser.add_argument(
        "--only", nargs="*", default=[], help="run only searches whose label holds a word given"
    )
    args = parser.parse_args()
    console = Console(width=160)  # tables stay whole when the output goes to a file
    args.out.mkdir(parents=True, exist_ok=True)
    record = args.out / "results.json"
    done: dict[str, dict] = json.loads(record.read_text()) if record.exists() else {}
    base = dict(
        task=args.task,
        trials=args.trials,
        budget=args.budget,
        finetune_steps=args.finetune_steps,
        retrain_epochs=0,
        # Trials take seconds; the long limit keeps a benchmark that was paused (to time
        # something else on the same cores) from failing the trial that was running.
        trial_timeout=3600.0,
        out=args.out,
    )
    runs = runs_asked(args, args.out)
    for label, seed, extra in runs:
        key = f"{label} / seed {seed}"
        if key in done:
            continue
        study = "".join(c if c.isalnum() else "-" for c in key).strip("-")
        settings = load_settings(**base, **extra, seed=seed, study=study)
        load_before = os.getloadavg()[1]
        start = time.monotonic()
        # a run cut short (the benchmark stopped mid-search) continues where it was; its
        # minutes then count only the rest, and the record says so
        resumed = (args.out / study).is_dir()
        outcome = run_search(settings, console, resume=resumed)
        result = measure(outcome.summary, int(settings.budget))
        result["resumed"] = resumed
        result["minutes"] = (time.monotonic() - start) / 60
        result["load"] = (load_before + os.getloadavg()[1]) / 2
        done[key] = result
        record.write_text(json.dumps(done, indent=1))
        console.print(f"{key}: {json.dumps(result)}", highlight=False)
    table = Table(
        title=escape(
            f"{args.task}: {args.trials} trials a search, {args.finetune_steps} fine-tune "
            f"steps, budget {args.budget}, no retraining; median [min, max] over seeds"
        )
    )
    columns = (
        "search",
        "seeds",
        "hypervolume",
        "smallest within 0.5 pt",
        "smallest within 1 pt",
        "stopped",
        "failed",
        "minutes (load)",
    )
    for column in columns:
        table.add_column(column)
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    for label in labels:
        results = [r for key, r in done.items() if key.startswith(f"{label} / ")]
        if not results:
            continue
        table.add_row(
            label,
            str(len(results)),
            spread([r["hypervolume"] for r in results], "{:.3f}"),
            spread([r["within_half"] for r in results], "{:,}"),
            spread([r["within_one"] for r in results], "{:,}"),
            spread([r["stopped"] for r in results], "{:.0f}"),
            spread([r["failed"] for r in results], "{:.0f}"),
            spread([r["minutes"] for r in results], "{:.1f}")
            + f" ({statistics.mean(r['load'] for r in results):.1f})",
        )
    console.print(table)
    if args.ray_scaling:
        ray_scaling(base, console)


def ray_scaling(base: dict, console: Console) -> None:
    rates = {}
    for workers in (1, 2):
        settings = load_settings(
            **{**base, "trials": 8}, seed=0, backend="ray", workers=workers, study=f"ray{workers}"
        )
        start = time.monotonic()
        run_search(settings, console, resume=False)
        rates[workers] = 8 / ((time.monotonic() - start) / 3600)
        console.print(
            f"ray, {workers} worker(s): {rates[workers]:.0f} trials/hour "
            "(wall clock of the whole search, setup included)"
        )
    console.print(f"speed-up with 2 workers: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
