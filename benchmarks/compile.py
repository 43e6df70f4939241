"""Compiled size and latency: the compressed TVM bundle against a dense TVM compile of the same
model, PyTorch eager, torch.compile and ONNX Runtime, at batch 1 and 64, on fixed threads.

    python benchmarks/compile.py [--threads 2] [--mlp-trials 480] [--cnn-trials 360] [--fresh]
                                 [--artifact reports/<study>/best.safetensors ...]
                                 [--plans] [--target cuda]

Each model goes through the product's own path (``autoshrink.compiler.compile_artifact``):
compressed kernels per layer (dense where faster within the allowance), MetaSchedule tuning,
the bundle, output check against PyTorch, test accuracy through the library, then every engine
timed in a child process of its own, in interleaved rounds (median of rounds). ``--fresh``
tunes into a new database instead of the shared one in the cache, so the tuning time is that of
a first run. Each ``--artifact`` (a search's recommended model, a front member) is compiled
after the baselines with ``--artifact-trials`` more measurements; kernels of shapes the
baselines already tuned are reused, not tuned again.
GFLOP/s use torch's FLOP count of one forward pass; the peak is cores x GHz x fp32 FLOPs per
cycle of the CPU's widest FMA.

The numbers are only as steady as the machine: on shared cores, other processes make the
multi-threaded engines wait for each other; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autoshrink.baseline import load_baseline
from autoshrink.compiler import compile_artifact
from autoshrink.compiler.machine import cpu_model, cpu_peak
from autoshrink.compiler.target import resolve_target
from autoshrink.errors import AutoshrinkError
from autoshrink.header import read_header
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.registry import load_registry
from autoshrink.trial import TrialBudget, run_trial

ENGINES = ("tvm_tuned", "tvm_dense", "torch_eager", "torch_compile", "onnxruntime")


def _layer(structure: str, structure_config: dict, value: str, value_config: dict) -> LayerPlan:
    return LayerPlan(
        structure=Choice(method=structure, config=structure_config),
        value=Choice(method=value, config=value_config),
    )


def _every(names: tuple[str, ...], layer: LayerPlan, encoding: Choice | None = None) -> Plan:
    return Plan(layers={name: layer for name in names}, encoding=encoding)


MLP = ("fc1", "fc2", "out")
KMEANS = "quantization"
#: The models of the compressed-compile benchmark: (label, task, plan). Each is built from the
#: task's cached baseline the way a search trial builds it (300 fine-tune steps).
PLANS = (
    ("mlp 8-bit k-means", "fashion-mnist-mlp",
     _every(MLP, _layer("dense", {}, KMEANS, {"bits": 8}))),
    ("mlp 4-bit k-means", "fashion-mnist-mlp",
     _every(MLP, _layer("dense", {}, KMEANS, {"bits": 4}))),
    ("mlp low-rank + uniform", "fashion-mnist-mlp", Plan(layers={
        "fc1": _layer("lowrank", {"rank": 0.06}, KMEANS, {"bits": 4, "mode": "uniform"}),
        "fc2": _layer("lowrank", {"rank": 0.06}, KMEANS, {"bits": 4, "mode": "uniform"}),
        "out": _layer("dense", {}, KMEANS, {"bits": 8, "mode": "uniform"}),
    })),
    ("mlp Deep Compression", "fashion-mnist-mlp",
     _every(MLP, _layer("pruning", {"threshold": 1.75}, KMEANS, {"bits": 5}),
            Choice(method="entropy", config={"codec": "huffman"}))),
    ("mlp hashed 1/16", "fashion-mnist-mlp",
     _every(MLP, _layer("hashing", {"ratio": 0.0625}, KMEANS, {"bits": 6}))),
    ("cnn mixed", "fashion-mnist-cnn", Plan(layers={
        "conv1": _layer("dense", {}, KMEANS, {"bits": 8}),
        "conv2": _layer("pruning", {"threshold": 1.0}, KMEANS, {"bits": 5}),
        "fc1": _layer("lowrank", {"rank": 0.1}, KMEANS, {"bits": 4, "mode": "uniform"}),
        "out": _layer("dense", {}, KMEANS, {"bits": 8}),
    })),
    # last, so that the artifacts of the rows above keep their file names
    ("mlp hashed 1/16, runs", "fashion-mnist-mlp",
     _every(MLP, _layer("hashing", {"ratio": 0.0625, "run": 16}, KMEANS, {"bits": 6}))),
)


def _raw_bytes(path: Path) -> int:
    """The artifact's bytes with entropy coding undone (what a bundle may hold at most)."""
    import numpy as np

    header, blobs = read_header(path)
    coded = sum(len(blob) for blob in blobs.values())
    raw = sum(
        int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        for s in header.streams.values()
    )
    return path.stat().st_size - coded + raw


