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

import copy
import json
import shutil
import tempfile
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
from autoshrink.compiler.build import build_tuned, entry, fuse, to_relax
from autoshrink.compiler.choice import choose_kernels
from autoshrink.compiler.database import mark_checked, open_database
from autoshrink.compiler.densify import (
    RELATIVE_TOLERANCE,
    densify,
    fold_batchnorm,
    layer_shapes,
)
from autoshrink.compiler.export import KernelCall, to_relax_lowered
from autoshrink.compiler.fusion import fuse_epilogues
from autoshrink.compiler.layer_kernel import dense_kernel
from autoshrink.compiler.lowering import compressed_kernels
from autoshrink.compiler.machine import available_cores, cpu_flags, cpu_model
from autoshrink.compiler.target import Target, load_tensor_intrinsics, resolve_target
from autoshrink.compiler.timing import TvmEngine, measure, model_flops, prepare_peers, thread_count
from autoshrink.compiler.tuning import tune
from autoshrink.compress import replace_module
from autoshrink.errors import AutoshrinkError, CompileError, UsageError
from autoshrink.files import file_digest
from autoshrink.header import read_header
from autoshrink.plan import compressible_layers

if TYPE_CHECKING:
    from autoshrink.registry import Registry
    from autoshrink.studies.folder import StudyFolder
    from autoshrink.studies.setup import SearchSetup
    from autoshrink.tasks import Data, Task

__all__ = ["CompileError", "CompileResult", "compile_artifact", "compile_winners"]

DEFAULT_TRIALS = 256
LIBRARY = "model.so"
MANIFEST = "compiled.json"
LATENCY = "latency.json"


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


def _accuracy(vm, model: nn.Module, split: Data, task: Task, batch: int, device) -> dict:
    """The task metric on ``split`` through the library and through PyTorch."""
    from autoshrink.training import outputs

    chunks = []
    for x, _ in split.ordered(batch):
        part = x.numpy().astype(np.float32)
        padded = np.zeros((batch, *part.shape[1:]), dtype=np.float32)
        padded[: len(part)] = part  # the library's batch size is fixed
        chunks.append(_run(vm, batch, padded, device)[: len(part)])
    compiled = torch.from_numpy(np.concatenate(chunks))
    reference, targets = outputs(model, split)
    return {
        "torch": task.metric(reference, targets),
        "tvm": task.metric(compiled, targets),
        "argmax_agreement": float((compiled.argmax(1) == reference.argmax(1)).float().mean()),
        "examples": len(targets),
    }


def _layer_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> tuple[dict, dict]:
    """Input and output shapes (without the batch) of the named layers on ``example``."""
    shapes = layer_shapes(model, names, example)
    return (
        {n: tuple(i[1:]) for n, (i, _) in shapes.items()},
        {n: tuple(o[1:]) for n, (_, o) in shapes.items()},
    )


def _bundle_bytes(folder: Path) -> int:
    """Bytes of everything a user ships: the folder's files minus JSON and logs."""
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and p.suffix not in (".json", ".log")
    )


