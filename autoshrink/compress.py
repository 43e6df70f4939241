"""Building the trainable compressed model a plan describes.

Like Deep Compression's pipeline, the per-layer stages apply in two steps so that a trial can
retrain in between: :func:`apply_structure` (prune / hash / factorise, weights still free),
then :func:`apply_values` (quantize the retrained payloads; only what the value method leaves
trainable, e.g. the k-means codebook, trains after that). While the structure retrains,
:func:`structure_schedule` lets each structure method tighten its layer step by step
(gradual pruning); :func:`apply_values` first settles every structure to its final form.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from torch import nn

from autoshrink.methods import MethodConfig, Stage, StructureMethod, ValueMethod
from autoshrink.plan import Plan, compressible_layers

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = [
    "apply_structure", "apply_values", "compress", "replace_module", "structure_schedule",
]


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


def _structures(
    model: nn.Module, plan: Plan, registry: Registry, layers: list[str]
) -> Iterator[tuple[str, nn.Module, StructureMethod, MethodConfig]]:
    """Each structured layer of ``layers`` with its structure method and validated config."""
    for name in layers:
        choice = plan.layer(name).structure
        structure = registry.method(choice.method, Stage.STRUCTURE)
        assert isinstance(structure, StructureMethod)
        yield name, model.get_submodule(name), structure, structure.config(choice.config)


def structure_schedule(
    model: nn.Module, plan: Plan, registry: Registry, layers: list[str]
) -> Callable[[float], None]:
    """A callback for the structure's fine-tune: ``callback(progress)`` after each step lets
    every layer's structure method tighten it (:meth:`StructureMethod.step`)."""
    found = list(_structures(model, plan, registry, layers))

    def step(progress: float) -> None:
        for _, module, structure, config in found:
            structure.step(module, config, progress)

    return step


def apply_values(model: nn.Module, plan: Plan, registry: Registry, layers: list[str]) -> None:
    """In place: settle each structured layer in ``layers`` to its final structure, then
    restrict its payloads to the values its value method can store."""
    for name, module, structure, structure_config in _structures(model, plan, registry, layers):
        structure.settle(module, structure_config)
        choice = plan.layer(name).value
        value = registry.method(choice.method, Stage.VALUE)
        assert isinstance(value, ValueMethod)
        config = value.config(choice.config)
        for payload in structure.payload_names(module):
            value.apply(module, payload, config)


def compress(model: nn.Module, plan: Plan, registry: Registry) -> nn.Module:
    """Both steps at once: a trainable compressed copy of ``model`` as ``plan`` describes."""
    layers = list(compressible_layers(model, registry))
    compressed = apply_structure(model, plan, registry)
    apply_values(compressed, plan, registry, layers)
    return compressed
