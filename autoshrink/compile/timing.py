"""Latency of one model on several engines, measured side by side in one process.

Every engine is timed by the same harness: a Python loop calling it on the same input, the
loop count calibrated so one repeat lasts at least ``min_repeat_s``, and the median over
repeats reported in milliseconds. Engines run one after the other (never interleaved), each
after its own warm-up, so one engine's spinning worker threads do not tax the next one's
measurement. The thread count is fixed for all of them: ``torch.set_num_threads`` for PyTorch
and ``TVM_NUM_THREADS`` (read when TVM's thread pool starts) for TVM.

Also here: what the machine is (CPU model, SIMD width, clock) and its theoretical peak, for
GFLOP/s figures.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "Peak",
    "available_cores",
    "cpu_model",
    "cpu_peak",
    "median_ms",
    "model_flops",
    "thread_count",
    "torch_engines",
]


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _lscpu() -> str:
    try:
        return subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _field(text: str, name: str) -> str | None:
    found = re.search(rf"^{re.escape(name)}\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else None


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo``, else ``platform``)."""
    return (
        _field(_cpuinfo(), "model name")
        or _field(_lscpu(), "Model name")
        or platform.processor()
        or platform.machine()
    )


@dataclass(frozen=True)
class Peak:
    """Theoretical fp32 peak: cores x clock x FLOPs per cycle of the widest FMA units."""

    cores: int
    ghz: float
    simd: str
    flops_per_cycle: int
    note: str = ""

    @property
    def gflops(self) -> float:
        return self.cores * self.ghz * self.flops_per_cycle

    def describe(self) -> str:
        text = (
            f"{self.cores} cores x {self.ghz:.2f} GHz x {self.flops_per_cycle} fp32 FLOP/cycle "
            f"({self.simd}) = {self.gflops:.0f} GFLOP/s"
        )
        return f"{text}; {self.note}" if self.note else text


def cpu_peak(cores: int) -> Peak:
    """The fp32 peak of ``cores`` cores of this CPU, from lscpu / ``/proc/cpuinfo``.

    FLOPs per cycle: two FMA units each doing width/32 multiply-adds (2 FLOPs): AVX-512 = 64,
    AVX2 with FMA = 32, AVX = 16, SSE = 8. AMD Zen 4 (family 25 with AVX-512) executes 512-bit
    instructions as two 256-bit halves, so its true peak is the AVX2 figure; that is noted.
    """
    info, lscpu = _cpuinfo(), _lscpu()
    flags = set((_field(info, "flags") or _field(lscpu, "Flags") or "").split())
    mhz = None
    for text, name in ((lscpu, "CPU max MHz"), (lscpu, "CPU MHz"), (info, "cpu MHz")):
        value = _field(text, name)
        if value:
            with contextlib.suppress(ValueError):
                mhz = float(value)
                break
    ghz = (mhz or 0.0) / 1000
    note = ""
    if "avx512f" in flags:
        simd, per_cycle = "AVX-512 FMA", 64
        vendor = _field(info, "vendor_id") or ""
        if vendor == "AuthenticAMD" and _field(info, "cpu family") == "25":
            per_cycle = 32
            note = "Zen 4 runs AVX-512 as 2 x 256-bit, so 32 FLOP/cycle (64 nominal)"
    elif "avx2" in flags and "fma" in flags:
        simd, per_cycle = "AVX2 FMA", 32
    elif "avx" in flags:
        simd, per_cycle = "AVX", 16
    else:
        simd, per_cycle = "SSE", 8
    return Peak(cores=cores, ghz=ghz, simd=simd, flops_per_cycle=per_cycle, note=note)


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


def median_ms(
    run: Callable[[], object],
    *,
    repeats: int = 7,
    warmup: int = 3,
    min_repeat_s: float = 0.05,
    sync: Callable[[], None] | None = None,
) -> float:
    """Median milliseconds of one call of ``run``: warm up, calibrate the calls per repeat so a
    repeat lasts ``min_repeat_s``, then take the median over ``repeats`` repeats (robust to
    the other processes that share this machine's cores)."""
    for _ in range(warmup):
        run()
    if sync:
        sync()

    def timed(number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            run()
        if sync:
            sync()
        return time.perf_counter() - start

    number = 1
    while (elapsed := timed(number)) < min_repeat_s and number < 1_000_000:
        number = max(2 * number, int(number * min_repeat_s / max(elapsed, 1e-9) * 1.2))
    samples = [timed(number) / number for _ in range(repeats)]
    return statistics.median(samples) * 1e3


def torch_engines(
    model: nn.Module,
    inputs: dict[int, torch.Tensor],
    *,
    compiled: bool = True,
    repeats: int = 7,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Median ms per batch of PyTorch eager and, with ``compiled``, ``torch.compile``
    (inductor, static shapes); returns the times and notes on what could not run."""
    engines: dict[str, dict[str, float]] = {"torch_eager": {}}
    notes: list[str] = []
    model = model.eval()
    with torch.inference_mode():
        for batch, x in inputs.items():
            run = functools.partial(model, x)
            engines["torch_eager"][str(batch)] = median_ms(run, repeats=repeats)
        if not compiled:
            return engines, notes
        try:
            fast = torch.compile(model, dynamic=False)
            times = {}
            for batch, x in inputs.items():
                fast(x)  # compiles for this shape; not part of the timing
                times[str(batch)] = median_ms(functools.partial(fast, x), repeats=repeats)
            engines["torch_compile"] = times
        except Exception as exc:  # inductor needs a C++ compiler; say why it is missing
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            notes.append(f"torch.compile failed ({first[:200]}); no fourth engine measured")
    return engines, notes
