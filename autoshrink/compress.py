"""Building the trainable compressed model a plan describes."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from autoshrink.methods import Stage, StructureMethod, ValueMethod
from autoshrink.plan import Plan, compressible_layers

if TYPE_CHECKING:
    from autoshrink.plugins import Registry

__all__ = ["compress", "replace_module"]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def compress(model: nn.Module, plan: Plan, registry: Registry) -> nn.Module:
    """A copy of ``model`` with every compressible layer replaced by its structure method's
    module, whose payloads the layer's value method then restricts. Still trainable."""
    plan.check(registry, model)
    model = copy.deepcopy(model)
    for name, layer in compressible_layers(model, registry).items():
        choice = plan.layer(name)
        structure = registry.method(choice.structure.method, Stage.STRUCTURE)
        value = registry.method(choice.value.method, Stage.VALUE)
        assert isinstance(structure, StructureMethod) and isinstance(value, ValueMethod)
        module = structure.build(layer, structure.config(choice.structure.config))
        value_config = value.config(choice.value.config)
        for payload in structure.payload_names(module):
            value.apply(module, payload, value_config)
        replace_module(model, name, module)
    return model
