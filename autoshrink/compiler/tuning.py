"""MetaSchedule tuning of a fused module's kernels against a shared database, with the
builder, cost model and logging adjusted for small budgets on few cores."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tvm
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autoshrink.compiler.build import is_pooling, is_scheduled
from autoshrink.compiler.target import Target

__all__ = ["tune"]

_MS_LOGGER = "tvm.s_tir.meta_schedule"

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


def _reduces(mod: Any) -> bool:
    """Whether the (one-function) module has a block with a reduction axis."""
    from tvm.s_tir import Schedule

    schedule = Schedule(mod)
    name = next(iter(mod.functions)).name_hint
    stack = [schedule.get_sblock("root", func_name=name)]
    while stack:
        for child in schedule.get_child_blocks(stack.pop()):
            if any(int(v.iter_type) == 2 for v in schedule.get(child).iter_vars):  # CommReduce
                return True
            stack.append(child)
    return False


def _countable(mod: Any) -> bool:
    """Whether MetaSchedule can estimate the module's FLOPs (it must, to tune it)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        estimate_tir_flops(mod)
    except tvm.error.InternalError:
        return False
    return True


def _has_space(context: Any) -> bool:
    """Whether MetaSchedule makes a design space for a tuning context's kernel."""
    try:
        return bool(context.generate_design_space())
    except tvm.error.InternalError:
        return False


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
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    start = time.monotonic()
    found = list(extract_tasks(fused, target.tvm))
    # Only kernels with a reduction (matrix products, convolutions) are tuned. Data movement
    # and elementwise kernels (an activation after an opaque compressed kernel) keep TVM's
    # plain loops: their few schedules could never fill a per-task budget, so every later
    # compile would tune them again. MetaSchedule cannot count the FLOPs of a kernel with
    # let-bound expressions (a hashed layer's TE kernel, on CPUs without AVX-512): those run
    # as TVM's plain loops (DLight's CPU rules fail on their gathers), so they are slow.
    # Written-out kernels (the table lookups of autoshrink.compiler.vector, the decoding
    # kernel of autoshrink.compiler.decoded) are scheduled already. Pools reduce, but the
    # few trials a compile gives them found schedules 6x slower than plain parallel loops
    # (a 2x2 max pool at batch 64: 1.77 ms tuned, 0.28 ms parallel), so they are not tuned.
    tasks = [
        t for t in found
        if not is_scheduled(next(iter(t.dispatched[0].functions.values())))
        and not is_pooling(next(iter(t.dispatched[0].functions.values())))
        and _reduces(t.dispatched[0])
        and _countable(t.dispatched[0])
    ]
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
    # A kernel MetaSchedule cannot make a design space for (a pruned layer's TE form on a
    # GPU: the bounds of its data-dependent reads) keeps the build's default schedule.
    spaced = [(c, w) for c, w in todo if _has_space(c)]
    summary["tasks"] -= len(todo) - len(spaced)
    todo = spaced
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

