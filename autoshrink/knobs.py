"""A method's knobs as Optuna distributions: the searchable range of each field of its
``Config``, how a trial draws it, and how it reads in a table."""

from __future__ import annotations

import typing
from typing import Any

import annotated_types
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import BaseModel

__all__ = ["config_distributions", "describe", "suggest"]


def config_distributions(config: type[BaseModel], owner: str) -> dict[str, BaseDistribution]:
    """The searchable range of each knob of a method's Config.

    ``Literal`` and ``bool`` fields become categorical; ``int`` and ``float`` fields need both
    bounds (``ge``/``le``, or ``gt``/``lt`` for floats). ``json_schema_extra={"log": True}``
    asks for a log scale. Raises ValueError for a field that cannot be searched.
    """
    found: dict[str, BaseDistribution] = {}
    for name, info in config.model_fields.items():
        annotation = info.annotation
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if typing.get_origin(annotation) is typing.Literal:
            found[name] = CategoricalDistribution(typing.get_args(annotation))
            continue
        if annotation is bool:
            found[name] = CategoricalDistribution((False, True))
            continue
        low = high = None
        for bound in info.metadata:
            if isinstance(bound, annotated_types.Ge | annotated_types.Gt):
                low = bound.ge if isinstance(bound, annotated_types.Ge) else bound.gt
            if isinstance(bound, annotated_types.Le | annotated_types.Lt):
                high = bound.le if isinstance(bound, annotated_types.Le) else bound.lt
        if annotation not in (int, float) or low is None or high is None:
            raise ValueError(
                f"`{owner}.{name}` is not searchable: use a Literal, a bool, or an int/float "
                "with both bounds (Field(ge=..., le=...))"
            )
        log = bool(extra.get("log", False))
        if annotation is int:
            found[name] = IntDistribution(int(low), int(high), log=log)
        else:
            found[name] = FloatDistribution(float(low), float(high), log=log)
    return found


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Ask ``trial`` for ``name`` from ``dist`` through Optuna's public suggest API."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def describe(dist: BaseDistribution) -> str:
    """A distribution in a few characters: ``{a, b}``, ``[1, 8] int``, ``[0.01, 1] log``."""
    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(str(c) for c in dist.choices) + "}"
    assert isinstance(dist, IntDistribution | FloatDistribution)
    kind = "int" if isinstance(dist, IntDistribution) else "float"
    return f"[{dist.low:g}, {dist.high:g}] {kind}{' log' if dist.log else ''}"
