"""Compile an artifact with TVM into a bundle that runs without PyTorch.

Modules, in the order a compile uses them: :mod:`.target` (CPU or GPU), :mod:`.lowering` and
:mod:`.kernels` (each layer as a kernel that reads its stored form), :mod:`.densify` (the dense
fallback and the ``tvm_dense`` peer), :mod:`.choice` (compressed or dense, per layer),
:mod:`.build`, :mod:`.tuning` and :mod:`.database` (MetaSchedule), :mod:`.timing` (engines
side by side, each in its own process) and :mod:`.pipeline` (the whole path).

The names below load their module on first use, so that importing one module of the package
(a plugin importing :mod:`.kernels`) does not import TVM's whole compile path. (The densify
function lives in :mod:`.densify`: a package attribute of that name would be the submodule.)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CompileError",
    "CompileResult",
    "compile_artifact",
    "compile_winners",
    "open_database",
    "resolve_target",
]

_HOMES = {
    "CompileError": "pipeline",
    "CompileResult": "pipeline",
    "compile_artifact": "pipeline",
    "compile_winners": "pipeline",
    "open_database": "database",
    "resolve_target": "target",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
