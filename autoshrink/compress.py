"""Building the trainable compressed model a plan describes.

Like Deep Compression's pipeline, the per-layer stages apply in two steps so that a trial can
retrain in between: :func:`apply_structure` (prune / hash / factorise, weights still free),
then :func:`apply_values` (quantize the retrained payloads; only what the value method leaves
trainable, e.g. the k-means codebook, trains after that). While the structure retrains,
:func:`structure_schedule` lets each structure method tighten its layer step by step
(gradual pruning); :func:`apply_values` first settles every structure to its final form.
Each takes the plan resolved once against the uncompressed model
(:func:`autoshrink.pipeline.resolve_plan`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from autoshrink.pipeline import LayerStep, Pipeline, resolve_plan
from autoshrink.plan import Plan

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = [
    "apply_structure", "apply_values", "compress", "replace_module", "restrict_values",
    "structure_schedule",
]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_structure(model: nn.Module, pipeline: Pipeline) -> nn.Module:
    """A copy of ``model`` with every layer of ``pipeline`` (resolved against ``model``)
    replaced by its structure method's trainable module; ``model`` is left alone."""
    model = copy.deepcopy(model)
    for step in pipeline.layers:
        layer = model.get_submodule(step.name)
        replace_module(model, step.name, step.structure.build(layer, step.structure_config))
    return model


def structure_schedule(model: nn.Module, pipeline: Pipeline) -> Callable[[float], None]:
    """A callback for the structure's fine-tune of ``model`` (made by :func:`apply_structure`):
    ``callback(progress)`` after each step lets every layer's structure method tighten it
    (:meth:`StructureMethod.step`)."""
    found = [(model.get_submodule(step.name), step) for step in pipeline.layers]

    def tighten(progress: float) -> None:
        for module, step in found:
            step.structure.step(module, step.structure_config, progress)

    return tighten


def restrict_values(module: nn.Module, step: LayerStep) -> None:
    """In place: restrict the payloads of one settled structured layer to the values its
    value method can store."""
    for payload in step.structure.payload_names(module):
        step.value.apply(module, payload, step.value_config)


def apply_values(model: nn.Module, pipeline: Pipeline) -> None:
    """In place: settle each layer of ``model`` (made by :func:`apply_structure`) to its final
    structure, then restrict its payloads (:func:`restrict_values`)."""
    for step in pipeline.layers:
        module = model.get_submodule(step.name)
        step.structure.settle(module, step.structure_config)
        restrict_values(module, step)


def compress(model: nn.Module, plan: Plan, registry: Registry) -> nn.Module:
    """Both steps at once: a trainable compressed copy of ``model`` as ``plan`` describes."""
    pipeline = resolve_plan(plan, model, registry)
    compressed = apply_structure(model, pipeline)
    apply_values(compressed, pipeline)
    return compressed
