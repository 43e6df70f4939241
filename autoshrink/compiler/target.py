"""TVM targets: this host's CPU or GPU 0, with the key of their tuning database, and the
tensor intrinsics their schedules may use."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import tvm

from autoshrink.errors import UsageError

__all__ = ["Target", "load_tensor_intrinsics", "resolve_target"]

@dataclass(frozen=True)
class Target:
    """A TVM target with the device it runs on and the key of its tuning database."""

    kind: str  # "cpu" or "cuda"
    tvm: Any  # tvm.target.Target
    key: str
    text: str  # "llvm -mcpu=znver4 -num-cores=2"

    @property
    def device(self) -> Any:
        return tvm.cuda(0) if self.kind == "cuda" else tvm.cpu(0)


def resolve_target(kind: str, threads: int) -> Target:
    """The TVM target for ``cpu`` (this host's LLVM CPU name) or ``cuda`` (GPU 0's arch)."""
    version = tvm.__version__.split("+")[0]
    if kind == "cpu":
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu() or "generic"
        target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": threads})
        return Target("cpu", target, f"llvm-{cpu}-{threads}t-tvm{version}",
                      f"llvm -mcpu={cpu} -num-cores={threads}")
    if kind == "cuda":
        device = tvm.cuda(0)
        if not device.exist:
            raise UsageError(
                "no CUDA device on this machine (tvm.cuda(0) does not exist); "
                "compile with `--target cpu`"
            )
        arch = "sm_" + device.compute_version.replace(".", "")
        target = tvm.target.Target(
            {
                "kind": "cuda",
                "arch": arch,
                "max_threads_per_block": device.max_threads_per_block,
                "max_shared_memory_per_block": device.max_shared_memory_per_block,
                "thread_warp_size": device.warp_size,
                "host": {"kind": "llvm"},
            }
        )
        return Target("cuda", target, f"cuda-{arch}-tvm{version}", f"cuda -arch={arch}")
    raise UsageError(f"`--target` {kind!r}: choose cpu or cuda")


def load_tensor_intrinsics(kind: str) -> None:
    """Register only the tensor intrinsics the target's schedules can use.

    MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin``, whose package import
    registers the intrinsics of every architecture (x86, ARM, CUDA, ROCm, Hexagon, ...): 35 s
    on this project's machines, of which x86 alone takes 0.3 s. The package module is made
    here with only this target's submodule imported, unless something already imported it.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    if kind == "cuda":
        parts = ["cuda"]
    else:
        import platform

        machine = platform.machine().lower()
        parts = ["arm_cpu"] if machine in ("aarch64", "arm64") else ["x86"]
    for part in parts:
        module = importlib.import_module(f"{name}.{part}")
        setattr(package, part, module)

