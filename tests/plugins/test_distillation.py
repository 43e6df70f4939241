"""The `distillation` model method: conformance kit plus the loss's defining properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshrink.testing import ModelMethodTests
from autoshrink_plugins.distillation import Distillation

METHOD = Distillation()


class TestDistillation(ModelMethodTests):
    method = METHOD


def _batch(seed: int, batch: int = 8, classes: int = 10) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator) * 3
    teacher = torch.randn(batch, classes, generator=generator) * 3
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, targets


def test_width_is_the_knob() -> None:
    for width in (0.1, 0.35, 1.0):
        assert METHOD.width(METHOD.config({"width": width})) == width


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.floats(1.0, 20.0))
def test_alpha_zero_is_cross_entropy(seed: int, temperature: float) -> None:
    student, teacher, targets = _batch(seed)
    config = METHOD.config({"alpha": 0.0, "temperature": temperature})
    loss = METHOD.loss(student, teacher, targets, config)
    torch.testing.assert_close(loss, F.cross_entropy(student, targets))


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(1.0, 20.0),
    alpha=st.floats(0.0, 1.0),
)
def test_matches_hinton_formula(seed: int, temperature: float, alpha: float) -> None:
    student, teacher, targets = _batch(seed)
    config = METHOD.config({"alpha": alpha, "temperature": temperature})
    p = torch.softmax(teacher / temperature, dim=-1)
    q = torch.softmax(student / temperature, dim=-1)
    kl = (p * (p.log() - q.log())).sum(dim=-1).mean()
    expected = alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(student, targets)
    loss = METHOD.loss(student, teacher, targets, config)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 1.0))
def test_gradients_reach_student_not_teacher(seed: int, alpha: float) -> None:
    student, teacher, targets = _batch(seed)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    METHOD.loss(student, teacher, targets, METHOD.config({"alpha": alpha})).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None, "the teacher is a fixed target and must not be trained"


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(1.0, 20.0),
    scale=st.floats(0.01, 5.0),
)
def test_alpha_one_minimised_at_teacher_logits(seed: int, temperature: float, scale: float) -> None:
    _, teacher, targets = _batch(seed)
    config = METHOD.config({"alpha": 1.0, "temperature": temperature})
    at_teacher = teacher.clone().requires_grad_(True)
    best = METHOD.loss(at_teacher, teacher, targets, config)
    best.backward()
    assert best.abs().item() < 1e-5
    assert at_teacher.grad is not None and at_teacher.grad.abs().max().item() < 1e-5
    # Any other student distribution costs more (KL is zero only for equal distributions).
    noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(seed + 1))
    other = METHOD.loss(teacher + scale * noise, teacher, targets, config)
    assert other.item() > best.item()


def test_alpha_one_ignores_labels() -> None:
    student, teacher, targets = _batch(0)
    config = METHOD.config({"alpha": 1.0})
    a = METHOD.loss(student, teacher, targets, config)
    b = METHOD.loss(student, teacher, (targets + 1) % 10, config)
    assert torch.equal(a, b)


@pytest.mark.parametrize("knob", ["width", "temperature", "alpha"])
def test_knobs_are_searchable(knob: str) -> None:
    assert knob in METHOD.Config.model_fields
