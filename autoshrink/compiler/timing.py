"""Latency of one model on several engines, each in a process of its own, rounds interleaved.

:func:`measure` starts one long-lived child per engine (:mod:`.timing_child`, run by path so
it imports only its engine's library). Each child sets its thread count before it loads
anything (``torch.set_num_threads``, ``TVM_NUM_THREADS``, ``OMP_NUM_THREADS``, ONNX Runtime's
session options), loads its engine, warms each batch up, and calibrates the calls per sample
so one sample lasts ``min_repeat_s``. The parent then runs ``rounds`` rounds: each round asks
every engine in turn, for every batch, for one sample, the order rotating from round to round.
The median over rounds is reported, with the quartiles and extremes beside it.

Why processes: TVM's pool pins its workers one per core and, after every parallel job, keeps
them spinning on ``sched_yield`` for up to 300,000 calls (``TVM_THREAD_POOL_SPIN_COUNT``),
a whole core for 80-400 ms on a 2-core machine. PyTorch eager called in that window, in the
same process, took 13-56 ms per call instead of 2-4 ms (none of it with the spin count set to
0); the old in-process harness, timing eager right after TVM had run, reported 3.03 ms where a
process of its own gives 1.59 ms. A spinning thread takes its core from other processes too,
so separate processes are not enough: each child answers a sample only once its own worker
threads are quiet (:func:`.timing_child.settle`), and the parent pauses ``PAUSE_S`` more
before it asks the next engine. Why interleaved: a slow spell of the machine (another tenant,
a frequency change) then costs every engine a round, not one engine its whole measurement.

:func:`prepare_peers` writes what PyTorch and ONNX Runtime need to run ``model``;
:func:`thread_count` limits PyTorch and TVM in this process (tuning and checks).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoshrink.compiler.timing_child import (
    Child,
    ChildFailed,
    Engine,
    OnnxEngine,
    TorchEngine,
    TvmEngine,
    spec,
)
from autoshrink.errors import first_line

__all__ = [
    "Engine",
    "OnnxEngine",
    "Timings",
    "TorchEngine",
    "TvmEngine",
    "measure",
    "model_flops",
    "prepare_peers",
    "thread_count",
]

ONNX_MISSING = "onnxruntime not measured: it is not installed (pip install 'autoshrink[onnx]')"
PAUSE_S = 0.02  # between two engines' samples: the previous one's spinning threads go quiet
LOAD_TIMEOUT_S = 1800.0  # loading, warm-up (torch.compile compiles then) and calibration
SEED = 0


def model_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``example`` (a multiply-add counts 2), as
    counted by torch's FlopCounterMode (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """PyTorch and TVM limited to ``threads`` threads for the duration (TVM reads
    ``TVM_NUM_THREADS`` when its pool starts, and so do the tuning workers it spawns)."""
    torch_before = torch.get_num_threads()
    env_before = os.environ.get("TVM_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        if env_before is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = env_before


def _first_line(exc: BaseException) -> str:
    return first_line(exc)[:200]


def prepare_peers(
    model: nn.Module, shape: tuple[int, ...], batches: list[int], folder: Path
) -> tuple[dict[str, Engine], list[str]]:
    """Write what PyTorch and ONNX Runtime need to run ``model`` on inputs ``(B, *shape)`` into
    ``folder``, and return their engines by name (``torch_eager``, ``torch_compile``,
    ``onnxruntime``) with notes on the peers left out and why.

    PyTorch gets one ``torch.export`` program with a dynamic batch dimension
    (``program.pt2``; ``torch.compile`` specializes it per batch size in the child); ONNX
    Runtime gets the TorchScript-based ONNX export (``model.onnx``), batch axis dynamic too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(max(2, *batches), *shape)  # a batch of 1 would be specialized
    peers: dict[str, Engine] = {}
    notes: list[str] = []
    with warnings.catch_warnings():  # export's deprecation and tracer chatter
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, folder / "program.pt2")
            peers["torch_eager"] = TorchEngine(folder / "program.pt2", compiled=False)
            peers["torch_compile"] = TorchEngine(folder / "program.pt2", compiled=True)
        except Exception as exc:
            notes.append(f"torch_eager and torch_compile not measured: {_first_line(exc)}")
        try:
            import onnx  # noqa: F401  (the exporter writes with it)
            import onnxruntime  # noqa: F401
        except ImportError:
            notes.append(ONNX_MISSING)
            return peers, notes
        try:
            torch.onnx.export(
                model,
                (example,),
                str(folder / "model.onnx"),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
            peers["onnxruntime"] = OnnxEngine(folder / "model.onnx")
        except Exception as exc:
            notes.append(f"onnxruntime not measured: the ONNX export failed: {_first_line(exc)}")
    return peers, notes


@dataclass
class Timings:
    """What :func:`measure` found: median ms per engine and batch (``engines[name][str(B)]``,
    the shape the reports read), the quartiles and extremes over rounds beside it, the number
    of rounds, and notes on the engines that were dropped."""

    engines: dict[str, dict[str, float]] = field(default_factory=dict)
    spread: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rounds: int = 0
    notes: list[str] = field(default_factory=list)


def _spread(samples: list[float]) -> dict[str, float]:
    if len(samples) == 1:
        return dict.fromkeys(("min", "q1", "q3", "max"), samples[0])
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")  # q1 <= median <= q3
    return {"min": min(samples), "q1": q1, "q3": q3, "max": max(samples)}


def measure(
    engines: dict[str, Engine],
    shape: tuple[int, ...],
    batches: list[int],
    threads: int,
    *,
    rounds: int = 7,
    min_repeat_s: float = 0.05,
) -> Timings:
    """Median ms per call of each engine at each batch size, on inputs ``(B, *shape)`` (fixed,
    seeded float32 normals, the same for every engine), each engine in its own child process
    limited to ``threads`` threads, over ``rounds`` interleaved rounds (see the module's
    docstring). An engine whose child fails to start, load or run is dropped with a note
    naming it and why; the others go on. The children end before this returns."""
    if rounds < 1:
        raise ValueError(f"rounds {rounds}: must be at least 1")
    timings = Timings(rounds=rounds)
    samples = {name: {str(b): [] for b in batches} for name in engines}
    setup = {"shape": list(shape), "batches": list(batches), "threads": threads, "seed": SEED}
    children: dict[str, Child] = {}
    expected: dict[str, float] = {}  # seconds the longest sample of each engine lasted

    def step(name: str, request: dict[str, Any] | None, timeout: float) -> dict[str, Any] | None:
        try:
            return children[name].ask(request, timeout)
        except (ChildFailed, OSError, ValueError) as exc:
            timings.notes.append(f"{name} not measured: {exc}")
            children.pop(name).close()
            return None

    try:
        for name, engine in engines.items():  # all load at once: loading is not timed
            try:
                children[name] = Child({**setup, "engine": spec(engine)}, threads)
            except (ChildFailed, OSError) as exc:
                timings.notes.append(f"{name} not measured: {exc}")
        for name in list(children):
            step(name, None, LOAD_TIMEOUT_S)
        for name in list(children):  # one at a time, the others idle
            found = step(name, {"calibrate": min_repeat_s}, LOAD_TIMEOUT_S)
            if found:
                expected[name] = max(found["seconds"].values())
            time.sleep(PAUSE_S)
        for turn in range(rounds):
            for batch in batches:
                order = list(children)  # rotated: no engine always goes first
                shift = turn % len(order) if order else 0
                for name in order[shift:] + order[:shift]:
                    answer = step(name, {"sample": batch}, max(60.0, 20 * expected[name]))
                    if answer:
                        samples[name][str(batch)].append(float(answer["ms"]))
                    time.sleep(PAUSE_S)
    finally:
        for child in children.values():  # all exit at once; then each is waited for
            child.stop()
        for child in children.values():
            child.close()
    for name in children:  # those that answered every request
        timings.engines[name] = {b: statistics.median(s) for b, s in samples[name].items()}
        timings.spread[name] = {b: _spread(s) for b, s in samples[name].items()}
    return timings
