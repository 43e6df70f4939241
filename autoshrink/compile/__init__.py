"""Compile an artifact with TVM into a bundle that runs without PyTorch.

Modules, in the order a compile uses them: :mod:`.target` (CPU or GPU), :mod:`.densify`
(compressed layers as dense ones, the fallback and the ``tvm_dense`` peer), :mod:`.build`
(Relax modules and the build), :mod:`.tuning` and :mod:`.database` (MetaSchedule),
:mod:`.timing` (engines side by side) and :mod:`.pipeline` (the whole path).
"""

from autoshrink.compile.database import open_database
from autoshrink.compile.densify import densify
from autoshrink.compile.pipeline import (
    CompileError,
    CompileResult,
    compile_artifact,
    compile_winners,
)
from autoshrink.compile.target import resolve_target

__all__ = [
    "CompileError",
    "CompileResult",
    "compile_artifact",
    "compile_winners",
    "densify",
    "open_database",
    "resolve_target",
]