def _compile_dense(
    model: nn.Module, shape, batches, chosen: Target, database, trials, threads, folder, console
) -> tuple[Path, dict[str, Any]]:
    """The ``tvm_dense`` peer: the densified model with its weights as packed constants,
    tuned with the same budget, into ``folder/dense.so``."""
    fused = fuse(to_relax(model, shape, batches), chosen, True)
    tuning = tune(fused, chosen, database, trials, threads, folder / "tuning-logs", console)
    library = folder / "dense.so"
    build_tuned(fused, chosen, database, True).export_library(str(library))
    return library, tuning


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
    test: Data | None = None,
    torch_compile: bool = True,
    tuning_dir: Path | None = None,
    rounds: int = 7,
    console: Console | None = None,
) -> CompileResult:
    """Compile the artifact at ``path`` for ``target`` (cpu or cuda) into a bundle folder
    ``out`` (default ``<artifact name>-compiled`` beside it): ``model.so`` with every layer's
    weights in their stored form, read by kernels that decode as they compute (dense only
    where a layer has no compressed kernel, or where the dense one is faster within
    :data:`~autoshrink.compiler.choice.DENSE_ALLOWANCE`), plus ``compiled.json`` and
    ``latency.json``. ``trials`` tuning measurements go to the bundle and as many to the
    ``tvm_dense`` peer (0: use only what the tuning database holds). Outputs are checked
    against PyTorch (and ``test`` accuracy when given); every engine is timed at batch 1 and
    ``batch``, each in its own process."""
    if batch < 1:
        raise UsageError(f"`--batch` {batch}: must be at least 1")
    if trials < 0:
        raise UsageError(f"`--trials` {trials}: must be 0 or more")
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise UsageError(f"`--threads` {threads}: must be at least 1 (default: all cores)")
    chosen = resolve_target(target, threads)  # first: a missing GPU fails before any work
    path = Path(path)
    artifact = read_artifact(path, registry, task)
    header, blobs = read_header(path)
    task = task or registry.tasks[artifact.header.task]
    for name, module in task.build_model(artifact.header.width).named_modules():
        if isinstance(module, nn.Embedding):  # token-id inputs; the entries take float32
            raise CompileError(f"{path}: layer `{name}` is an Embedding, which `compile` does "
                               "not support yet; load the artifact with autoshrink.load")
    out = Path(out) if out else path.with_name(f"{path.stem}-compiled")
    out.mkdir(parents=True, exist_ok=True)
    batches = sorted({1, batch})
    shape = tuple(task.input_shape)
    notes: list[str] = []
    templates = compressible_layers(task.build_model(artifact.header.width), registry)
    reference = artifact.model.eval()
    dense = densify(reference, task.example_input(1), templates, notes, keep_cheaper=False)
    inputs, outputs = _layer_inputs(reference, list(templates), task.example_input(1))
    compressed = compressed_kernels(
        header, blobs, registry, templates, notes,
        table_lookup=chosen.kind == "cpu" and "avx512f" in cpu_flags(),
        vbmi=chosen.kind == "cpu" and "avx512vbmi" in cpu_flags(),
        inputs=inputs,
    )
    options = {}
    for name in templates:
        forms = [k for k in (compressed.get(name), dense_kernel(name, dense.get_submodule(name)))
                 if k is not None]
        if forms and name in inputs:
            options[name] = forms
    load_tensor_intrinsics(chosen.kind)
    db_folder = tuning_dir or cache_dir() / "tuning" / chosen.key
    database = open_database(db_folder, console)
    scratch = Path(tempfile.mkdtemp(prefix="autoshrink-compile-"))
    try:
        with thread_count(threads):
            kernels, layers, layer_tuning = choose_kernels(
                options, inputs, batches, chosen, database, trials, threads,
                out / "tuning-logs", console,
            )
            stubbed = copy.deepcopy(reference)
            for name, kernel in kernels.items():
                replace_module(stubbed, name, KernelCall(kernel, outputs[name]))
            try:
                fuse_epilogues(stubbed, kernels, outputs, shape, notes)
                mod = to_relax_lowered(stubbed, shape, batches)
            except Exception as exc:
                raise CompileError(f"{path}: the model cannot be exported to TVM: {exc}") from exc
            fused = fuse(mod, chosen, False)
            tuning = tune(fused, chosen, database, trials, threads, out / "tuning-logs", console)
            library = out / LIBRARY
            build_tuned(fused, chosen, database, False, notes).export_library(str(library))
            peer_model = fold_batchnorm(
                densify(reference, task.example_input(1), templates), notes
            )
            dense_library, dense_tuning = _compile_dense(
                peer_model, shape, batches, chosen, database, trials, threads, scratch, console
            )
            mark_checked(db_folder)  # what tuning appended came from TVM itself
            # Everything below runs the file that ships, loaded as a user would load it.
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), chosen.device)
            error, tolerance = _max_error(vm, reference, shape, batches, chosen.device)
            if not error <= tolerance:  # a tuned schedule went wrong: ship the plain build
                notes.append(f"tuned build differed from PyTorch by {error:.3g}; "
                             "shipped without tuned schedules")
                tvm.compile(fused, target=chosen.tvm).export_library(str(library))
                vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), chosen.device)
                error, tolerance = _max_error(vm, reference, shape, batches, chosen.device)
            if not error <= tolerance:
                raise CompileError(
                    f"{path}: compiled outputs differ from PyTorch's by {error:.3g} "
                    f"(tolerance {tolerance:.3g})"
                )
            accuracy = _accuracy(vm, reference, test, task, batch, chosen.device) if test else None
            engines = {"tvm_tuned": TvmEngine(library, chosen.kind),
                       "tvm_dense": TvmEngine(dense_library, chosen.kind)}
            if chosen.kind == "cpu":  # this project's torch is a CPU build: peers on the CPU
                peers, more = prepare_peers(peer_model, shape, batches, scratch)
                if not torch_compile:
                    peers.pop("torch_compile", None)
                engines.update(peers)
                notes.extend(more)
            timings = measure(engines, shape, batches, threads, rounds=rounds)
            notes.extend(timings.notes)
            dense_bytes = dense_library.stat().st_size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    order = ("tvm_tuned", "tvm_dense", "torch_eager", "torch_compile", "onnxruntime")
    bundle = _bundle_bytes(out)
    latency = {
        "machine": cpu_model(),
        "threads": threads,
        "target": chosen.text,
        "batches": batches,
        "engines": {n: timings.engines[n] for n in order if n in timings.engines},
        "spread": {n: timings.spread[n] for n in order if n in timings.spread},
        "rounds": timings.rounds,
        "artifact_bytes": artifact.bytes,
        "artifact_sha256": file_digest(path),
        "bundle_bytes": bundle,
        "dense_bytes": dense_bytes,
        "layers": layers,
        "tuning": {
            "layers": layer_tuning, "model": tuning, "dense": dense_tuning,
            "database": chosen.key,
        },
        "max_abs_error": error,
        "tolerance": tolerance,
        "accuracy": accuracy,
        "flops": {str(b): model_flops(peer_model, torch.zeros(b, *shape)) for b in batches},
        "notes": notes,
    }
    manifest = {
        "format": "autoshrink-compiled/2",
        "library": LIBRARY,
        "artifact": str(path),
        "task": task.name,
        "target": chosen.text,
        "tvm": tvm.__version__,
        "threads": threads,
        "bundle_bytes": bundle,
        "layers": {row["layer"]: {"form": row["form"], "methods": row["methods"]}
                   for row in layers},
        "entries": {entry(b): {"input": [b, *shape], "dtype": "float32"} for b in batches},
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
    ``<study>/compiled/trial-NNNN/``, where ``collect`` reads its ``latency.json``. The
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
                trials=setup.options.tune_trials,
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
