"""`distillation`: train a narrower student on the baseline's softened outputs (model stage).

Knowledge distillation as in Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a
Neural Network". The method itself only says how wide the student is and how it learns; the
engine does the rest: it builds the student with the task's model factory at
:meth:`Distillation.width` times the task's hidden widths, trains it with
:meth:`Distillation.loss` against the trained baseline (the teacher) run on the same batches,
and then applies the per-layer stages (structure, value) to the student instead of the
baseline. A narrower student shrinks every layer at once, and the teacher's soft targets (the
relative probabilities it gives the wrong classes) let it recover more accuracy than
training on the labels alone would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from autoshrink import hookimpl
from autoshrink.methods import Method, MethodConfig, ModelMethod

__all__ = ["Distillation", "DistillationConfig", "distillation_loss"]


class DistillationConfig(MethodConfig):
    width: float = Field(
        default=0.5, ge=0.1, le=1.0,
        description="the student's hidden widths as a multiple of the task's",
    )
    temperature: float = Field(
        default=4.0, ge=1.0, le=20.0,
        description="softmax temperature: higher spreads the teacher's probability wider",
    )
    alpha: float = Field(
        default=0.9, ge=0.0, le=1.0,
        description="weight of the soft-target loss; 1 - alpha weighs the label loss",
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, targets)``.

    Both distributions are softmaxes at temperature ``T`` and the KL divergence is averaged
    over the batch ("batchmean", the true per-sample KL). The ``T^2`` factor keeps the soft
    term's gradients at the same scale as the hard term's whatever the temperature (they
    shrink as ``1/T^2`` otherwise). The teacher is detached: it is a fixed target.
    """
    t = float(temperature)
    teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    student = F.log_softmax(student_logits / t, dim=-1)
    # kl_div(input, target) computes KL(target || input); log_target keeps it in log space,
    # which stays finite where the teacher's probabilities underflow.
    soft = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)
    if alpha >= 1.0:
        return soft  # skip the hard term: its targets may even be absent (unlabelled data)
    hard = F.cross_entropy(student_logits, targets)
    if alpha <= 0.0:
        return hard
    return alpha * soft + (1.0 - alpha) * hard


class Distillation(ModelMethod):
    """Distil the baseline into a student of ``width`` times its hidden widths."""

    name = "distillation"
    summary = "train a narrower student on the baseline's softened outputs (Hinton et al.)"
    Config = DistillationConfig

    def width(self, config: DistillationConfig) -> float:
        return config.width

    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        config: DistillationConfig,
    ) -> torch.Tensor:
        return distillation_loss(
            student_logits, teacher_logits, targets, config.temperature, config.alpha
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Distillation())
