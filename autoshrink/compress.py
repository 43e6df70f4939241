"""Building the trainable compressed model a plan describes.

Like Deep Compression's pipeline, the per-layer stages apply in two steps so that a trial can
retrain in between: :func:`apply_structure` (prune / hash / factorise, weights still free),
then :func:`apply_values` (quantize the retrained payloads; only what the value method leaves
trainable, e.g. the k-means codebook, trains after that).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from autoshrink.methods import Stage, StructureMethod, ValueMethod
from autoshrink.plan import Plan, compressible_layers

if TYPE_CHECKING:
    from autoshrink.plugins import Registry

__all__ = ["apply_structure", "apply_values", "compress", "replace_module"]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_structure(model: nn.Module, plan: Plan, registry: Registry) -> nn.Module:
    """A copy of ``model`` with every compressible layer replaced by its structure method's
    trainable module. Returns the copy; ``model`` is left alone."""
    plan.check(registry, model)
    model = copy.deepcopy(model)
    for name, layer in compressible_layers(model, registry).items():
        choice = plan.layer(name).structure
        structure = registry.method(choice.method, Stage.STRUCTURE)
        assert isinstance(structure, StructureMethod)
        replace_module(model, name, structure.build(layer, structure.config(choice.config)))
    return model


def apply_values(model: nn.Module, plan: Plan, registry: Registry, layers: list[str]) -> None:
    """In place: restrict the payloads of each structured layer in ``layers`` to the values
    its value method can store."""
    for name in layers:
        choice = plan.layer(name)
        structure = registry.method(choice.structure.method, Stage.STRUCTURE)
        value = registry.method(choice.value.method, Stage.VALUE)
        assert isinstance(structure, StructureMethod) and isinstance(value, ValueMethod)
        module = model.get_submodule(name)
        config = value.config(choice.value.config)
        for payload in structure.payload_names(module):
            value.apply(module, payload, config)


def compress(model: nn.Module, plan: Plan, registry: Registry) -> nn.Module:
    """Both steps at once: a trainable compressed copy of ``model`` as ``plan`` describes."""
    layers = list(compressible_layers(model, registry))
    compressed = apply_structure(model, plan, registry)
    apply_values(compressed, plan, registry, layers)
    return compressed
