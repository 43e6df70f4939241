"""TVM targets: this host's CPU or GPU 0, with the key of their tuning database, and the
tensor intrinsics their schedules may use."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import tvm

from autoshrink.errors import UsageError

__all__ = ["Target", "cuda_target", "load_tensor_intrinsics", "resolve_target"]

#: Part of each tuning database's key: records from another TVM release are not reused.
_TVM_VERSION = tvm.__version__.split("+")[0]


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
    if kind == "cpu":
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu() or "generic"
        target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": threads})
        return Target("cpu", target, f"llvm-{cpu}-{threads}t-tvm{_TVM_VERSION}",
                      f"llvm -mcpu={cpu} -num-cores={threads}")
    if kind == "cuda":
        device = tvm.cuda(0)
        if not device.exist:
            raise UsageError(
                "no CUDA device on this machine (tvm.cuda(0) does not exist); "
                "compile with `--target cpu`"
            )
        return cuda_target(
            "sm_" + device.compute_version.replace(".", ""), device.max_threads_per_block,
            device.max_shared_memory_per_block, device.warp_size,
        )
    raise UsageError(f"`--target` {kind!r}: choose cpu or cuda")


def cuda_target(
    arch: str, threads_per_block: int = 1024, shared_memory: int = 49152, warp: int = 32
) -> Target:
    """The target of a CUDA GPU of architecture ``arch`` (``sm_90``), with its block limits.
    TVM builds for it (CUDA source, with DLight's schedules) with no GPU present; running or
    tuning what it builds needs one."""
    target = tvm.target.Target(
        {
            "kind": "cuda",
            "arch": arch,
            "max_threads_per_block": threads_per_block,
            "max_shared_memory_per_block": shared_memory,
            "thread_warp_size": warp,
            "host": {"kind": "llvm"},
        }
    )
    return Target("cuda", target, f"cuda-{arch}-tvm{_TVM_VERSION}", f"cuda -arch={arch}")


def load_tensor_intrinsics(kind: str) -> None:
    """Register only the tensor intrinsics the target's schedules can use.

    MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin``, whose package import
    registers the intrinsics of every architecture (x86, ARM, CUDA, ROCm, Hexagon, ...): 35 s
    on this project's machines, of which x86 alone takes 0.3 s. The package module is made
    here with only this target's submodule imported, unless something already imported it;
    a later target of another kind (a CPU compile, then a GPU one) adds its own submodule.
    """
    import importlib.util

    name = "tvm.s_tir.tensor_intrin"
    package = sys.modules.get(name)
    if package is None:
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
        if not hasattr(package, part):
            setattr(package, part, importlib.import_module(f"{name}.{part}"))

