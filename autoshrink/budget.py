"""Sizes before training: the smallest artifact a search space can express, so impossible
budgets fail before training, and starting plans tightened until they fit the budget.

Every knob of every method is tried at the corners of its range (both ends of a numeric
range, every choice of a categorical one); per layer the smallest structures are paired with
every value corner and the smallest pair is kept; the resulting plan is written as a real
artifact under each encoding choice, and its byte count is the answer. Sizes are monotonic
in the knobs of all built-in methods, so the corners hold the minimum.

:func:`fit_start` uses the same per-layer size model (a layer built, settled, restricted to
its values and encoded, without training) to tighten a starting plan that is over budget:
the layers holding the most bytes first, each by moving every numeric knob that changes its
size from the start's value toward the smaller end of the space's range, by bisection, until
the estimate is within the budget; a real artifact written without training confirms it.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn

from autoshrink.artifact import write_artifact
from autoshrink.compress import compress
from autoshrink.methods import ModelMethod, Stage, StructureMethod, ValueMethod
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.space import NONE, Space

if TYPE_CHECKING:
    from autoshrink.registry import Registry
    from autoshrink.tasks import Task

__all__ = ["fit_start", "smallest_artifact"]

_MAX_CORNERS = 64
_PAIRED = 2
#: Share of the budget a tightened start aims for: the header, the entropy coder and the
#: fine-tune move the final size a little.
_MARGIN = 0.95
_BISECTIONS = 7


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
            size = _file_bytes(compressed, plan, task, registry, width)
            if best is None or size < best[0]:
                best = (size, plan)
    assert best is not None
    return best


def _file_bytes(model: nn.Module, plan: Plan, task: Task, registry: Registry, width: float) -> int:
    """The byte count of ``model``'s artifact under ``plan``, written to a temporary file."""
    with tempfile.TemporaryDirectory() as folder:
        return write_artifact(
            Path(folder) / "probe.safetensors", model, plan, task, registry, width=width
        )


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


def _layer_bytes(module, layer: LayerPlan, registry: Registry) -> int:
    """The stored bytes of one layer under ``layer`` (before entropy coding), untrained."""
    structure = registry.methods[layer.structure.method]
    value = registry.methods[layer.value.method]
    assert isinstance(structure, StructureMethod) and isinstance(value, ValueMethod)
    s_config = structure.config(layer.structure.config)
    built = structure.build(copy.deepcopy(module), s_config)
    structure.settle(built, s_config)
    return _value_bytes(built, structure, s_config, value, value.config(layer.value.config))


def _toward(layer: LayerPlan, ends: dict[tuple[str, str], Any], share: float) -> LayerPlan:
    """``layer`` with each knob in ``ends`` (slot, knob) moved ``share`` of the way to its
    end (integers rounded toward it)."""
    updated = {}
    for slot in ("structure", "value"):
        choice = getattr(layer, slot)
        config = dict(choice.config)
        for (knob_slot, knob), end in ends.items():
            if knob_slot == slot:
                start = config[knob]
                moved = start + share * (end - start)
                config[knob] = round(moved) if isinstance(end, int) else moved
        updated[slot] = Choice(method=choice.method, config=config)
    return LayerPlan(**updated)


def _smaller_ends(module, layer: LayerPlan, space: Space, registry: Registry):
    """For each numeric knob of ``layer``'s methods whose range ends give different sizes,
    the end that gives the smaller layer."""
    ends: dict[tuple[str, str], Any] = {}
    for slot in ("structure", "value"):
        choice = getattr(layer, slot)
        for knob, dist in space.ranges[choice.method].items():
            if isinstance(dist, CategoricalDistribution):
                continue
            low, high = dist.low, dist.high  # type: ignore[attr-defined]
            sizes = [
                _layer_bytes(module, _toward(layer, {(slot, knob): end}, 1.0), registry)
                for end in (low, high)
            ]
            if sizes[0] != sizes[1]:
                ends[(slot, knob)] = low if sizes[0] < sizes[1] else high
    return ends


def fit_start(
    plan: Plan, task: Task, space: Space, registry: Registry, budget: int, baseline: nn.Module
) -> Plan | None:
    """``plan`` itself when its artifact from ``baseline`` (or from the untrained student its
    model stage asks for) fits ``budget``, else a tightened copy that does, keeping its
    methods; ``None`` when no setting of its methods fits."""
    width, model = 1.0, baseline
    if plan.model is not None:
        method = registry.method(plan.model.method, Stage.MODEL)
        assert isinstance(method, ModelMethod)
        width = method.width(method.config(plan.model.config))
        model = task.build_model(width)

    def real_bytes(candidate: Plan) -> int:
        return _file_bytes(compress(model, candidate, registry), candidate, task, registry, width)

    size = real_bytes(plan)
    if size <= budget:
        return plan
    target = int(budget * _MARGIN)
    for _ in range(3):
        fitted = _tighten(plan, model, space, registry, target)
        if fitted is None:
            return None
        size = real_bytes(fitted)
        if size <= budget:
            return fitted
        target -= size - budget
    return None


def _tighten(plan: Plan, model, space: Space, registry: Registry, target: int) -> Plan | None:
    layers = dict(plan.layers)
    known: dict[tuple[str, str], int] = {}

    def size_of(name: str, layer: LayerPlan) -> int:
        key = (name, layer.model_dump_json())
        if key not in known:
            known[key] = _layer_bytes(model.get_submodule(name), layer, registry)
        return known[key]

    sizes = {name: size_of(name, layers[name]) for name in layers}
    for name in sorted(layers, key=lambda n: sizes[n], reverse=True):
        rest = sum(sizes.values()) - sizes[name]
        if rest + sizes[name] <= target:
            break
        ends = _smaller_ends(model.get_submodule(name), layers[name], space, registry)
        low, high = 0.0, 1.0  # bisect the least tightening that fits
        if rest + size_of(name, _toward(layers[name], ends, high)) <= target:
            for _ in range(_BISECTIONS):
                middle = (low + high) / 2
                if rest + size_of(name, _toward(layers[name], ends, middle)) <= target:
                    high = middle
                else:
                    low = middle
        layers[name] = _toward(layers[name], ends, high)
        sizes[name] = size_of(name, layers[name])
    if sum(sizes.values()) > target:
        return None
    return Plan(model=plan.model, layers=layers, encoding=plan.encoding)
