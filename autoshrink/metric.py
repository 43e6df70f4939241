"""A metric's name and direction, and the comparisons and wording that follow from them.

A task judges a model with ``metric(outputs, targets) -> float`` and says whether higher
(``"maximize"``: accuracy, top-k, F1) or lower (``"minimize"``: mean squared error) is
better. The search's second objective, the Pareto front, the recommended model, retraining's
acceptance rule and the reports all compare values through :class:`Metric`, so none of them
assumes "higher is better".

A metric named ``accuracy`` is shown as a percentage; any other as a number with four
significant digits. Summaries (``pareto.json``) carry ``metric: {name, direction}``; a
summary without it is an older one, whose metric was accuracy, maximized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from autoshrink.errors import UsageError

__all__ = ["DIRECTIONS", "Direction", "Metric", "check_direction", "metric_name"]

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[Direction, ...] = ("maximize", "minimize")

T = TypeVar("T")


def check_direction(direction: Any) -> Direction:
    """``direction`` if it is ``"maximize"`` or ``"minimize"``; a usage error otherwise."""
    if direction not in DIRECTIONS:
        raise UsageError(
            f"`direction={direction!r}`: expected \"maximize\" (higher is better, e.g. "
            "accuracy) or \"minimize\" (lower is better, e.g. mean squared error)"
        )
    return direction


def metric_name(metric: Callable[..., Any]) -> str:
    """A metric callable's name for reports: its ``__name__`` (a lambda's is ``metric``)."""
    name = getattr(metric, "__name__", None) or type(metric).__name__
    return "metric" if name == "<lambda>" else str(name)


@dataclass(frozen=True)
class Metric:
    """How values of one metric compare and read."""

    name: str = "accuracy"
    direction: Direction = "maximize"

    @classmethod
    def of(cls, summary: dict[str, Any]) -> Metric:
        """The metric of a summary (``pareto.json``); accuracy, maximized, for older files."""
        block = summary.get("metric") or {}
        return cls(
            name=str(block.get("name", "accuracy")),
            direction=check_direction(block.get("direction", "maximize")),
        )

    def block(self) -> dict[str, str]:
        """What ``pareto.json`` records: ``{name, direction}``."""
        return {"name": self.name, "direction": self.direction}

    @property
    def percent(self) -> bool:
        return self.name == "accuracy"

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "minimize"

    @property
    def better_word(self) -> str:
        """``"higher is better"`` or ``"lower is better"``."""
        return "lower is better" if self.lower_is_better else "higher is better"

    @property
    def best_word(self) -> str:
        """``"highest"`` or ``"lowest"``."""
        return "lowest" if self.lower_is_better else "highest"

    def score(self, value: float) -> float:
        """``value`` turned so that higher is always better (for sort keys)."""
        return -value if self.lower_is_better else value

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return self.score(a) > self.score(b)

    def not_worse(self, a: float, b: float) -> bool:
        """Whether ``a`` is at least as good as ``b``."""
        return self.score(a) >= self.score(b)

    def best(self, items: Iterable[T], value: Callable[[T], float],
             size: Callable[[T], float]) -> T | None:
        """The item of best value; ties go to the smaller ``size``; None when empty."""
        return max(items, key=lambda item: (self.score(value(item)), -size(item)), default=None)

    def text(self, value: float | None) -> str:
        """A value as the reports show it (``-`` when unknown)."""
        if value is None:
            return "-"
        return f"{value:.2%}" if self.percent else f"{value:.4g}"

    def label(self, what: str = "validation") -> str:
        """``"validation accuracy"``; ``"validation mse (lower is better)"`` when lower is
        better, so that no reader takes a falling curve for a worse model."""
        text = f"{what} {self.name}"
        return f"{text} ({self.better_word})" if self.lower_is_better else text
