"""The smallest artifact a search space can express, so impossible budgets fail before training.

Every knob of every method is tried at the corners of its range (both ends of a numeric
range, every choice of a categorical one); per layer the smallest structures are paired with
every value corner and the smallest pair is kept; the resulting plan is written as a real
artifact under each encoding choice, and its byte count is the answer. Sizes are monotonic
in the knobs of all built-in methods, so the corners hold the minimum.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution

from autoshrink.artifact import write_artifact
from autoshrink.compress import compress
from autoshrink.methods import ModelMethod, Stage, StructureMethod, ValueMethod
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.space import NONE, Space

if TYPE_CHECKING:
    from autoshrink.plugins import Registry
    from autoshrink.tasks import Task

__all__ = ["smallest_artifact"]

_MAX_CORNERS = 64
_PAIRED = 2


def corners(ranges: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Every combination of each knob's extreme values (capped at 64 combinations)."""
    options = []
    for name, dist in ranges.items():
        if isinstance(dist, CategoricalDistribution):
            values = list(dist.choices)
        else:
            values = [dist.low, dist.high]  # type: ignore[attr-defined]
        options.append([(name, v) for v in values])
    combos = [dict(c) for c in itertools.product(*options)]
    return combos[:_MAX_CORNERS]


def _structure_candidates(module, layer, space: Space, registry: Registry) -> list:
    """Each structure corner built once, smallest (with float32 payloads) first."""
    built = []
    for s_name in layer.structure:
        structure = registry.methods[s_name]
        assert isinstance(structure, StructureMethod)
        for values in corners(space.ranges[s_name]):
            config = structure.config(values)
            compressed = structure.build(copy.deepcopy(module), config)
            structure.settle(compressed, config)
            code = structure.encode(compressed, config)
            size = sum(a.nbytes for a in code.arrays.values())
            size += sum(t.numel() * 4 for t in code.payloads.values())
            built.append((size, s_name, values, compressed))
    return sorted(built, key=lambda c: c[0])


def _value_bytes(compressed, structure: StructureMethod, s_config, value: ValueMethod, v_config):
    compressed = copy.deepcopy(compressed)
    for payload in structure.payload_names(compressed):
        value.apply(compressed, payload, v_config)
    code = structure.encode(compressed, s_config)
    size = sum(a.nbytes for a in code.arrays.values())
    for tensor in code.payloads.values():
        arrays, _ = value.encode(tensor.detach(), v_config)
        size += sum(a.nbytes for a in arrays.values())
    return size


def smallest_artifact(task: Task, space: Space, registry: Registry) -> tuple[int, Plan]:
    """The byte count of the smallest artifact ``space`` can express, and its plan."""
    best: tuple[int, Plan] | None = None
    for model_choice in _model_choices(space, registry):
        width = 1.0
        if model_choice is not None:
            method = registry.method(model_choice.method, Stage.MODEL)
            assert isinstance(method, ModelMethod)
            width = method.width(method.config(model_choice.config))
        model = task.build_model(width)
        layers = {}
        for layer in space.layers:
            module = model.get_submodule(layer.name)
            candidates = []
            # The value stage shrinks what the structure stores, so only the few smallest
            # structures need pairing with every value corner.
            for _, s_name, s_values, built in _structure_candidates(module, layer, space, registry)[
                :_PAIRED
            ]:
                structure = registry.methods[s_name]
                assert isinstance(structure, StructureMethod)
                s_config = structure.config(s_values)
                for v_name in layer.value:
                    value = registry.methods[v_name]
                    assert isinstance(value, ValueMethod)
                    for v_values in corners(space.ranges[v_name]):
                        size = _value_bytes(
                            built, structure, s_config, value, value.config(v_values)
                        )
                        plan = LayerPlan(
                            structure=Choice(method=s_name, config=s_values),
                            value=Choice(method=v_name, config=v_values),
                        )
                        candidates.append((size, plan))
            layers[layer.name] = min(candidates, key=lambda c: c[0])[1]
        compressed = compress(model, Plan(model=model_choice, layers=layers), registry)
        for encoding in _encoding_choices(space):
            plan = Plan(model=model_choice, layers=layers, encoding=encoding)
            with tempfile.TemporaryDirectory() as folder:
                size = write_artifact(
                    Path(folder) / "smallest.safetensors",
                    compressed,
                    plan,
                    task,
                    registry,
                    width=width,
                )
            if best is None or size < best[0]:
                best = (size, plan)
    assert best is not None
    return best


def _model_choices(space: Space, registry: Registry) -> list[Choice | None]:
    """The model-stage choice with the narrowest student (widths shrink every layer)."""
    narrowest: tuple[float, Choice | None] = (float("inf"), None)
    for name in space.model:
        if name == NONE:
            narrowest = min(narrowest, (1.0, None), key=lambda c: c[0])
            continue
        method = registry.methods[name]
        assert isinstance(method, ModelMethod)
        for values in corners(space.ranges[name]):
            width = method.width(method.config(values))
            if width < narrowest[0]:
                narrowest = (width, Choice(method=name, config=values))
    return [narrowest[1]]


def _encoding_choices(space: Space) -> list[Choice | None]:
    choices: list[Choice | None] = []
    for name in space.encoding:
        if name == NONE:
            choices.append(None)
        else:
            choices.extend(Choice(method=name, config=v) for v in corners(space.ranges[name]))
    return choices
