"""Compiled size and latency: the compressed TVM bundle against a dense TVM compile of the same
model, PyTorch eager, torch.compile and ONNX Runtime, at batch 1 and 64, on fixed threads.

    python benchmarks/compile.py [--threads 2] [--mlp-trials 480] [--cnn-trials 360] [--fresh]
                                 [--artifact reports/<study>/best.safetensors ...]

Each model goes through the product's own path (``autoshrink.compile.compile_artifact``):
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
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autoshrink.artifact import read_header
from autoshrink.baseline import load_baseline
from autoshrink.compile import compile_artifact
from autoshrink.compile.machine import cpu_model, cpu_peak
from autoshrink.plugins import load_registry

ENGINES = ("tvm_tuned", "tvm_dense", "torch_eager", "torch_compile", "onnxruntime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mlp-trials", type=int, default=480)
    parser.add_argument("--cnn-trials", type=int, default=360)
    parser.add_argument("--fresh", action="store_true", help="tune into a new database")
    parser.add_argument("--artifact", type=Path, action="append", default=[])
    parser.add_argument("--artifact-trials", type=int, default=360)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="keep the libraries here")
    args = parser.parse_args()

    console = Console(width=150)
    out = args.out or Path(tempfile.mkdtemp(prefix="autoshrink-compile-"))
    registry = load_registry()
    peak = cpu_peak(args.threads)
    load_before = os.getloadavg()
    results = {}
    jobs = []
    for name, trials in (
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
        )
        results[name] = {
            **result.latency,
            "bytes": path.stat().st_size,
            "wall_seconds": time.monotonic() - start,
        }
        console.print(f"{name}: done in {time.monotonic() - start:.0f} s", highlight=False)
    load_after = os.getloadavg()

    table = Table(title=f"Median latency (ms), {args.threads} threads, {cpu_model()}")
    for column in ("model", "artifact B", "bundle B", "batch", *ENGINES, "tuned vs dense",
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
                f"{latency['bundle_bytes']:,}",
                batch,
                *("-" if t is None else f"{t:.4f}" for t in times.values()),
                f"{dense / tuned:.2f}x" if tuned and dense else "-",
                "-" if gflops is None else f"{gflops:.1f}",
                "-" if gflops is None or not peak.gflops else f"{gflops / peak.gflops:.1%}",
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
            f"vs torch {accuracy.get('torch', 0):.4f}",
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
