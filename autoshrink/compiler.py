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

import contextlib
import copy
import functools
import io
import json
import logging
import math
import shutil
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import tvm
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.utils import parametrize
from tvm import relax

from autoshrink.artifact import read_artifact
from autoshrink.baseline import cache_dir
from autoshrink.compress import replace_module
from autoshrink.errors import AutoshrinkError, UsageError
from autoshrink.latency import available_cores, cpu_model, median_ms, model_flops, thread_count
from autoshrink.latency import torch_engines as time_torch
from autoshrink.plan import compressible_layers

if TYPE_CHECKING:
    from autoshrink.plugins import Registry
    from autoshrink.study import SearchSetup, StudyFolder
    from autoshrink.tasks import Split, Task

__all__ = ["CompileError", "CompileResult", "compile_artifact", "densify", "open_database"]

DEFAULT_TRIALS = 256
#: Outputs may differ from PyTorch's by this much times max(1, largest |output|).
RELATIVE_TOLERANCE = 1e-4
LIBRARY = "model.so"
MANIFEST = "compiled.json"
LATENCY = "latency.json"
_DB_FILES = ("database_workload.json", "database_tuning_record.json")
_MS_LOGGER = "tvm.s_tir.meta_schedule"


class CompileError(AutoshrinkError):
    """Compiling failed or the compiled model does not compute what the artifact does."""


@dataclass
class CompileResult:
    """Where the compiled files are and what was measured."""

    folder: Path
    library: Path
    latency: dict[str, Any]


def entry(batch: int) -> str:
    """The library's function for inputs of ``batch`` examples."""
    return f"main_b{batch}"


# --- densify ---------------------------------------------------------------------------------


