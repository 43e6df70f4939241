"""One trial: plan -> compressed model -> short fine-tune -> validation metric -> artifact."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from autoshrink.artifact import write_artifact
from autoshrink.budget import FIGURE_SHAPE
from autoshrink.compress import apply_structure, apply_values, structure_schedule
from autoshrink.pipeline import ModelStep, model_step, resolve_plan
from autoshrink.plan import Plan
from autoshrink.tasks import Split
from autoshrink.training import LossFn, evaluate, fit, predict, task_loss

if TYPE_CHECKING:
    from autoshrink.baseline import Baseline
    from autoshrink.registry import Registry
    from autoshrink.tasks import Data, Task, TaskData

__all__ = ["Checkpoint", "Fit", "TrialBudget", "TrialOutcome", "run_trial"]


@dataclass(frozen=True)
class TrialBudget:
    """How much training one trial may spend."""

    finetune_steps: int = 300
    #: distilled students are trained from scratch, so they get more steps
    distill_steps: int = 900
    batch_size: int = 128
    lr: float = 5e-4
    #: share of the fine-tune steps spent before the value stage applies
    structure_share: float = 0.6
    seconds: float = 300.0
    #: a plan whose artifact, written before any training, is larger than this many bytes
    #: is measured as it is and not trained: no fine-tune brings it back under the budget
    size_limit: int | None = None


@dataclass(frozen=True)
class TrialOutcome:
    """What a finished trial measured: the artifact's bytes on disk and the task metric on
    validation data (``val_accuracy`` by its historic name, whatever the metric is)."""

    bytes: int
    val_accuracy: float
    artifact: Path
    seconds: float
    #: False when the plan was over :attr:`TrialBudget.size_limit` and not trained
    trained: bool = True
    #: the plan built instead of the one asked for, tightened to fit the budget (see
    #: ``fit_plan`` in :func:`run_trial`); None when the plan was built as asked
    fitted: Plan | None = None


#: ``checkpoint(bytes, validation metric)``: see :func:`run_trial`.
Checkpoint = Callable[[int, float], None]
#: ``fit_plan(plan, bytes)``: a plan that fits the budget, given a plan whose artifact written
#: before training has ``bytes``; None to build the plan as it is.
Fit = Callable[[Plan, int], Plan | None]


def _deadline_check(deadline: float, limit: float) -> Callable[[int, float], None]:
    def check(step: int, loss: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"trial ran past its {limit:g} s limit at step {step}")

    return check


def run_trial(
    plan: Plan,
    *,
    task: Task,
    data: TaskData,
    baseline: Baseline,
    registry: Registry,
    artifact: Path,
    budget: TrialBudget,
    seed: int,
    checkpoint: Checkpoint | None = None,
    fit_plan: Fit | None = None,
) -> TrialOutcome:
    """Build ``plan`` from the baseline (or a distilled student), fine-tune it, measure it on
    validation data and write its artifact. Fine-tuning minimises the task's loss, or the
    distillation method's own. Raises on any failure; the caller records it.

    ``checkpoint`` (with a ``size_limit``, which has the plan's bytes measured before
    training) is called once, when the compressed form is complete (the structure
    fine-tuned, the value stage applied): ``checkpoint(bytes, validation metric)``. It may
    raise to stop the trial there, saving the rest of the fine-tune.

    ``fit_plan`` (with a ``size_limit`` too) is asked for a tighter plan once the plan's
    bytes before training are known; the plan it returns is built instead, and the outcome
    says so (:attr:`TrialOutcome.fitted`)."""
    start = time.monotonic()
    check = _deadline_check(start + budget.seconds, budget.seconds)
    torch.manual_seed(seed)
    teacher = baseline.model.eval()
    model, width, train, loss_fn = teacher, 1.0, data.train, task_loss(task.loss)
    student = model_step(plan.model, registry)
    if student is not None:
        width = student.width
        train, loss_fn = _distillation(student, teacher, data.train)
        model = task.build_model(width)
    pipeline = resolve_plan(plan, model, registry)
    size: int | None = None
    fitted: Plan | None = None
    if budget.size_limit is not None:

        def written_untrained() -> tuple[torch.nn.Module, int]:
            untrained = apply_structure(model, pipeline)
            apply_values(untrained, pipeline)
            return untrained, write_artifact(artifact, untrained, plan, task, registry,
                                             width=width, info=FIGURE_SHAPE, overwrite=True)

        untrained, size = written_untrained()
        fitted = fit_plan(plan, size) if fit_plan is not None else None
        if fitted == plan:
            fitted = None
        if fitted is not None:
            plan, pipeline = fitted, resolve_plan(fitted, model, registry)
            untrained, size = written_untrained()
        if size > budget.size_limit:  # measured as it is; the file records the figure
            val = evaluate(untrained.eval(), data.val, task.metric)
            size = write_artifact(artifact, untrained, plan, task, registry, width=width,
                                  info={"val_accuracy": val}, overwrite=True)
            return TrialOutcome(size, val, artifact, time.monotonic() - start, trained=False,
                                fitted=fitted)
    if plan.model is not None:
        fit(
            model,
            train,
            steps=budget.distill_steps,
            batch_size=budget.batch_size,
            lr=task.training.lr,
            seed=seed,
            loss_fn=loss_fn,
            on_step=check,
        )
    # Deep Compression's order: retrain the structure with free weights, then quantize the
    # retrained weights and fine-tune what the value stage leaves trainable.
    compressed = apply_structure(model, pipeline)
    structure_steps = round(budget.finetune_steps * budget.structure_share)
    tighten = structure_schedule(compressed, pipeline)

    def structure_step(step: int, loss: float) -> None:
        check(step, loss)
        tighten((step + 1) / structure_steps)

    for phase, steps in enumerate((structure_steps, budget.finetune_steps - structure_steps)):
        if phase == 1:
            apply_values(compressed, pipeline)
            if checkpoint is not None and size is not None:
                checkpoint(size, evaluate(compressed, data.val, task.metric))
        if steps:
            fit(
                compressed,
                train,
                steps=steps,
                batch_size=budget.batch_size,
                lr=budget.lr,
                seed=seed + 1 + phase,
                loss_fn=loss_fn,
                on_step=structure_step if phase == 0 else check,
            )
    compressed.eval()
    val = evaluate(compressed, data.val, task.metric)
    size = write_artifact(
        artifact,
        compressed,
        plan,
        task,
        registry,
        width=width,
        info={"val_accuracy": val},
        overwrite=True,
    )
    return TrialOutcome(size, val, artifact, time.monotonic() - start, fitted=fitted)


def _distillation(student: ModelStep, teacher: torch.nn.Module, train: Data) -> tuple[Data, LossFn]:
    """The training data and loss of a distilled student. On data held in memory the
    teacher's outputs are computed once, in one pass, and looked up by example (the split's
    targets become the examples' indices): a student trained from scratch takes thousands of
    steps, and the teacher's forward pass would cost more than the student's own. Data read
    from a Dataset (random transforms, possibly), or whose outputs would take more memory
    than its inputs, asks the teacher every batch."""
    if isinstance(train, Split) and len(train) and _outputs_fit(teacher, train):
        soft, targets = predict(teacher, train.x), train.y

        def looked_up(logits: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return student.method.loss(logits, soft[index], targets[index], student.config)

        return Split(train.x, torch.arange(len(train))), looked_up

    def asked(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outputs = teacher(x)
        return student.method.loss(logits, outputs, y, student.config)

    return train, asked


@torch.no_grad()
def _outputs_fit(teacher: torch.nn.Module, train: Split) -> bool:
    """Whether the teacher's outputs on the whole split take no more memory than its inputs
    (ten logits for a 784-pixel image do; a segmentation map may not)."""
    return teacher(train.x[:1]).numel() * len(train) <= train.x.numel()
