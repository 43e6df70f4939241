"""Sizes before training: the smallest artifact a search space can express, so impossible
budgets fail before training, and starting plans tightened until they fit the budget.

Every knob of every method is tried at the corners of its range (both ends of a numeric
range, every choice of a categorical one); per layer the smallest structures are paired with
every value corner and the smallest pair is kept; the resulting plan is written as a real
artifact under each encoding choice, and its byte count is the answer. Sizes are monotonic
in the knobs of all built-in methods, so the corners hold the minimum.

:func:`tighten_to_fit` uses the same per-layer size model (a layer built, settled,
restricted to its values and encoded, without training) to tighten a plan that is over
budget (a starting plan, or one the sampler asked for): the layers holding the most bytes
first, each by moving every numeric knob that changes its size from the plan's value toward
the smaller end of the space's range, by bisection, until the layers' estimate is down to
the budget's share of the file; a real artifact written without training confirms it.
"""

from __future__ import annotations

import copy
import itertools
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn

from autoshrink.artifact import encode_layer, write_artifact
from autoshrink.compress import compress, restrict_values
from autoshrink.methods import MethodConfig, StructureMethod
from autoshrink.pipeline import LayerStep, layer_step, plan_width
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.space import NONE, Space

if TYPE_CHECKING:
    from autoshrink.registry import Registry
    from autoshrink.tasks import Task

__all__ = ["FIGURE_SHAPE", "smallest_artifact", "tighten_to_fit"]

_MAX_CORNERS = 64
_PAIRED = 2
#: Share of the budget a tightened start aims for: the header, the entropy coder and the
#: fine-tune move the final size a little.
_MARGIN = 0.95
_BISECTIONS = 7
#: What a trained artifact's header records, with a stand-in figure of a float's full length,
#: so that bytes measured before training count the header as it will be.
FIGURE_SHAPE = {"val_accuracy": math.pi / 4}


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


def _built(module: nn.Module, structure: StructureMethod, config: MethodConfig) -> nn.Module:
    """``module`` (left alone) built by ``structure`` and settled, untrained."""
    built = structure.build(copy.deepcopy(module), config)
    structure.settle(built, config)
    return built


def _structure_candidates(module, layer, space: Space, registry: Registry) -> list:
    """Each structure corner built once, smallest (with float32 payloads) first."""
    built = []
    for s_name in layer.structure:
        structure = registry.structure(s_name)
        for values in corners(space.ranges[s_name]):
            config = structure.config(values)
            compressed = _built(module, structure, config)
            code = structure.encode(compressed, config)
            size = sum(a.nbytes for a in code.arrays.values())
            size += sum(t.numel() * 4 for t in code.payloads.values())
            built.append((size, s_name, values, compressed))
    return sorted(built, key=lambda c: c[0])


def _value_bytes(built: nn.Module, step: LayerStep) -> int:
    """The stored bytes (before entropy coding) of ``built``, a layer built and settled by
    ``step``'s structure, once a copy is restricted to its values."""
    restricted = copy.deepcopy(built)
    restrict_values(restricted, step)
    _, arrays = encode_layer(restricted, step)
    return sum(a.nbytes for a in arrays.values())


def smallest_artifact(task: Task, space: Space, registry: Registry) -> tuple[int, Plan]:
    """The byte count of the smallest artifact ``space`` can express, and its plan."""
    best: tuple[int, Plan] | None = None
    for model_choice in _model_choices(space, registry):
        width = plan_width(model_choice, registry)
        model = task.build_model(width)
        layers = {}
        for layer in space.layers:
            module = model.get_submodule(layer.name)
            candidates = []
            # The value stage shrinks what the structure stores, so only the few smallest
            # structures need pairing with every value corner.
            structures = _structure_candidates(module, layer, space, registry)[:_PAIRED]
            for _, s_name, s_values, built in structures:
                for v_name in layer.value:
                    for v_values in corners(space.ranges[v_name]):
                        plan = LayerPlan(
                            structure=Choice(method=s_name, config=s_values),
                            value=Choice(method=v_name, config=v_values),
                        )
                        step = layer_step(layer.name, module, plan, registry)
                        candidates.append((_value_bytes(built, step), plan))
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
            Path(folder) / "probe.safetensors", model, plan, task, registry, width=width,
            info=FIGURE_SHAPE,
        )


