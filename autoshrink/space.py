"""Space: every compressible layer x every registered method's knobs, as Optuna distributions.

Parameter names: ``model.method``, ``model.<method>.<field>``, ``layer.<name>.structure``,
``layer.<name>.<method>.<field>``, ``layer.<name>.value``, ``encoding.method`` and
``encoding.<method>.<field>``. Presets in ``search_spaces/*.toml`` can only narrow it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from torch import nn

from autoshrink.errors import UsageError, first_line
from autoshrink.knobs import config_distributions, describe, suggest
from autoshrink.methods import Stage, StructureMethod
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = ["LayerSpace", "Preset", "Space", "build_space", "load_preset", "params_of"]

NONE = "none"


@dataclass(frozen=True)
class Preset:
    """A parsed preset: which methods each layer type may use and narrowed ranges."""

    name: str
    data: dict[str, Any]
    text: str

    def line(self, *keys: str) -> int:
        """The line of ``keys`` (a table path then a key) in the preset's text, for errors."""
        table, key, current = ".".join(keys[:-1]), keys[-1], ""
        fallback = 1
        for number, raw in enumerate(self.text.splitlines(), start=1):
            line = raw.strip()
            header = re.match(r"^\[([^\]]+)\]", line)
            if header:
                current = header.group(1).strip()
                if current == ".".join(keys):
                    fallback = number
                continue
            if current == table and re.match(rf"^\"?{re.escape(key)}\"?\s*=", line):
                return number
            if current == table and fallback == 1:
                fallback = number
        return fallback

    def error(self, keys: tuple[str, ...], message: str) -> UsageError:
        return UsageError(f"{self.name} line {self.line(*keys)}: `{'.'.join(keys)}` {message}")


