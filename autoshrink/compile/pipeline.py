"""Compile an artifact into a TVM library that runs without PyTorch, and time it.

The path: artifact -> decoded ``nn.Module`` -> :func:`densify` (hashed and pruned layers,
which gather or scatter a dense weight on every call, become plain ``nn.Linear`` /
``nn.Conv2d``; layers that compute fewer FLOPs than their dense equivalent, such as low-rank
factors, stay as they are) -> ``torch.export`` once per batch size -> Relax with the weights
baked in as constants -> MetaSchedule tuning against a per-target database kept in the cache
-> ``tvm.compile`` -> one shared library holding an entry function per batch size
(``main_b1``, ``main_b64``), which ``tvm.runtime.load_module`` + ``relax.VirtualMachine`` run
without torch. ``compiled.json`` beside it names the entries and their shapes, and
``latency.json`` holds the side-by-side timings (:mod:`autoshrink.latency`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import tvm
from rich.console import Console
from torch import nn
from tvm import relax

from autoshrink.artifact import read_artifact
from autoshrink.baseline import cache_dir
from autoshrink.compile.build import build_tuned, entry, fuse, to_relax
from autoshrink.compile.database import mark_checked, open_database
from autoshrink.compile.densify import RELATIVE_TOLERANCE, densify, fold_batchnorm
from autoshrink.compile.target import Target, load_tensor_intrinsics, resolve_target
from autoshrink.compile.timing import (
    available_cores,
    cpu_model,
    median_ms,
    model_flops,
    thread_count,
)
from autoshrink.compile.timing import torch_engines as time_torch
from autoshrink.compile.tuning import tune
from autoshrink.errors import AutoshrinkError, UsageError
from autoshrink.plan import compressible_layers

if TYPE_CHECKING:
    from autoshrink.plugins import Registry
    from autoshrink.study import SearchSetup, StudyFolder
    from autoshrink.tasks import Split, Task

__all__ = ["CompileError", "CompileResult", "compile_artifact", "compile_winners"]

DEFAULT_TRIALS = 256
LIBRARY = "model.so"
MANIFEST = "compiled.json"
LATENCY = "latency.json"


class CompileError(AutoshrinkError):
    """Compiling failed or the compiled model does not compute what the artifact does."""


@dataclass
class CompileResult:
    """Where the compiled files are and what was measured."""

    folder: Path
    library: Path
    latency: dict[str, Any]



# --- checks and timings ----------------------------------------------------------------------


def _run(vm: Any, batch: int, x: np.ndarray, device: Any) -> np.ndarray:
    # torch.export returns a tuple of outputs; the model's logits are its only element.
    return vm[entry(batch)](tvm.runtime.tensor(np.ascontiguousarray(x), device))[0].numpy()


def _max_error(vm: Any, model: nn.Module, shape: tuple[int, ...], batches, device) -> tuple:
    """Largest |compiled - PyTorch| over random inputs of every batch size, and the bound."""
    generator = torch.Generator().manual_seed(0)
    error, scale = 0.0, 1.0
    for batch in batches:
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            want = model(x).numpy()
        error = max(error, float(np.abs(_run(vm, batch, x.numpy(), device) - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return error, RELATIVE_TOLERANCE * scale


def _accuracy(vm, model: nn.Module, split: Split, task: Task, batch: int, device) -> dict:
    """The task metric on ``split`` through the library and through PyTorch."""
    from autoshrink.training import predict

    chunks = []
    x = split.x.numpy().astype(np.float32)
    for start in range(0, len(x), batch):
        part = x[start : start + batch]
        padded = np.zeros((batch, *part.shape[1:]), dtype=np.float32)
        padded[: len(part)] = part  # the library's batch size is fixed
        chunks.append(_run(vm, batch, padded, device)[: len(part)])
    compiled = torch.from_numpy(np.concatenate(chunks))
    with torch.no_grad():
        reference = predict(model, split.x)
    return {
        "torch": task.metric(reference, split.y),
        "tvm": task.metric(compiled, split.y),
        "argmax_agreement": float((compiled.argmax(1) == reference.argmax(1)).float().mean()),
        "examples": len(split.y),
    }


def _tvm_times(vm: Any, shape, batches, target: Target, repeats: int) -> dict[str, float]:
    times = {}
    device = target.device
    for batch in batches:
        x = tvm.runtime.tensor(np.zeros((batch, *shape), dtype=np.float32), device)
        function = vm[entry(batch)]
        sync = device.sync if target.kind == "cuda" else None  # kernels launch asynchronously
        times[str(batch)] = median_ms(functools.partial(function, x), repeats=repeats, sync=sync)
    return times


# --- the whole path --------------------------------------------------------------------------


def compile_artifact(
    path: Path,
    registry: Registry,
    *,
    target: str = "cpu",
    trials: int = DEFAULT_TRIALS,
    batch: int = 64,
    out: Path | None = None,
    threads: int | None = None,
    task: Task | None = None,
    test: Split | None = None,
    torch_compile: bool = True,
    prepack: bool = True,
    tuning_dir: Path | None = None,
    repeats: int = 7,
    console: Console | None = None,
) -> CompileResult:
    """Compile the artifact at ``path`` for ``target`` (cpu or cuda), tune it with up to
    ``trials`` measurements (0: use only what the tuning database holds), check its outputs
    against PyTorch (and its ``test`` accuracy when given), time every engine at batch 1 and
    ``batch``, and write ``model.so``, ``compiled.json`` and ``latency.json`` into ``out``
    (default: ``<artifact name>-compiled`` beside the artifact)."""
    if batch < 1:
        raise UsageError(f"`--batch` {batch}: must be at least 1")
    if trials < 0:
        raise UsageError(f"`--trials` {trials}: must be 0 or more")
    threads = threads or available_cores()
    if threads < 1:
        raise UsageError(f"`--threads` {threads}: must be at least 1")
    chosen = resolve_target(target, threads)  # first: a missing GPU fails before any work
    path = Path(path)
    artifact = read_artifact(path, registry, task)
    task = task or registry.tasks[artifact.header.task]
    out = Path(out) if out else path.with_name(f"{path.stem}-compiled")
    out.mkdir(parents=True, exist_ok=True)
    batches = sorted({1, batch})
    shape = tuple(task.input_shape)
    notes: list[str] = []
    templates = compressible_layers(task.build_model(artifact.header.width), registry)
    reference = artifact.model.eval()
    model = fold_batchnorm(densify(reference, task.example_input(1), templates, notes), notes)
    load_tensor_intrinsics(chosen.kind)
    with thread_count(threads):
        try:
            mod = to_relax(model, shape, batches)
        except Exception as exc:
            raise CompileError(f"{path}: the model cannot be exported to TVM: {exc}") from exc
        fused = fuse(mod, chosen, prepack)
        db_folder = tuning_dir or cache_dir() / "tuning" / chosen.key
        database = open_database(db_folder, console)
        tuning = tune(fused, chosen, database, trials, threads, out / "tuning-logs", console)
        mark_checked(db_folder)  # what tuning appended came from TVM itself
        library = out / LIBRARY
        build_tuned(fused, chosen, database, prepack).export_library(str(library))
        untuned = relax.VirtualMachine(tvm.compile(mod, target=chosen.tvm), chosen.device)
        # Everything below runs the file that ships, loaded as a user would load it.
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), chosen.device)
        error, tolerance = _max_error(vm, reference, shape, batches, chosen.device)
        if not error <= tolerance:
            raise CompileError(
                f"{path}: compiled outputs differ from PyTorch's by {error:.3g} "
                f"(tolerance {tolerance:.3g})"
            )
        accuracy = _accuracy(vm, reference, test, task, batch, chosen.device) if test else None
        inputs = {b: torch.randn(b, *shape) for b in batches}
        engines: dict[str, dict[str, float]] = {}
        if chosen.kind == "cpu":  # this project's torch is a CPU build: time it on the CPU
            engines, more = time_torch(model, inputs, compiled=torch_compile, repeats=repeats)
            notes.extend(more)
        engines["tvm_untuned"] = _tvm_times(untuned, shape, batches, chosen, repeats)
        engines["tvm_tuned"] = _tvm_times(vm, shape, batches, chosen, repeats)
    order = ("tvm_tuned", "tvm_untuned", "torch_eager", "torch_compile")
    latency = {
        "machine": cpu_model(),
        "threads": threads,
        "target": chosen.text,
        "batches": batches,
        "engines": {name: engines[name] for name in order if name in engines},
        "tuning": {**tuning, "database": chosen.key},
        "max_abs_error": error,
        "tolerance": tolerance,
        "accuracy": accuracy,
        "flops": {str(b): model_flops(model, torch.zeros(b, *shape)) for b in batches},
        "prepack": prepack,
        "notes": notes,
    }
    manifest = {
        "format": "autoshrink-compiled/1",
        "library": LIBRARY,
        "artifact": str(path),
        "task": task.name,
        "target": chosen.text,
        "tvm": tvm.__version__,
        "threads": threads,
        "entries": {
            entry(b): {"input": [b, *shape], "dtype": "float32"} for b in batches
        },
        "usage": "tvm.relax.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())"
        "[entry](tvm.runtime.tensor(x))[0]",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / LATENCY).write_text(json.dumps(latency, indent=2))
    return CompileResult(folder=out, library=library, latency=latency)


def compile_winners(
    folder: StudyFolder,
    summary: dict[str, Any],
    setup: SearchSetup,
    console: Console,
    *,
    front: bool = False,
) -> None:
    """After a search: compile the recommended model (``front``: every front member) into
    ``<study>/compiled/trial-NNNN/``, where ``summarize`` reads its ``latency.json``. The
    tuning database is shared, so members after the first mostly reuse its kernels. A failure
    is a warning: the search's results are already saved."""
    members = [
        m
        for m in summary["front"]
        if m.get("artifact") and (front or m["trial"] == summary["best"])
    ]
    for member in members:
        label = f"trial {member['trial']}" + (
            " (recommended)" if member["trial"] == summary["best"] else ""
        )
        try:
            result = compile_artifact(
                folder.root / member["artifact"],
                setup.registry,
                trials=setup.settings.tune_trials,
                out=folder.compiled(member["trial"]),
                task=setup.task,
                test=setup.data.test,
                console=console,
            )
        except AutoshrinkError as exc:
            console.print(f"[yellow]warning:[/] compiling {label} failed: {exc}")
            continue
        tuned = result.latency["engines"]["tvm_tuned"]
        console.print(
            f"compiled {label}: {result.library} ("
            + ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in tuned.items())
            + ")",
            highlight=False,
        )