def _model_choices(space: Space, registry: Registry) -> list[Choice | None]:
    """The model-stage choice with the narrowest student (widths shrink every layer)."""
    narrowest: tuple[float, Choice | None] = (float("inf"), None)
    for name in space.model:
        if name == NONE:
            narrowest = min(narrowest, (1.0, None), key=lambda c: c[0])
            continue
        method = registry.model(name)
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


def _layer_bytes(name: str, module: nn.Module, layer: LayerPlan, registry: Registry) -> int:
    """The stored bytes of layer ``name`` under ``layer`` (before entropy coding), untrained."""
    step = layer_step(name, module, layer, registry)
    return _value_bytes(_built(module, step.structure, step.structure_config), step)


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
                # clamped between the two: float rounding must not step past the range's end
                moved = min(max(start + share * (end - start), min(start, end)), max(start, end))
                config[knob] = round(moved) if isinstance(end, int) else moved
        updated[slot] = Choice(method=choice.method, config=config)
    return LayerPlan(**updated)


def _smaller_ends(name: str, module, layer: LayerPlan, space: Space, registry: Registry):
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
                _layer_bytes(name, module, _toward(layer, {(slot, knob): end}, 1.0), registry)
                for end in (low, high)
            ]
            if sizes[0] != sizes[1]:
                ends[(slot, knob)] = low if sizes[0] < sizes[1] else high
    return ends


def tighten_to_fit(
    plan: Plan, task: Task, space: Space, registry: Registry, budget: int, baseline: nn.Module,
    *, size: int | None = None,
) -> Plan | None:
    """``plan`` itself when its artifact from ``baseline`` (or from the untrained student its
    model stage asks for) fits ``budget``, else a tightened copy that does, keeping its
    methods; ``None`` when no setting of its methods fits. ``size``: the plan's bytes when
    the caller has measured them already (an untrained student's k-means codebooks, and so
    its bytes, vary a little with its initial weights: a second measure may differ)."""
    width = plan_width(plan.model, registry)
    model = baseline if plan.model is None else task.build_model(width)

    def real_bytes(candidate: Plan) -> int:
        return _file_bytes(compress(model, candidate, registry), candidate, task, registry, width)

    size = real_bytes(plan) if size is None else size
    if size <= budget:
        return plan
    # The file scales with its layers' stored bytes (a header and the unplanned parameters
    # add a little, an entropy coder takes some away): aim the layers at the budget's share.
    share = budget * _MARGIN / size
    for _ in range(3):
        fitted = _tighten(plan, model, space, registry, share)
        if fitted is None:
            return None
        size = real_bytes(fitted)
        if size <= budget:
            return fitted
        share *= budget * _MARGIN / size
    return None


def _tighten(plan: Plan, model, space: Space, registry: Registry, share: float) -> Plan | None:
    """``plan`` with its layers' stored bytes at most ``share`` of what they are, or None."""
    layers = dict(plan.layers)
    known: dict[tuple[str, str], int] = {}

    def size_of(name: str, layer: LayerPlan) -> int:
        key = (name, layer.model_dump_json())
        if key not in known:
            known[key] = _layer_bytes(name, model.get_submodule(name), layer, registry)
        return known[key]

    sizes = {name: size_of(name, layers[name]) for name in layers}
    target = sum(sizes.values()) * share
    for name in sorted(layers, key=lambda n: sizes[n], reverse=True):
        rest = sum(sizes.values()) - sizes[name]
        if rest + sizes[name] <= target:
            break
        ends = _smaller_ends(name, model.get_submodule(name), layers[name], space, registry)
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
