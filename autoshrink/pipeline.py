"""The per-layer pipeline: a plan resolved once against a model into typed steps.

Everything that walks a model layer by layer (compressing it, writing and rebuilding its
artifact, sizing it before training, lowering it to kernels) starts from
:func:`resolve_plan`: each compressible layer with its structure method, value method and
their validated configs, and the plan's encoder. :func:`model_step` resolves the model stage,
which decides the model the layers belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from autoshrink.methods import (
    EncodingMethod,
    MethodConfig,
    ModelMethod,
    Stage,
    StructureMethod,
    ValueMethod,
)
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers, resolve_choice

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = [
    "LayerStep", "ModelStep", "Pipeline", "layer_step", "model_step", "plan_width", "resolve_plan",
]


@dataclass(frozen=True)
class LayerStep:
    """One compressible layer and what the plan does to it."""

    name: str
    #: the layer as the uncompressed model holds it (a template: trained or not)
    module: nn.Module
    structure: StructureMethod
    structure_config: MethodConfig
    value: ValueMethod
    value_config: MethodConfig

    @property
    def methods(self) -> str:
        """``"pruning + quantization"``: the layer's methods, for notes."""
        return f"{self.structure.name} + {self.value.name}"


@dataclass(frozen=True)
class Pipeline:
    """A plan resolved against a model: its layers' steps, in the model's order, and the
    encoder of the artifact's streams (``None`` stores them raw)."""

    layers: tuple[LayerStep, ...]
    encoder: EncodingMethod | None = None
    encoder_config: MethodConfig | None = None

    @property
    def names(self) -> list[str]:
        """The compressible layers' names."""
        return [step.name for step in self.layers]


@dataclass(frozen=True)
class ModelStep:
    """The plan's model stage: its method and validated config."""

    method: ModelMethod
    config: MethodConfig

    @property
    def width(self) -> float:
        """The width of the student the task's model factory builds."""
        return self.method.width(self.config)


def layer_step(name: str, module: nn.Module, layer: LayerPlan, registry: Registry) -> LayerStep:
    """Layer ``name`` (``module`` in the uncompressed model) under ``layer``'s methods;
    UsageError for a method that is unknown or of another stage, ValidationError for knobs
    its config refuses."""
    structure = registry.structure(layer.structure.method)
    value = registry.value(layer.value.method)
    return LayerStep(
        name=name,
        module=module,
        structure=structure,
        structure_config=structure.config(layer.structure.config),
        value=value,
        value_config=value.config(layer.value.config),
    )


def resolve_plan(plan: Plan, model: nn.Module, registry: Registry) -> Pipeline:
    """``plan`` against ``model`` (uncompressed, at the plan's width): one step per
    compressible layer, and the encoder. PlanError, naming the layer, for any impossible
    choice (see :meth:`Plan.check`)."""
    plan.check(registry, model)
    steps = tuple(
        layer_step(name, module, plan.layer(name), registry)
        for name, module in compressible_layers(model, registry).items()
    )
    if plan.encoding is None:
        return Pipeline(steps)
    encoder = registry.encoder(plan.encoding.method)
    return Pipeline(steps, encoder, encoder.config(plan.encoding.config))


def model_step(choice: Choice | None, registry: Registry) -> ModelStep | None:
    """The model stage ``choice`` names (``None`` without one); PlanError for a method that
    is unknown or of another stage, or knobs its config refuses."""
    if choice is None:
        return None
    resolve_choice(registry, choice, Stage.MODEL, "model stage")
    method = registry.model(choice.method)
    return ModelStep(method, method.config(choice.config))


def plan_width(choice: Choice | None, registry: Registry) -> float:
    """The width the model stage ``choice`` gives the student (1.0 without one)."""
    step = model_step(choice, registry)
    return 1.0 if step is None else step.width