def _is_compressed_layer(module: nn.Module) -> bool:
    """A layer module some method replaced: a parametrized Linear/Conv2d, or a leaf module
    with parameters whose class is not one of torch's own (plugin modules)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        return parametrize.is_parametrized(module)
    children = {name for name, _ in module.named_children()}
    # A parametrized module's class is made by torch on the fly; its base is the real one.
    kind = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    if children - {"parametrizations"} or kind.__module__.startswith("torch."):
        return False
    return any(True for _ in module.parameters())


def _linear_from_probe(module: nn.Module, features: int, bias: bool | None) -> nn.Linear:
    """The Linear that ``module`` is: bias = module(0), weight = (module(I) - module(0)).T."""
    columns = []
    with torch.no_grad():
        zero = module(torch.zeros(1, features))[0]
        for start in range(0, features, 1024):  # rows of the identity, 1024 at a time
            rows = torch.arange(start, min(start + 1024, features))
            eye = torch.zeros(len(rows), features)
            eye[torch.arange(len(rows)), rows] = 1.0
            columns.append(module(eye) - zero)
        weight = torch.cat(columns).T
    layer = nn.Linear(features, weight.shape[0], bias=bool(zero.any()) if bias is None else bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(zero)
    return layer


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_geometry(module: nn.Module, template: nn.Module | None, in_shape, out_shape) -> dict:
    """Kernel, stride, padding, dilation and groups of a conv-like layer: from the task's
    dense template layer when there is one, else from the module's own attributes (kernel
    size solved from the recorded input and output sizes)."""
    source = template if isinstance(template, nn.Conv2d) else module
    stride = _pair(getattr(source, "stride", 1))
    dilation = _pair(getattr(source, "dilation", 1))
    padding = getattr(source, "padding", 0)
    if isinstance(padding, str):
        if not isinstance(template, nn.Conv2d):
            raise ValueError(f"padding {padding!r} needs the dense template layer")
    else:
        padding = _pair(padding)
    if isinstance(template, nn.Conv2d):
        kernel = _pair(template.kernel_size)
        pads = tuple(template._reversed_padding_repeated_twice)  # left, right, top, bottom
    else:
        kernel = tuple(
            _solve_kernel(in_shape[2 + d], out_shape[2 + d], stride[d], padding[d], dilation[d])
            for d in (0, 1)
        )
        pads = (padding[1], padding[1], padding[0], padding[0])
    return {
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "pads": pads,
        "groups": int(getattr(source, "groups", 1)),
        "padding_mode": getattr(source, "padding_mode", "zeros"),
    }


def _solve_kernel(size: int, out: int, stride: int, pad: int, dilation: int) -> int:
    """The kernel extent k with out = (size + 2 pad - dilation (k - 1) - 1) // stride + 1;
    refuses to guess when the stride makes several extents fit."""
    fits = [
        k
        for k in range(1, size + 2 * pad + 1)
        if (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 == out
    ]
    if len(fits) != 1:
        raise ValueError(f"kernel size is ambiguous ({fits}); pass the dense template layer")
    return fits[0]


def _conv_from_probe(module: nn.Module, in_shape, out_shape, template) -> nn.Conv2d:
    """The Conv2d that ``module`` is, read off its responses to one-hot images.

    An output pixel whose receptive field lies inside the (unpadded) input sees exactly the
    kernel taps; a one-hot input at tap (c, r, t) of that field makes the pixel equal to
    bias + W[o, c, r, t], and a zero input gives the bias alone.
    """
    geo = _conv_geometry(module, template, in_shape, out_shape)
    (kh, kw), (sh, sw), (dh, dw) = geo["kernel"], geo["stride"], geo["dilation"]
    left, right, top, bottom = geo["pads"]
    c_in, c_out, groups = in_shape[1], out_shape[1], geo["groups"]
    i0, j0 = -(-top // sh), -(-left // sw)  # first output pixel clear of the top/left padding
    r0, c0 = i0 * sh - top, j0 * sw - left
    height, width = r0 + dh * (kh - 1) + 1 + bottom, c0 + dw * (kw - 1) + 1 + right
    probes = torch.zeros(c_in * kh * kw, c_in, height, width)
    index = torch.arange(c_in * kh * kw)
    c, rest = index // (kh * kw), index % (kh * kw)
    probes[index, c, r0 + dh * (rest // kw), c0 + dw * (rest % kw)] = 1.0
    with torch.no_grad():
        base = module(torch.zeros(1, c_in, height, width))[0, :, i0, j0]
        response = module(probes)[:, :, i0, j0] - base  # (c_in*kh*kw, c_out)
    full = response.T.reshape(c_out, groups, c_in // groups, kh, kw)
    weight = full[torch.arange(c_out), torch.arange(c_out) // (c_out // groups)]
    bias = template.bias is not None if isinstance(template, nn.Conv2d) else bool(base.any())
    conv = nn.Conv2d(
        c_in,
        c_out,
        (kh, kw),
        stride=geo["stride"],
        padding=geo["padding"],
        dilation=geo["dilation"],
        groups=groups,
        bias=bias,
        padding_mode=geo["padding_mode"],
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.copy_(base)
    return conv


def densify(
    model: nn.Module,
    example: torch.Tensor,
    templates: dict[str, nn.Module] | None = None,
    log: list[str] | None = None,
) -> nn.Module:
    """A copy of ``model`` in which every compressed layer that costs at least as many FLOPs
    as a dense one is a plain ``nn.Linear`` / ``nn.Conv2d`` computing the same function.

    Works for any structure method's module, by probing: a layer fed 2-D inputs is read as
    W = (layer(I) - layer(0)).T, b = layer(0); one fed images as a convolution whose taps come
    from one-hot images (geometry from ``templates``, the task's dense layers by name, or the
    module's attributes). Every replacement is checked on random inputs; a layer that is not
    the affine map it seemed stays as it is. Layers that compute fewer FLOPs than their dense
    equivalent (low-rank factors below the break-even rank) are kept: that saving is the point
    of compiling them. ``log`` collects one line per decision.
    """
    notes = log if log is not None else []
    model = copy.deepcopy(model).eval()
    candidates = {
        name: module
        for name, module in model.named_modules()
        if name and ".parametrizations." not in f".{name}." and _is_compressed_layer(module)
    }
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            shapes[name] = (args[0].shape, output.shape)

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    for name, module in candidates.items():
        if name not in shapes:
            continue  # not reached by the forward pass
        in_shape, out_shape = shapes[name]
        template = (templates or {}).get(name)
        try:
            if len(in_shape) == 4 and len(out_shape) == 4:
                dense: nn.Module = _conv_from_probe(module, in_shape, out_shape, template)
            elif len(in_shape) >= 2 and in_shape[:-1] == out_shape[:-1]:
                bias = template.bias is not None if isinstance(template, nn.Linear) else None
                dense = _linear_from_probe(module, in_shape[-1], bias)
            else:
                notes.append(f"{name}: kept ({type(module).__name__}, not a Linear/Conv2d shape)")
                continue
        except (ValueError, RuntimeError) as exc:
            notes.append(f"{name}: kept ({type(module).__name__}; cannot probe it: {exc})")
            continue
        x = torch.randn(min(int(in_shape[0]), 8), *in_shape[1:])
        with torch.no_grad():
            want, got = module(x), dense(x)
        error = float((want - got).abs().max())
        if error > RELATIVE_TOLERANCE * max(1.0, float(want.abs().max())):
            notes.append(f"{name}: kept ({type(module).__name__} is not affine: error {error:.2g})")
            continue
        saved, full = model_flops(module, x), model_flops(dense, x)
        if saved < full:
            share = f"{saved / full:.0%} of dense FLOPs"
            notes.append(f"{name}: kept {type(module).__name__} ({share})")
            continue
        replace_module(model, name, dense)
        notes.append(f"{name}: {type(module).__name__} -> dense {type(dense).__name__}")
    return model


def fold_batchnorm(model: nn.Module, log: list[str] | None = None) -> nn.Module:
    """``model`` with each eval-mode BatchNorm folded into the Conv2d/Linear before it (one
    kernel less each, for TVM and PyTorch alike); unchanged when torch.fx cannot trace it."""
    from torch.fx.experimental.optimization import fuse

    notes = log if log is not None else []
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not before:
        return model
    try:
        folded = fuse(model.eval())
    except Exception as exc:  # untraceable control flow: TVM fuses BatchNorm as an epilogue
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        notes.append(f"BatchNorm not folded ({first[:120]})")
        return model
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    notes.append(f"folded {before - after} BatchNorm layers")
    return folded


# --- targets ---------------------------------------------------------------------------------


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


def _load_tensor_intrinsics(kind: str) -> None:
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


# --- tuning database -------------------------------------------------------------------------


def _database_problem(folder: Path) -> str | None:
    """What is wrong with the JSON lines of a tuning database, checked in Python first:
    TVM's own reader crashes the process (segfault) on some damage, e.g. a blank line."""
    workloads = 0
    for filename in _DB_FILES:
        path = folder / filename
        if not path.exists():
            continue
        lines = path.read_bytes().split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the newline that ends the file
        for number, line in enumerate(lines, start=1):
            try:
                value = json.loads(line)
            except ValueError:
                return f"{filename} line {number} is not JSON"
            if not isinstance(value, list) or len(value) != 2:
                return f"{filename} line {number} is not a [key, value] pair"
            if filename == _DB_FILES[0]:
                workloads += 1
            elif not (isinstance(value[0], int) and 0 <= value[0] < workloads):
                return f"{filename} line {number} names workload {value[0]!r}"
            elif not isinstance(value[1], list):
                return f"{filename} line {number} holds no tuning record"
    return None


def _mark_checked(folder: Path) -> None:
    """Remember the files' sizes and times: unchanged files need no child-process check."""
    (folder / ".checked").write_text(json.dumps(_stamp(folder)))


def _stamp(folder: Path) -> list[list[int]]:
    return [
        [p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [0, 0]
        for p in (folder / f for f in _DB_FILES)
    ]


def _loads_in_child(folder: Path) -> str | None:
    """Load the database in a child process first: a crash there costs nothing here."""
    code = (
        "import sys\nfrom tvm.s_tir.meta_schedule.database import JSONDatabase\n"
        "JSONDatabase(work_dir=sys.argv[1], allow_missing=True)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "loading it took over 5 minutes"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"TVM cannot load it ({lines[-1][:200] if lines else f'exit {done.returncode}'})"


def open_database(folder: Path, console: Console | None = None) -> Any:
    """The MetaSchedule JSON database in ``folder``; a corrupt one is moved aside to
    ``<folder>.corrupt-<time>`` and an empty one started, with a one-line warning.

    Checks: each line parses as JSON of the right shape (in Python), and, when the files
    changed since this code last loaded them (``.checked`` holds their sizes and times),
    TVM loads them in a child process; only then are they loaded here.
    """
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    folder.mkdir(parents=True, exist_ok=True)
    checked = folder / ".checked"
    problem = _database_problem(folder)
    known = checked.is_file() and checked.read_text() == json.dumps(_stamp(folder))
    if problem is None and not known and any((folder / f).exists() for f in _DB_FILES):
        problem = _loads_in_child(folder)
    if problem is None:
        try:
            database = JSONDatabase(work_dir=str(folder), allow_missing=True)
            _mark_checked(folder)
            return database
        except Exception as exc:  # TVM raises RuntimeError / InternalError on bad records
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    aside = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(folder), str(aside))
    folder.mkdir(parents=True)
    (console or Console(stderr=True)).print(
        f"[yellow]warning:[/] tuning database {folder} was corrupt ({problem}); "
        f"moved to {aside.name}, tuning starts afresh",
        highlight=False,
    )
    database = JSONDatabase(work_dir=str(folder), allow_missing=True)
    _mark_checked(folder)
    return database


# --- relax, tuning and building --------------------------------------------------------------


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


def _fuse(mod: Any, target: Target, prepack: bool) -> Any:
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


def _make_build():
    """The ``f_build`` for MetaSchedule's LocalBuilder.

    The default one imports ``tvm.s_tir.tensor_intrin`` in every fresh builder process (35 s
    here, over the 30 s build timeout: every candidate then fails). Building an already
    scheduled PrimFunc needs no intrinsics: it drops the weight-layout rewrite block (the
    measured kernel takes its weight pre-packed, as the compiled model will) and lowers.
    Returned as a closure so cloudpickle ships it by value and the worker imports nothing
    of autoshrink's.
    """

    def build(mod: Any, target: Any, params: Any) -> Any:
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        from tvm.tirx import build as build_tir

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return build_tir(mod, target=target)

    return build


def _builder(threads: int) -> Any:
    """MetaSchedule's LocalBuilder with :func:`_make_build`, keeping its worker processes from
    one round of candidates to the next.

    LocalBuilder starts a fresh process pool for every round; each worker then imports tvm
    (and torch, which tvm_ffi imports when it is installed): 5-7 s a round on 2 busy cores,
    more than the builds themselves. Workers here are reused and replaced after 32 builds,
    which bounds the leak that made TVM restart them.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, LocalBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class KeptPoolBuilder(LocalBuilder._cls):
        def build(self, build_inputs: list) -> list:
            if getattr(self, "pool", None) is None:
                self.pool = PopenPoolExecutor(
                    max_workers=self.max_workers,
                    timeout=self.timeout_sec,
                    maximum_process_uses=32,
                )
            jobs = [
                (self.f_build, self.f_export, i.mod, i.target, _serialize_params(i.params))
                for i in build_inputs
            ]
            results = []
            for done in self.pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"timeout after {self.timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {done.value}"))
            return results

        def close(self) -> None:
            if getattr(self, "pool", None) is not None:
                self.pool.shutdown()
                self.pool = None

    return KeptPoolBuilder(f_build=_make_build(), max_workers=threads, timeout_sec=60)


def _cost_model(threads: int) -> Any:
    """MetaSchedule's XGBoost cost model, minus the trainings whose result is never used.

    Its ``predict`` returns random scores until ``num_warmup_samples`` (100) measurements
    exist, yet ``update`` retrains after every round from the first one: ~8 s each on 2 busy
    cores, most of a small tuning budget. Training starts here once predictions use it.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    @derived_object
    class WarmXGBModel(XGBModel._cls):
        def _train(self, xs: list, ys: Any) -> None:
            if self.data_size >= self.num_warmup_samples:
                super()._train(xs, ys)

    return WarmXGBModel(num_tuning_cores=threads, tree_method="auto")


@contextlib.contextmanager
def _quiet_meta_schedule() -> Iterator[None]:
    """Keep MetaSchedule's log in its files (work_dir/logs): it adds a console handler for
    its whole logger tree each time tuning contexts are made; those are removed after.

    TVM rebuilds a logging config naming every handler of that logger and fails on unnamed
    ones (pytest's capture handlers, for one); they step aside meanwhile.
    """
    root = logging.getLogger(_MS_LOGGER)
    unnamed = [handler for handler in root.handlers if handler.get_name() is None]
    for handler in unnamed:
        root.removeHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler:
                root.removeHandler(handler)
        for handler in unnamed:
            root.addHandler(handler)


def _records(database: Any, mod: Any, limit: int) -> int:
    """Valid tuning records the database holds for a task's workload (at most ``limit``)."""
    if not database.has_workload(mod):
        return 0
    return len(database.get_top_k(database.commit_workload(mod), limit))


def tune(
    fused: Any,
    target: Target,
    database: Any,
    trials: int,
    threads: int,
    log_dir: Path,
    console: Console | None,
) -> dict[str, Any]:
    """Spend up to ``trials`` measurements, spread evenly over the model's tuning tasks, on
    the tasks the database does not already hold that many records for."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    start = time.monotonic()
    found = list(extract_tasks(fused, target.tvm))
    # Pure data movement (reshapes) has nothing to tune; its plain loop is as fast as any.
    tasks = [t for t in found if estimate_tir_flops(t.dispatched[0]) > 0]
    summary: dict[str, Any] = {"trials": 0, "seconds": 0.0, "tasks": len(tasks), "reused": 0}
    if not tasks or trials <= 0:
        return summary
    per_task = max(1, math.ceil(trials / len(tasks)))
    per_round = min(32, per_task)
    # The evolutionary search evolves a population on the cost model before each round of
    # measurements; 512 (the default) costs ~45 s per round for a conv on 2 busy cores, so
    # it is scaled to the round: about 8 candidates evolved per one measured.
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=min(512, max(64, 8 * per_round)),
        init_min_unmeasured=min(50, max(16, 2 * per_round)),
        genetic_num_iters=4 if per_round >= 32 else 2,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_meta_schedule():
        contexts, weights = extracted_tasks_to_tune_contexts(
            tasks, str(log_dir), strategy=strategy, num_threads=threads, seed=0
        )
    todo = [
        (context, weight)
        for context, weight in zip(contexts, weights, strict=True)
        if _records(database, context.mod, per_task) < per_task
    ]
    summary["reused"] = len(tasks) - len(todo)
    if not todo:
        return summary
    total = per_task * len(todo)
    progress = Progress(
        TextColumn(f"[bold]tuning {len(todo)} of {len(tasks)} kernels"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials"),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        transient=True,
    )
    bar = progress.add_task("tune", total=total)
    done = [0]

    @derived_object
    class ShowProgress(ms.measure_callback.PyMeasureCallback):
        def apply(self, scheduler, task_id, candidates, builds, runs) -> None:
            done[0] += len(runs)
            progress.update(bar, completed=min(done[0], total))

    builder = _builder(threads)
    runner = ms.runner.LocalRunner(
        timeout_sec=60,
        evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False
        ),
    )
    with progress, _quiet_meta_schedule(), contextlib.closing(builder):
        ms.tune.tune_tasks(
            tasks=[c for c, _ in todo],
            task_weights=[w for _, w in todo],
            work_dir=str(log_dir),
            max_trials_global=total,
            max_trials_per_task=per_task,
            num_trials_per_iter=per_round,
            builder=builder,
            runner=runner,
            database=database,
            cost_model=_cost_model(threads),
            measure_callbacks=[*ms.MeasureCallback.create("default"), ShowProgress()],
        )
    summary.update(trials=done[0], seconds=round(time.monotonic() - start, 1))
    return summary


def build_tuned(fused: Any, target: Target, database: Any, prepack: bool) -> Any:
    """Compile the fused module with the database's best schedules (DLight's defaults for
    unscheduled GPU kernels); packed weight layouts are folded into the constants."""
    import importlib

    from tvm.s_tir import dlight

    # tvm.relax.pipeline.dataflow_lower_passes looks the CPU one up in a package that does not
    # export it (TVM 0.27), so the backend's own pipeline module is asked directly.
    backend = "cuda" if target.kind == "cuda" else "cpu_generic"
    passes = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    lower = [*passes.dataflow_lower_passes(target.tvm), *passes.finalize_passes(target.tvm)]
    with target.tvm, database, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase()(fused)
        if prepack:
            # The layout rewrite of each weight becomes its own function, applied to the
            # constant at compile time: the library stores the packed weights.
            mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            mod = relax.transform.FoldConstant()(mod)
        if target.kind == "cuda":
            mod = dlight.ApplyDefaultSchedule(
                dlight.gpu.Matmul(),
                dlight.gpu.GEMV(),
                dlight.gpu.Reduction(),
                dlight.gpu.GeneralReduction(),
                dlight.gpu.Fallback(),
            )(mod)
        return tvm.compile(mod, target=target.tvm, relax_pipeline=tvm.transform.Sequential(lower))


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


def _accuracy(vm, model: nn.Module, split: Split, task: Task, batch: int, device) -> dict:
    """The task metric on ``split`` through the library and through PyTorch."""
    from autoshrink.training import predict

    chunks = []
    x = split.x.numpy().astype(np.float32)
    for start in range(0, len(x), batch):
        part = x[start : start + batch]
        padded = np.zeros((batch, *part.shape[1:]), dtype=np.float32)
        padded[: len(part)] = part  # the library's batch size is fixed
        chunks.append(_run(vm, batch, padded, device)[: len(part)])
    compiled = torch.from_numpy(np.concatenate(chunks))
    with torch.no_grad():
        reference = predict(model, split.x)
    return {
        "torch": task.metric(reference, split.y),
        "tvm": task.metric(compiled, split.y),
        "argmax_agreement": float((compiled.argmax(1) == reference.argmax(1)).float().mean()),
        "examples": len(split.y),
    }


def _tvm_times(vm: Any, shape, batches, target: Target, repeats: int) -> dict[str, float]:
    times = {}
    device = target.device
    for batch in batches:
        x = tvm.runtime.tensor(np.zeros((batch, *shape), dtype=np.float32), device)
        function = vm[entry(batch)]
        sync = device.sync if target.kind == "cuda" else None  # kernels launch asynchronously
        times[str(batch)] = median_ms(functools.partial(function, x), repeats=repeats, sync=sync)
    return times


# --- the whole path --------------------------------------------------------------------------


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
    test: Split | None = None,
    torch_compile: bool = True,
    prepack: bool = True,
    tuning_dir: Path | None = None,
    repeats: int = 7,
    console: Console | None = None,
) -> CompileResult:
    """Compile the artifact at ``path`` for ``target`` (cpu or cuda), tune it with up to
    ``trials`` measurements (0: use only what the tuning database holds), check its outputs
    against PyTorch (and its ``test`` accuracy when given), time every engine at batch 1 and
    ``batch``, and write ``model.so``, ``compiled.json`` and ``latency.json`` into ``out``
    (default: ``<artifact name>-compiled`` beside the artifact)."""
    if batch < 1:
        raise UsageError(f"`--batch` {batch}: must be at least 1")
    if trials < 0:
        raise UsageError(f"`--trials` {trials}: must be 0 or more")
    threads = threads or available_cores()
    if threads < 1:
        raise UsageError(f"`--threads` {threads}: must be at least 1")
    chosen = resolve_target(target, threads)  # first: a missing GPU fails before any work
    path = Path(path)
    artifact = read_artifact(path, registry, task)
    task = task or registry.tasks[artifact.header.task]
    out = Path(out) if out else path.with_name(f"{path.stem}-compiled")
    out.mkdir(parents=True, exist_ok=True)
    batches = sorted({1, batch})
    shape = tuple(task.input_shape)
    notes: list[str] = []
    templates = compressible_layers(task.build_model(artifact.header.width), registry)
    reference = artifact.model.eval()
    model = fold_batchnorm(densify(reference, task.example_input(1), templates, notes), notes)
    _load_tensor_intrinsics(chosen.kind)
    with thread_count(threads):
        try:
            mod = to_relax(model, shape, batches)
        except Exception as exc:
            raise CompileError(f"{path}: the model cannot be exported to TVM: {exc}") from exc
        fused = _fuse(mod, chosen, prepack)
        db_folder = tuning_dir or cache_dir() / "tuning" / chosen.key
        database = open_database(db_folder, console)
        tuning = tune(fused, chosen, database, trials, threads, out / "tuning-logs", console)
        _mark_checked(db_folder)  # what tuning appended came from TVM itself
        library = out / LIBRARY
        build_tuned(fused, chosen, database, prepack).export_library(str(library))
        untuned = relax.VirtualMachine(tvm.compile(mod, target=chosen.tvm), chosen.device)
        # Everything below runs the file that ships, loaded as a user would load it.
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), chosen.device)
        error, tolerance = _max_error(vm, reference, shape, batches, chosen.device)
        if not error <= tolerance:
            raise CompileError(
                f"{path}: compiled outputs differ from PyTorch's by {error:.3g} "
                f"(tolerance {tolerance:.3g})"
            )
        accuracy = _accuracy(vm, reference, test, task, batch, chosen.device) if test else None
        inputs = {b: torch.randn(b, *shape) for b in batches}
        engines: dict[str, dict[str, float]] = {}
        if chosen.kind == "cpu":  # this project's torch is a CPU build: time it on the CPU
            engines, more = time_torch(model, inputs, compiled=torch_compile, repeats=repeats)
            notes.extend(more)
        engines["tvm_untuned"] = _tvm_times(untuned, shape, batches, chosen, repeats)
        engines["tvm_tuned"] = _tvm_times(vm, shape, batches, chosen, repeats)
    order = ("tvm_tuned", "tvm_untuned", "torch_eager", "torch_compile")
    latency = {
        "machine": cpu_model(),
        "threads": threads,
        "target": chosen.text,
        "batches": batches,
        "engines": {name: engines[name] for name in order if name in engines},
        "tuning": {**tuning, "database": chosen.key},
        "max_abs_error": error,
        "tolerance": tolerance,
        "accuracy": accuracy,
        "flops": {str(b): model_flops(model, torch.zeros(b, *shape)) for b in batches},
        "prepack": prepack,
        "notes": notes,
    }
    manifest = {
        "format": "autoshrink-compiled/1",
        "library": LIBRARY,
        "artifact": str(path),
        "task": task.name,
        "target": chosen.text,
        "tvm": tvm.__version__,
        "threads": threads,
        "entries": {
            entry(b): {"input": [b, *shape], "dtype": "float32"} for b in batches
        },
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
    ``<study>/compiled/trial-NNNN/``, where ``summarize`` reads its ``latency.json``. The
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
                trials=setup.settings.tune_trials,
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
