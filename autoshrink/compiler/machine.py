"""What the machine is: the cores this process may use, the CPU model, its fp32 peak.

The peak turns latencies into GFLOP/s figures (benchmarks/compile.py); the model name
and the core count go into each compile's ``latency.json``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Peak", "available_cores", "cpu_model", "cpu_peak"]


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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx512f``, ``fma``, ...) as the OS reports them."""
    return set((_field(_cpuinfo(), "flags") or _field(_lscpu(), "Flags") or "").split())


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
    flags = cpu_flags()
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
