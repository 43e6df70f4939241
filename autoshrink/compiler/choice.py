"""Per layer: the compressed kernel or the dense one, whichever runs faster, within bytes.

Each layer's kernels (compressed and dense, at every batch size) are put side by side in one
module, tuned against the shared database and timed on the target. A layer keeps its
compressed kernel unless the dense one is faster at every batch size *and* the float32
weights it adds still fit :data:`DENSE_ALLOWANCE` over the compressed bytes, the fastest
gains first, or the compressed kernel is over :data:`SLOWDOWN_LIMIT` times slower at some batch
size (then the bundle grows, and the layer's row says why).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from rich.console import Console
from tvm import relax

from autoshrink.compiler.build import build_tuned, fuse
from autoshrink.compiler.layer_kernel import LayerKernel
from autoshrink.compiler.target import Target
from autoshrink.compiler.tuning import tune

__all__ = ["DENSE_ALLOWANCE", "SLOWDOWN_LIMIT", "choose_kernels"]

#: Bytes of float32 weights the dense kernels chosen for speed may add to a bundle.
DENSE_ALLOWANCE = 512_000
#: A compressed kernel this many times slower than the dense one (at some batch size) is not
#: shipped whatever the bytes: a bundle that small but that slow serves no one.
SLOWDOWN_LIMIT = 10.0


def _function(layer: str, form: str, batch: int) -> str:
    return f"{re.sub(r'[^0-9A-Za-z]', '_', layer)}__{form}__b{batch}"


def _candidates(
    options: dict[str, list[LayerKernel]], inputs: dict[str, tuple[int, ...]], batches: list[int]
) -> Any:
    """A module with one function per layer, form and batch size, calling its kernel."""
    builder = relax.BlockBuilder()
    for layer, kernels in options.items():
        for kernel in kernels:
            for batch in batches:
                x = relax.Var("x", relax.TensorType((batch, *inputs[layer]), "float32"))
                with builder.function(_function(layer, kernel.form, batch), [x]):
                    with builder.dataflow():
                        y = builder.emit_output(kernel.emit(builder, x, batch))
                    builder.emit_func_output(y)
    return builder.get()


def choose_kernels(
    options: dict[str, list[LayerKernel]],
    inputs: dict[str, tuple[int, ...]],
    batches: list[int],
    target: Target,
    database: Any,
    trials: int,
    threads: int,
    log_dir: Path,
    console: Console | None,
) -> tuple[dict[str, LayerKernel], list[dict[str, Any]], dict[str, Any]]:
    """The kernel each layer keeps, one row per layer (forms, bytes, times, choice, why),
    and the tuning summary. ``options`` lists each layer's kernels, compressed first."""
    mod = fuse(_candidates(options, inputs, batches), target, prepack=False)
    tuning = tune(mod, target, database, trials, threads, log_dir, console)
    vm = relax.VirtualMachine(build_tuned(mod, target, database, prepack=False), target.device)
    rows, chosen = [], {}
    for layer, kernels in options.items():
        times: dict[str, dict[str, float]] = {}
        for kernel in kernels:
            times[kernel.form] = {}
            for batch in batches:
                x = tvm.runtime.tensor(
                    np.zeros((batch, *inputs[layer]), dtype=np.float32), target.device
                )
                timer = vm.time_evaluator(
                    _function(layer, kernel.form, batch), target.device,
                    number=10, repeat=5, min_repeat_ms=20,
                )
                times[kernel.form][str(batch)] = float(np.median(timer(x).results)) * 1e3
        chosen[layer] = kernels[0]
        rows.append({
            "layer": layer,
            "methods": kernels[0].methods,
            "bytes": {k.form: k.bytes for k in kernels},
            "ms": times,
            "form": kernels[0].form,
            "why": "compressed" if kernels[0].form == "compressed" else "no compressed kernel",
        })
    _spend_allowance(options, rows, chosen)
    return chosen, rows, tuning


def _spend_allowance(
    options: dict[str, list[LayerKernel]], rows: list[dict[str, Any]],
    chosen: dict[str, LayerKernel],
) -> None:
    """Swap in dense kernels that beat the compressed one at every batch size, biggest
    speed-up first, while the bytes they add fit :data:`DENSE_ALLOWANCE`."""
    faster = []
    for row in rows:
        ms = row["ms"]
        if set(ms) != {"compressed", "dense"}:
            continue
        ratios = [ms["compressed"][b] / ms["dense"][b] for b in ms["dense"]]
        if min(ratios) > 1.0:
            faster.append((math.prod(ratios) ** (1 / len(ratios)), row))
        else:
            row["why"] = "compressed kernel is as fast or faster"
    spent = 0
    for _, row in sorted(faster, key=lambda pair: -pair[0]):
        extra = row["bytes"]["dense"] - row["bytes"]["compressed"]
        worst = max(row["ms"]["compressed"][b] / row["ms"]["dense"][b] for b in row["ms"]["dense"])
        if worst > SLOWDOWN_LIMIT:
            row["form"] = "dense"
            row["why"] = f"compressed kernel is {worst:.0f}x slower than dense; dense despite bytes"
            chosen[row["layer"]] = next(k for k in options[row["layer"]] if k.form == "dense")
        elif spent + extra <= DENSE_ALLOWANCE:
            spent += extra
            row["form"], row["why"] = "dense", "dense kernel is faster and fits the allowance"
            chosen[row["layer"]] = next(
                k for k in options[row["layer"]] if k.form == "dense"
            )
        else:
            row["why"] = "dense kernel is faster but would add more than the allowance"