def load_preset(name: str) -> Preset:
    """A preset by built-in name (``search_spaces/<name>.toml``) or by path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{label}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from exc
        except OSError as exc:
            raise UsageError(f"{label}: cannot read it: {exc.strerror or exc}") from exc
    else:
        builtin = resources.files("autoshrink_search_spaces") / f"{name}.toml"
        if not builtin.is_file():
            raise UsageError(f"unknown search-space preset `{name}`; built-in: {preset_names()}")
        text, label = builtin.read_text(), f"search_spaces/{name}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{label}: invalid TOML: {exc}") from exc
    return Preset(name=label, data=data, text=text)


def preset_names() -> str:
    """The built-in presets, comma separated."""
    folder = resources.files("autoshrink_search_spaces")
    return ", ".join(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


@dataclass(frozen=True)
class LayerSpace:
    """The choices for one compressible layer."""

    name: str
    kind: str
    structure: tuple[str, ...]
    value: tuple[str, ...]


@dataclass
class Space:
    """The per-layer search space. :meth:`sample` turns an Optuna trial into a Plan."""

    model: tuple[str, ...]
    layers: list[LayerSpace]
    encoding: tuple[str, ...]
    ranges: dict[str, dict[str, BaseDistribution]] = field(default_factory=dict)
    #: plans the search evaluates first (the preset's ``[[start]]`` entries that fit)
    starts: list[Plan] = field(default_factory=list)
    #: what was left out of the space and why, for ``autoshrink space`` and the report
    notes: list[str] = field(default_factory=list)

    def sample(self, trial: optuna.Trial) -> Plan:
        """Define-by-run: model stage, then per layer structure and value, then encoding."""
        model = self._pick(trial, "model", self.model)
        layers = {}
        for layer in self.layers:
            prefix = f"layer.{layer.name}"
            structure = self._pick(trial, prefix, layer.structure, "structure")
            value = self._pick(trial, prefix, layer.value, "value")
            assert structure is not None and value is not None
            layers[layer.name] = LayerPlan(structure=structure, value=value)
        encoding = self._pick(trial, "encoding", self.encoding)
        return Plan(model=model, layers=layers, encoding=encoding)

    def _pick(
        self, trial: optuna.Trial, prefix: str, choices: tuple[str, ...], slot: str = "method"
    ) -> Choice | None:
        name = (
            choices[0]
            if len(choices) == 1
            else trial.suggest_categorical(f"{prefix}.{slot}", choices)
        )
        if name == NONE:
            return None
        config = {
            knob: suggest(trial, f"{prefix}.{name}.{knob}", dist)
            for knob, dist in self.ranges[name].items()
        }
        return Choice(method=name, config=config)

    def rows(self) -> list[tuple[str, str]]:
        """(parameter name, its range) for every parameter, for ``autoshrink space``."""
        out: list[tuple[str, str]] = []

        def add(prefix: str, choices: tuple[str, ...], slot: str) -> None:
            out.append((f"{prefix}.{slot}", " | ".join(choices)))
            for name in choices:
                for knob, dist in self.ranges.get(name, {}).items():
                    out.append((f"{prefix}.{name}.{knob}", describe(dist)))

        add("model", self.model, "method")
        for layer in self.layers:
            add(f"layer.{layer.name}", layer.structure, "structure")
            add(f"layer.{layer.name}", layer.value, "value")
        add("encoding", self.encoding, "method")
        return out


def params_of(space: Space, plan: Plan) -> dict[str, Any] | None:
    """The trial parameters under which :meth:`Space.sample` gives ``plan``, or None when the
    plan does not fit the space (a method or knob value outside it, or a knob left out)."""
    params: dict[str, Any] = {}

    def put(prefix: str, slot: str, choices: tuple[str, ...], choice: Choice | None) -> bool:
        name = NONE if choice is None else choice.method
        if name not in choices:
            return False
        if len(choices) > 1:
            params[f"{prefix}.{slot}"] = name
        if choice is None:
            return True
        for knob, dist in space.ranges[name].items():
            value = choice.config.get(knob)
            if value is None or not dist._contains(dist.to_internal_repr(value)):
                return False
            params[f"{prefix}.{name}.{knob}"] = value
        return True

    fits = put("model", "method", space.model, plan.model)
    for layer in space.layers:
        chosen = plan.layer(layer.name)
        prefix = f"layer.{layer.name}"
        fits = fits and put(prefix, "structure", layer.structure, chosen.structure)
        fits = fits and put(prefix, "value", layer.value, chosen.value)
    fits = fits and put("encoding", "method", space.encoding, plan.encoding)
    return params if fits else None


def _narrow(preset: Preset, keys: tuple[str, ...], dist: BaseDistribution, value: Any):
    if isinstance(dist, CategoricalDistribution):
        wanted = value if isinstance(value, list) else [value]
        extra = [v for v in wanted if v not in dist.choices]
        if extra or not wanted:
            raise preset.error(keys, f"= {value!r} is not a subset of {describe(dist)}")
        return CategoricalDistribution(tuple(wanted))
    assert isinstance(dist, IntDistribution | FloatDistribution)
    if not (isinstance(value, list) and len(value) == 2 and value[0] <= value[1]):
        raise preset.error(keys, f"= {value!r}: expected [low, high] within {describe(dist)}")
    low, high = value
    if low < dist.low or high > dist.high:
        raise preset.error(
            keys, f"= {value!r} widens the schema's range {describe(dist)}; narrow it to fit"
        )
    if isinstance(dist, IntDistribution):
        return IntDistribution(int(low), int(high), log=dist.log)
    return FloatDistribution(float(low), float(high), log=dist.log)


def _allowed(
    preset: Preset | None, keys: tuple[str, ...], registered: list[str], extra: tuple[str, ...]
) -> tuple[str, ...]:
    if preset is None:
        return (*extra, *registered)
    node: Any = preset.data
    for key in keys:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    if node == {}:
        return (*extra, *registered)
    if not isinstance(node, list) or not node:
        raise preset.error(keys, "must be a non-empty list of method names")
    for name in node:
        if name not in registered and name not in extra:
            options = ", ".join((*extra, *registered))
            raise preset.error(keys, f"names unknown method `{name}`; choose from {options}")
    return tuple(node)


_PRESET_KEYS = {"description", "model", "encoding", "layers", "ranges", "start"}


def build_space(
    model: nn.Module, registry: Registry, preset: Preset | None = None, *, narrows: bool = True
) -> Space:
    """The space for ``model``'s compressible layers and the registered methods; without
    ``narrows`` (no narrower model can be built) the model stage is left out."""
    if preset is not None:
        for key in preset.data:
            if key not in _PRESET_KEYS:
                raise preset.error((key,), f"is not a preset key; use {sorted(_PRESET_KEYS)}")
    ranges = {
        m.name: config_distributions(m.Config, owner=m.name) for m in registry.methods.values()
    }
    if preset is not None:
        for method_name, knobs in preset.data.get("ranges", {}).items():
            if method_name not in ranges:
                raise preset.error(("ranges", method_name), "names an unknown method")
            for knob, value in knobs.items():
                keys = ("ranges", method_name, knob)
                if knob not in ranges[method_name]:
                    known = ", ".join(ranges[method_name]) or "no knobs"
                    raise preset.error(keys, f"is not a knob of `{method_name}` ({known})")
                ranges[method_name][knob] = _narrow(preset, keys, ranges[method_name][knob], value)

    def names(stage: Stage) -> list[str]:
        return [m.name for m in registry.by_stage(stage)]

    layers = []
    for name, layer in compressible_layers(model, registry).items():
        kind = type(layer).__name__
        fits = [
            m.name
            for m in registry.by_stage(Stage.STRUCTURE)
            if isinstance(m, StructureMethod) and m.applies(layer)
        ]
        structure = _allowed(preset, ("layers", kind, "structure"), fits, ())
        for method_name in structure:
            method = registry.methods[method_name]
            if isinstance(method, StructureMethod) and not method.applies(layer):
                raise preset.error(  # type: ignore[union-attr]
                    ("layers", kind, "structure"), f"`{method_name}` does not apply to {kind}"
                )
        value = _allowed(preset, ("layers", kind, "value"), names(Stage.VALUE), ())
        layers.append(LayerSpace(name=name, kind=kind, structure=structure, value=value))
    space = Space(
        model=_allowed(preset, ("model",), names(Stage.MODEL), (NONE,)) if narrows else [NONE],
        layers=layers,
        encoding=_allowed(preset, ("encoding",), names(Stage.ENCODING), (NONE,)),
        ranges=ranges,
    )
    if preset is not None:
        space.starts = _starts(preset, space, registry)
    if not narrows and names(Stage.MODEL):
        space.notes.append(
            f"model stage ({', '.join(names(Stage.MODEL))}) left out: this model cannot be "
            "built narrower; pass `student=callable(width)` to search distillation"
        )
    return space


def _with_defaults(plan: Plan, registry: Registry) -> Plan:
    """``plan`` with every knob it leaves out set to its method's default, so that a start
    written before a method gained a knob still fits the space."""

    def full(choice: Choice | None) -> Choice | None:
        if choice is None:
            return None
        config = registry.methods[choice.method].config(choice.config)
        return Choice(method=choice.method, config=config.model_dump(mode="json"))

    layers = {
        name: LayerPlan(structure=full(layer.structure), value=full(layer.value))
        for name, layer in plan.layers.items()
    }
    return Plan(model=full(plan.model), layers=layers, encoding=full(plan.encoding))


def _starts(preset: Preset, space: Space, registry: Registry) -> list[Plan]:
    """The preset's ``[[start]]`` plans: ``model``, ``encoding``, ``every_layer`` (a
    structure and value choice applied to each layer) and optionally ``last_layer`` (the
    choice for the model's last compressible layer instead: the output layer is small and
    decides every prediction, so quantization papers keep it finer), with full knob values.
    A start that names an unknown method is an error; one that does not fit this task's
    space is skipped.
    """
    starts = []
    names = [layer.name for layer in space.layers]
    for number, entry in enumerate(preset.data.get("start", [])):
        keys = ("start",)
        try:
            every = LayerPlan.model_validate(entry.get("every_layer", {}))
            last = LayerPlan.model_validate(entry.get("last_layer", every.model_dump()))
            plan = Plan(
                model=entry.get("model"),
                encoding=entry.get("encoding"),
                layers={name: last if name == names[-1] else every for name in names},
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise preset.error(keys, f"entry {number + 1} is not a plan: {exc}") from exc
        for choice in (plan.model, plan.encoding, every.structure, every.value, last.structure,
                       last.value):
            if choice is not None and choice.method not in registry.methods:
                raise preset.error(keys, f"entry {number + 1} names unknown `{choice.method}`")
        try:
            plan = _with_defaults(plan, registry)
        except ValueError as exc:
            raise preset.error(keys, f"entry {number + 1}: {first_line(exc)}") from exc
        if params_of(space, plan) is not None:
            starts.append(plan)
    return starts
