"""The checks every method's suite starts from (:class:`MethodTests`): the method passes the
registry's contract, and its schema's knobs keep their defaults inside their search bounds
and refuse values outside them and knobs it does not have. The suites of
:mod:`autoshrink.testing` add each stage's own checks."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from optuna.distributions import CategoricalDistribution
from pydantic import ValidationError

from autoshrink.knobs import config_distributions
from autoshrink.methods import Method
from autoshrink.registry import check_method

__all__ = ["MethodTests"]


class MethodTests:
    """Checks every method must pass. Set ``method`` in the subclass."""

    method: ClassVar[Method]

    def test_contract(self) -> None:
        check_method(self.method)

    def test_defaults_within_bounds(self) -> None:
        config = self.method.config()
        for name, dist in config_distributions(self.method.Config, self.method.name).items():
            assert dist._contains(dist.to_internal_repr(getattr(config, name))), name

    def test_values_outside_bounds_rejected(self) -> None:
        for name, dist in config_distributions(self.method.Config, self.method.name).items():
            if isinstance(dist, CategoricalDistribution):
                outside: list[Any] = ["not-a-choice"]
            else:
                outside = [dist.low - (dist.step or 1), dist.high + (dist.step or 1)]
            for value in outside:
                with pytest.raises(ValidationError):
                    self.method.config({name: value})

    def test_unknown_knob_rejected(self) -> None:
        with pytest.raises(ValidationError):
            self.method.config({"no_such_knob": 1})
