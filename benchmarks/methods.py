"""Each compression method alone at three settings, the pruning schedules side by side, and
a Deep-Compression-style plan.

    python benchmarks/methods.py [--task fashion-mnist-mlp] [--steps 300] [--dc-steps 2000]
    python benchmarks/methods.py --only-schedules --steps 300

Every row goes through the product's own path: plan -> compressed model -> fine-tune ->
artifact file on disk -> read back -> test accuracy of the reloaded model. Bytes are the
artifact file's size; the ratio is against the baseline's float32 artifact file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autoshrink.artifact import read_artifact
from autoshrink.baseline import load_baseline
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers
from autoshrink.registry import load_registry
from autoshrink.training import evaluate
from autoshrink.trial import TrialBudget, run_trial


def every_layer(
    layers: list[str], structure: Choice | None = None, value: Choice | None = None, **plan: Choice
) -> Plan:
    layer = LayerPlan(
        structure=structure or Choice(method="dense"), value=value or Choice(method="float")
    )
    return Plan(layers={name: layer for name in layers}, **plan)


def rows(layers: list[str]) -> list[tuple[str, str, Plan]]:
    out: list[tuple[str, str, Plan]] = []
    for ratio in (1 / 8, 1 / 32, 1 / 64):
        out.append(
            (
                "hashing",
                f"ratio 1/{round(1 / ratio)}",
                every_layer(layers, Choice(method="hashing", config={"ratio": ratio})),
            )
        )
    for rank in (0.25, 0.1, 0.04):
        out.append(
            (
                "lowrank",
                f"rank {rank:g}",
                every_layer(layers, Choice(method="lowrank", config={"rank": rank})),
            )
        )
    for threshold in (0.5, 1.0, 2.0):
        out.append(
            (
                "pruning",
                f"threshold {threshold:g} std",
                every_layer(layers, Choice(method="pruning", config={"threshold": threshold})),
            )
        )
    for bits in (8, 4, 2):
        out.append(
            (
                "quantization",
                f"k-means {bits} bits",
                every_layer(layers, value=Choice(method="quantization", config={"bits": bits})),
            )
        )
    out.append(
        (
            "quantization",
            "uniform 1 bit (binary)",
            every_layer(
                layers, value=Choice(method="quantization", config={"bits": 1, "mode": "uniform"})
            ),
        )
    )
    out.append(
        ("float", "float16", every_layer(layers, value=Choice(method="float", config={"bits": 16})))
    )
    for width in (0.5, 0.25, 0.1):
        out.append(
            (
                "distillation",
                f"width {width:g}",
                every_layer(layers, model=Choice(method="distillation", config={"width": width})),
            )
        )
    out.append(
        (
            "entropy",
            "huffman on float32",
            every_layer(layers, encoding=Choice(method="entropy", config={"codec": "huffman"})),
        )
    )
    return out


def schedules(layers: list[str]) -> list[tuple[str, str, Plan]]:
    """One-shot, iterative and gradual pruning to the same sparsity on every layer."""
    out = []
    for sparsity in (0.95, 0.98):
        for schedule in ("one-shot", "iterative", "gradual"):
            config = {"target": "sparsity", "sparsity": sparsity, "schedule": schedule}
            plan = every_layer(layers, Choice(method="pruning", config=config))
            out.append(("pruning", f"{schedule} to sparsity {sparsity:g}", plan))
    return out


def deep_compression(layers: list[str], threshold: float, bits: int, last: float) -> Plan:
    """Prune + trained k-means + Huffman on every layer; the small output layer is pruned
    less (threshold ``last``), as Han et al. kept the last layer of LeNet-300-100 denser."""
    plan = {
        name: LayerPlan(
            structure=Choice(
                method="pruning", config={"threshold": last if name == layers[-1] else threshold}
            ),
            value=Choice(method="quantization", config={"bits": bits, "mode": "kmeans"}),
        )
        for name in layers
    }
    return Plan(layers=plan, encoding=Choice(method="entropy", config={"codec": "huffman"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-mlp")
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps per method row")
    parser.add_argument("--dc-steps", type=int, default=2000, help="fine-tune steps, DC plan")
    parser.add_argument("--only-dc", action="store_true", help="only the Deep Compression rows")
    parser.add_argument(
        "--only-schedules", action="store_true", help="only the pruning-schedule rows"
    )
    args = parser.parse_args()
    console = Console(width=150)  # tables stay whole when the output goes to a file
    registry = load_registry()
    task = registry.tasks[args.task]
    data = task.load_data(None)
    baseline = load_baseline(task, data, registry)
    layers = list(compressible_layers(task.build_model(1.0), registry))
    table = Table(
        title=f"{task.name}: baseline {baseline.bytes:,} B, "
        f"val {baseline.val_accuracy:.2%}, test {baseline.test_accuracy:.2%}"
    )
    for column in (
        "method",
        "setting",
        "bytes",
        "ratio",
        "val acc",
        "test acc",
        "Δ test",
        "fine-tune s",
    ):
        table.add_column(column, justify="right" if column not in ("method", "setting") else "left")
    if args.only_schedules:
        plans = [(m, s, p, args.steps) for m, s, p in schedules(layers)]
    elif args.only_dc:
        plans = []
    else:
        plans = [(m, s, p, args.steps) for m, s, p in rows(layers) + schedules(layers)]
    for threshold, bits, last in ((1.75, 5, 1.75), (1.75, 5, 0.75), (1.9, 5, 0.75), (2.0, 4, 1.0)):
        if args.only_schedules:
            break
        setting = f"prune {threshold:g} std (last {last:g}) + k-means {bits} b + huffman"
        plans.append(
            (
                "deep compression",
                setting,
                deep_compression(layers, threshold, bits, last),
                args.dc_steps,
            )
        )
    with tempfile.TemporaryDirectory() as folder:
        for number, (method, setting, plan, steps) in enumerate(plans):
            path = Path(folder) / f"{number}.safetensors"
            start = time.monotonic()
            outcome = run_trial(
                plan,
                task=task,
                data=data,
                baseline=baseline,
                registry=registry,
                artifact=path,
                budget=TrialBudget(finetune_steps=steps, distill_steps=3 * steps, seconds=3600),
                seed=0,
            )
            seconds = time.monotonic() - start
            reloaded = read_artifact(path, registry, task)
            test = evaluate(reloaded.model, data.test, task.metric)
            row = (
                method,
                setting,
                f"{outcome.bytes:,}",
                f"{baseline.bytes / outcome.bytes:.1f}x",
                f"{outcome.val_accuracy:.2%}",
                f"{test:.2%}",
                f"{(test - baseline.test_accuracy) * 100:+.2f}",
                f"{seconds:.1f}",
            )
            table.add_row(*row)
            console.print(" | ".join(row), highlight=False)
    console.print(table)


if __name__ == "__main__":
    main()
