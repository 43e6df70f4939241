"""Relax modules from PyTorch models, the passes MetaSchedule tunes after, and the build."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import tvm
from torch import nn
from tvm import relax

from autoshrink.compiler.target import Target
from autoshrink.errors import CompileError

__all__ = [
    "apply_database", "build_tuned", "entry", "fuse", "is_pooling", "is_scheduled",
    "parallel_loops", "to_relax",
]


def entry(batch: int) -> str:
    """The library's function for inputs of ``batch`` examples."""
    return f"main_b{batch}"


def to_relax(model: nn.Module, input_shape: tuple[int, ...], batches: list[int]) -> Any:
    """One IRModule with a function ``main_b<batch>`` per batch size, weights as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    functions = {}
    for batch in batches:
        example = torch.zeros(batch, *input_shape)
        with warnings.catch_warnings():  # torch.export's deprecation chatter
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,))
            converted = from_exported_program(program, keep_params_as_input=False)
        functions[entry(batch)] = converted["main"].with_attr("global_symbol", entry(batch))
    return tvm.IRModule(functions)


def fuse(mod: Any, target: Target, prepack: bool) -> Any:
    """Legalize and fuse into the TIR functions MetaSchedule tunes (what ``tvm.compile``
    would do first). With ``prepack``, weights are marked layout-free so schedules may ask
    for a packed weight layout, which is then computed once at compile time."""
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        *relax.pipeline.library_dispatch_passes(target.tvm),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target.tvm:
        return tvm.transform.Sequential(passes)(mod)



def is_scheduled(function: Any) -> bool:
    """Whether a PrimFunc says it is scheduled already (tuned, or written out by hand)."""
    return bool(function.attrs and function.attrs.get("tirx.is_scheduled", False))


def is_pooling(function: Any) -> bool:
    """Whether a PrimFunc is a pooling kernel (TVM's legalized pools name their schedule
    rule ``meta_schedule.pool_max`` or ``pool_avg``)."""
    return "meta_schedule.pool_" in function.script()


def parallel_loops(mod: Any, threads: int, only: Callable[[Any], bool] | None = None) -> Any:
    """``mod`` with each kernel no schedule was applied to (the elementwise and data-movement
    kernels between the layers: batch norm, activations, reshapes, pools; with ``only``,
    those it accepts) made one loop nest with its outer loops run in parallel and its inner
    ones in vector lanes, instead of TVM's serial scalar loops over every element. A kernel
    the schedule cannot take stays as it was."""
    from tvm import tirx
    from tvm.s_tir import Schedule

    functions = {}
    for var, function in mod.functions.items():
        if (
            isinstance(function, tirx.PrimFunc)
            and not is_scheduled(function)
            and (only is None or only(function))
        ):
            try:
                function = _parallel(Schedule(function), threads)
            except (RuntimeError, ValueError):  # TVM's errors (ScheduleError, ...) included
                pass
        functions[var] = function
    return tvm.IRModule(functions, attrs=mod.attrs)


def _parallel(schedule: Any, threads: int) -> Any:
    """One block's loops, the outer ones fused until there is work for every thread (and
    some to spare), run in parallel; its other blocks inlined into it first."""
    *inner, last = schedule.get_child_blocks(schedule.get_sblock("root"))
    for block in inner:
        schedule.compute_inline(block)
    loops = schedule.get_loops(last)
    if not loops:
        return schedule.mod["main"]
    count, spread = 0, 1
    while count < len(loops) and spread < 8 * threads:
        spread *= int(schedule.get(loops[count]).extent)
        count += 1
    outer = schedule.fuse(*loops[:count]) if count > 1 else loops[0]
    schedule.parallel(outer)
    _vectorize(schedule, last, loops[count:])
    return schedule.mod["main"].with_attr("tirx.is_scheduled", True)


def _vectorize(schedule: Any, block: Any, loops: list[Any]) -> None:
    """The innermost loops of an elementwise block fused until they hold at least 64
    iterations, and run 16, 8 or 4 at a time (the most that divides them) in vector lanes;
    left as they are for a reduction, or where no such width divides them."""
    if not loops or any(v.iter_type != 0 for v in schedule.get(block).iter_vars):  # 0: spatial
        return
    depth, extent = 1, int(schedule.get(loops[-1]).extent)
    while extent < 64 and depth < len(loops):
        depth += 1
        extent *= int(schedule.get(loops[-depth]).extent)
    lanes = next((w for w in (16, 8, 4) if extent % w == 0), None)
    if lanes is None:
        return
    inner = schedule.fuse(*loops[-depth:]) if depth > 1 else loops[-1]
    schedule.vectorize(schedule.split(inner, [None, lanes])[1])


def apply_database(
    mod: Any, database: Any, target: Target, notes: list[str] | None = None
) -> Any:
    """``mod`` with each unscheduled kernel the database holds a schedule for scheduled by it,
    as ``relax.transform.MetaScheduleApplyDatabase`` does, except that a record whose trace
    no longer replays on its kernel (seen as "cannot find a block" with structurally equal
    kernels whose blocks are named apart) leaves that kernel unscheduled, with a line in
    ``notes``, instead of failing the whole compile."""
    from tvm import tirx
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    functions = {}
    for var, function in mod.functions.items():
        if isinstance(function, tirx.PrimFunc) and not is_scheduled(function):
            try:
                schedule = database.query_schedule(
                    _normalize_mod(function), target.tvm, var.name_hint
                )
            except RuntimeError:  # TVM's ScheduleError and InternalError among them
                schedule = None
                if notes is not None:
                    notes.append(
                        f"{var.name_hint}: its tuning record no longer applies, so it runs "
                        "untuned (delete the tuning database folder to tune it afresh)"
                    )
            if schedule is not None:  # its own attributes back (no "main" symbol)
                scheduled = schedule.mod["main"].without_attr("global_symbol")
                if function.attrs is not None:
                    scheduled = scheduled.with_attrs(dict(function.attrs))
                function = scheduled.with_attr("tirx.is_scheduled", True)
        functions[var] = function
    return tvm.IRModule(functions, attrs=mod.attrs)


def build_tuned(
    fused: Any, target: Target, database: Any, prepack: bool, notes: list[str] | None = None
) -> Any:
    """Compile the fused module with the database's best schedules (DLight's defaults for
    unscheduled GPU kernels); packed weight layouts are folded into the constants. A record
    that no longer applies is noted in ``notes`` (see :func:`apply_database`)."""
    import importlib

    from tvm.s_tir import dlight

    # tvm.relax.pipeline.dataflow_lower_passes looks the CPU one up in a package that does not
    # export it (TVM 0.27), so the backend's own pipeline module is asked directly.
    backend = "cuda" if target.kind == "cuda" else "cpu_generic"
    passes = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    lower = [*passes.dataflow_lower_passes(target.tvm), *passes.finalize_passes(target.tvm)]
    with target.tvm, database, tvm.transform.PassContext(opt_level=3):
        if target.kind == "cpu":
            # Pools are not tuned (see autoshrink.compiler.tuning): plain parallel loops beat
            # what few trials find, and a record tuned before that must not apply.
            fused = parallel_loops(fused, int(target.tvm.attrs["num-cores"]), is_pooling)
        mod = apply_database(fused, database, target, notes)
        if prepack:
            # The layout rewrite of each weight becomes its own function, applied to the
            # constant at compile time: the library stores the packed weights.
            mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            mod = relax.transform.FoldConstant()(mod)
        if target.kind == "cpu":
            mod = parallel_loops(mod, int(target.tvm.attrs["num-cores"]))
        if target.kind == "cuda":
            rules = (dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                     dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())
            mod = dlight.ApplyDefaultSchedule(*map(_declining, rules))(mod)
            unscheduled = sorted(
                var.name_hint for var, function in mod.functions.items()
                if isinstance(function, tvm.tirx.PrimFunc) and not is_scheduled(function)
            )
            if unscheduled:  # left as host loops, they would read GPU memory from the CPU
                raise CompileError(
                    f"no GPU schedule for {', '.join(unscheduled)}: none of DLight's rules "
                    "takes these kernels; compile with `--target cpu`"
                )
        return tvm.compile(mod, target=target.tvm, relax_pipeline=tvm.transform.Sequential(lower))


def _declining(rule: Any) -> Any:
    """``rule`` (a DLight schedule rule), made to decline a kernel its analysis fails on
    rather than stop the build: a compressed layer's compute reads its weight through
    gathers (codes, hashes), which the GEMV rule's access analysis asserts against. The
    next rule (at last ``Fallback``) then schedules it."""
    from tvm.s_tir import dlight

    class Declining(dlight.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return rule.apply(func, target, tunable)
            except (AssertionError, RuntimeError, ValueError, IndexError):  # TVM: RuntimeError
                return None

        def is_target_available(self, target: Any) -> bool:
            return rule.is_target_available(target)

    return Declining()
