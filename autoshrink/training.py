"""Training and evaluation loops shared by the baseline, fine-tuning and distillation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.tasks import Data, SupervisedLoss

__all__ = ["LossFn", "evaluate", "fit", "outputs", "predict", "task_loss"]

#: loss(logits, inputs, targets) -> scalar tensor
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def task_loss(loss: SupervisedLoss) -> LossFn:
    """A task's ``loss(outputs, targets)`` as the training loop calls it."""
    def train_loss(outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(outputs, y)

    return train_loss


def fit(
    model: nn.Module,
    data: Data,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    loss_fn: LossFn = cross_entropy,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` for ``steps`` minibatches of Adam with cosine-decayed ``lr``.

    Returns the mean loss of the last 50 steps. Raises FloatingPointError when the loss
    stops being finite, so a diverging trial fails with a reason instead of a silent NaN.
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    model.train()
    recent: list[float] = []
    batches = data.shuffled(min(batch_size, len(data)), generator)
    for step in range(steps):
        x, y = next(batches)
        loss = loss_fn(model(x), x, y)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = (recent + [value])[-50:]
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """The model's outputs on ``x`` in evaluation mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def outputs(
    model: nn.Module, data: Data, batch_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on a whole split and the split's targets, a batch at a time."""
    model.eval()
    logits, targets = [], []
    for x, y in data.ordered(batch_size):
        logits.append(model(x))
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def evaluate(
    model: nn.Module,
    data: Data,
    metric: Callable[[torch.Tensor, torch.Tensor], float],
) -> float:
    """The task metric of ``model`` on a whole split (a number, also when the metric
    returns a one-element tensor)."""
    return float(metric(*outputs(model, data)))


def steps_for(epochs: float, examples: int, batch_size: int) -> int:
    """Number of minibatches in ``epochs`` passes over ``examples``."""
    return max(1, math.ceil(epochs * examples / batch_size))