def _plan_jobs(registry, data_dir: Path | None, folder: Path, trials: int, console) -> list:
    """Artifacts of :data:`PLANS`, trained as search trials are (reused when present)."""
    jobs, loaded = [], {}
    folder.mkdir(parents=True, exist_ok=True)
    for number, (label, name, plan) in enumerate(PLANS):
        task = registry.tasks[name]
        if name not in loaded:
            data = task.load_data(data_dir)
            loaded[name] = (data, load_baseline(task, data, registry))
        data, baseline = loaded[name]
        path = folder / f"plan-{number}.safetensors"
        if not path.exists():
            with console.status(f"training {label} (a search trial's fine-tune)"):
                run_trial(plan, task=task, data=data, baseline=baseline, registry=registry,
                          artifact=path, budget=TrialBudget(seconds=1800), seed=0)
        jobs.append((label, path, task, data, trials))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mlp-trials", type=int, default=480)
    parser.add_argument("--cnn-trials", type=int, default=360)
    parser.add_argument("--fresh", action="store_true", help="tune into a new database")
    parser.add_argument("--plans", action="store_true",
                        help="compile the compressed plans of PLANS instead of the baselines")
    parser.add_argument("--plan-trials", type=int, default=96)
    parser.add_argument("--plan", type=int, action="append", default=[],
                        help="with --plans: only these rows of PLANS (0-based)")
    parser.add_argument("--artifact", type=Path, action="append", default=[])
    parser.add_argument("--artifact-trials", type=int, default=360)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="keep the libraries here")
    parser.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: GPU kernels, timed against the dense GPU compile only "
                        "(no PyTorch or ONNX Runtime peers: this project's torch is a CPU build)")
    args = parser.parse_args()
    try:
        resolve_target(args.target, args.threads)  # a missing GPU: one line, before any work
    except AutoshrinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    console = Console(width=150)
    out = args.out or Path(tempfile.mkdtemp(prefix="autoshrink-compile-"))
    registry = load_registry()
    peak = cpu_peak(args.threads)
    load_before = os.getloadavg()
    results = {}
    jobs = []
    if args.plans:
        jobs = _plan_jobs(registry, args.data_dir, out / "plans", args.plan_trials, console)
        jobs = [job for i, job in enumerate(jobs) if not args.plan or i in args.plan]
    for name, trials in () if args.plans else (
        ("fashion-mnist-mlp", args.mlp_trials),
        ("fashion-mnist-cnn", args.cnn_trials),
    ):
        task = registry.tasks[name]
        data = task.load_data(args.data_dir)
        with console.status(f"baseline of {name} (trained once, then cached)"):
            baseline = load_baseline(task, data, registry)
        jobs.append((f"{name} baseline", baseline.path, task, data, trials))
    for path in args.artifact:
        task = registry.tasks[read_header(path)[0].task]
        label = f"{task.name} {path.parent.name}/{path.stem}"
        jobs.append((label, path, task, task.load_data(args.data_dir), args.artifact_trials))
    for number, (name, path, task, data, trials) in enumerate(jobs):
        start = time.monotonic()
        result = compile_artifact(
            path,
            registry,
            trials=trials,
            batch=args.batch,
            out=out / f"model-{number}",
            threads=args.threads,
            task=task,
            test=data.test,
            torch_compile=not args.no_torch_compile,
            tuning_dir=out / "tuning" if args.fresh else None,
            console=console,
            target=args.target,
        )
        results[name] = {
            **result.latency,
            "bytes": path.stat().st_size,
            "raw_bytes": _raw_bytes(path),
            "wall_seconds": time.monotonic() - start,
        }
        console.print(f"{name}: done in {time.monotonic() - start:.0f} s", highlight=False)
    load_after = os.getloadavg()

    table = Table(title=f"Median latency (ms), {args.threads} threads, {cpu_model()}")
    for column in ("model", "artifact B", "uncoded B", "bundle B", "batch", *ENGINES,
                   "tuned vs dense",
                   "tuned GFLOP/s", "of peak"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, latency in results.items():
        for batch in (str(b) for b in latency["batches"]):
            times = {e: latency["engines"].get(e, {}).get(batch) for e in ENGINES}
            tuned, dense = times["tvm_tuned"], times["tvm_dense"]
            gflops = latency["flops"][batch] / (tuned * 1e-3) / 1e9 if tuned else None
            table.add_row(
                name,
                f"{latency['artifact_bytes']:,}",
                f"{latency['raw_bytes']:,}",
                f"{latency['bundle_bytes']:,}",
                batch,
                *("-" if t is None else f"{t:.4f}" for t in times.values()),
                f"{dense / tuned:.2f}x" if tuned and dense else "-",
                "-" if gflops is None else f"{gflops:.1f}",
                "-" if gflops is None or not peak.gflops or args.target != "cpu"
                else f"{gflops / peak.gflops:.1%}",
            )
    console.print(table)
    for name, latency in results.items():
        parts, accuracy = latency["tuning"], latency["accuracy"] or {}
        spent = [parts[p] for p in ("layers", "model", "dense")]
        console.print(
            f"{name} ({latency['bytes']:,} bytes): tuning {sum(t['trials'] for t in spent)} "
            f"trials over {sum(t['tasks'] for t in spent)} kernels in "
            f"{sum(t['seconds'] for t in spent):.0f} s "
            f"({sum(t['reused'] for t in spent)} kernels reused from the database); "
            f"whole compile {latency['wall_seconds']:.0f} s; max |TVM - torch| "
            f"{latency['max_abs_error']:.2g}; test accuracy TVM {accuracy.get('tvm', 0):.4f} "
            f"vs torch {accuracy.get('torch', 0):.4f}; layers: "
            + ", ".join(f"{r['layer']} {r['form']} ({r['methods']})" for r in latency["layers"]),
            highlight=False,
        )
    console.print(f"peak: {peak.describe()}", highlight=False)
    console.print(
        f"target: {next(iter(results.values()))['target']}; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores: above ~0.5 means others "
        f"were running); libraries and latency.json files in {out}",
        highlight=False,
    )
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
