"""Plan: the per-layer choice of methods and knobs for one trial."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from autoshrink.embedding import check_embedding
from autoshrink.errors import PlanError
from autoshrink.methods import Stage, StructureMethod

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = ["Choice", "LayerPlan", "Plan", "compressible_layers"]


class Choice(BaseModel):
    """One method and the values of its knobs (missing knobs take their defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    config: dict[str, Any] = Field(default_factory=dict)


class LayerPlan(BaseModel):
    """At most one structure method and one value method for one layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    structure: Choice = Choice(method="dense")
    value: Choice = Choice(method="float")


class Plan(BaseModel):
    """The whole compression of one model: model stage, per-layer stages, encoding stage.

    Layers that the plan does not name stay dense float32.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Choice | None = None
    layers: dict[str, LayerPlan] = Field(default_factory=dict)
    encoding: Choice | None = None

    def layer(self, name: str) -> LayerPlan:
        """The plan for layer ``name`` (dense float32 when the plan does not name it)."""
        return self.layers.get(name, LayerPlan())

    def check(self, registry: Registry, model: nn.Module) -> None:
        """Raise PlanError, naming the layer, for any impossible choice in this plan."""
        layers = compressible_layers(model, registry)
        for where, choice, stage in self._choices():
            method = resolve_choice(registry, choice, stage, where)
            if stage is Stage.STRUCTURE:
                name = where.removeprefix("layer `").removesuffix("`")
                if name not in layers:
                    known = ", ".join(layers) or "none"
                    raise PlanError(f"{where} is not a compressible layer; layers: {known}")
                if not registry.structure(method.name).applies(layers[name]):
                    raise PlanError(
                        f"{where}: method `{method.name}` does not apply to "
                        f"{type(layers[name]).__name__} layers"
                    )

    def _choices(self) -> list[tuple[str, Choice, Stage]]:
        found: list[tuple[str, Choice, Stage]] = []
        if self.model is not None:
            found.append(("model stage", self.model, Stage.MODEL))
        for name, layer in self.layers.items():
            found.append((f"layer `{name}`", layer.structure, Stage.STRUCTURE))
            found.append((f"layer `{name}` value stage", layer.value, Stage.VALUE))
        if self.encoding is not None:
            found.append(("encoding stage", self.encoding, Stage.ENCODING))
        return found


def resolve_choice(registry: Registry, choice: Choice, stage: Stage, where: str):
    """The method ``choice`` names, checked to be of ``stage`` and to accept its knobs
    (PlanError naming ``where`` otherwise)."""
    method = registry.methods.get(choice.method)
    if method is None:
        raise PlanError(f"{where}: unknown method `{choice.method}`")
    if method.stage != stage:
        raise PlanError(
            f"{where}: `{choice.method}` is a {method.stage} method, a {stage} one is needed"
        )
    try:
        method.config(choice.config)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"{where}: `{choice.method}.{field}`: {first['msg']}") from exc
    return method


def compressible_layers(model: nn.Module, registry: Registry) -> dict[str, nn.Module]:
    """Layers of ``model`` (by qualified name) that some registered structure method applies
    to. UsageError, naming the layer, for an Embedding whose ``max_norm`` or ``sparse`` no
    compressed table can honour."""
    methods = [m for m in registry.by_stage(Stage.STRUCTURE) if isinstance(m, StructureMethod)]
    found = {
        name: module
        for name, module in model.named_modules()
        if name and any(m.applies(module) for m in methods)
    }
    for name, module in found.items():
        check_embedding(name, module)
    return found
