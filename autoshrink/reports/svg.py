"""Static SVG charts for ``index.html``: the Pareto plot, the search history, the layer map.

Every function here draws plain data computed in :mod:`autoshrink.reports.html` and returns
SVG text; nothing is measured or decided here, so the data can be tested without parsing
SVG. Colours come from CSS classes the page defines (inline SVG shares the page's styles),
except the heat map's shades, which are data. All text goes through :func:`html.escape`:
plans and failure reasons come from plugins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

__all__ = [
    "LinearScale",
    "LogScale",
    "fmt_bytes",
    "heatmap_chart",
    "history_chart",
    "pareto_chart",
]


def fmt_bytes(n: float) -> str:
    """A short SI size for axis labels: ``950 B``, ``25 kB``, ``1.5 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}"
    return f"{n:.0f} B"


def _num(x: float) -> str:
    """Coordinates with two decimals: enough for screens, short enough for the file."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def el(tag: str, attrs: dict[str, Any] | None = None, *children: str) -> str:
    """One SVG element; attribute values are escaped, children are already SVG text."""
    parts = [tag]
    for key, value in (attrs or {}).items():
        if value is None:
            continue
        shown = _num(value) if isinstance(value, float) else str(value)
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{escape(shown)}"')
    head = " ".join(parts)
    if not children:
        return f"<{head}/>"
    return f"<{head}>{''.join(children)}</{tag}>"


def text(x: float, y: float, content: str, cls: str = "", **attrs: Any) -> str:
    """A text element with escaped content."""
    return el("text", {"x": x, "y": y, "class": cls or None, **attrs}, escape(content))


def title(content: str) -> str:
    """A hover tooltip for the enclosing element."""
    return el("title", None, escape(content))


def trial_link(trial: int, *children: str) -> str:
    """Wrap a mark so a click selects its trial (inline JS) or jumps to its table row."""
    return el(
        "a", {"href": f"#trial-{trial}", "class": "trial-link", "data-trial": trial}, *children
    )


@dataclass(frozen=True)
class LinearScale:
    """Map ``[lo, hi]`` onto pixels ``[start, end]``."""

    lo: float
    hi: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        if self.hi == self.lo:
            return (self.start + self.end) / 2
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self, count: int = 5, *, integer: bool = False) -> list[float]:
        """Round values (steps of 1, 2, 2.5 or 5 times a power of ten) inside the domain."""
        span = self.hi - self.lo
        if span <= 0:
            return [self.lo]
        raw = span / count
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
        if integer:
            step = max(1, round(step))
        first = math.ceil(self.lo / step - 1e-9) * step
        count_ = int(math.floor((self.hi - first) / step + 1e-9)) + 1
        return [round(first + i * step, 10) for i in range(max(count_, 0))]


@dataclass(frozen=True)
class LogScale:
    """Map ``[lo, hi]`` (both > 0) onto pixels ``[start, end]`` logarithmically."""

    lo: float
    hi: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        low, high = math.log10(self.lo), math.log10(self.hi)
        if high == low:
            return (self.start + self.end) / 2
        share = (math.log10(max(value, 1e-12)) - low) / (high - low)
        return self.start + share * (self.end - self.start)

    def ticks(self) -> list[float]:
        """1, 2 and 5 times powers of ten inside the domain; only powers of ten over wide
        domains, so labels never crowd."""
        first, last = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
        mantissas = (1, 2, 5) if last - first <= 3 else (1,)
        found = [
            m * 10.0**e
            for e in range(first, last + 1)
            for m in mantissas
            if self.lo <= m * 10.0**e <= self.hi
        ]
        return found


def accuracy_domain(
    values: Iterable[float | None], *, fraction: bool = True
) -> tuple[float, float]:
    """A y domain around the values with a margin (at least 2% of their magnitude), not
    below 0 when none is, and for a ``fraction`` (accuracy) not above 1 when none is."""
    known = [v for v in values if v is not None]
    if not known:
        return 0.0, 1.0
    low, high = min(known), max(known)
    pad = max((high - low) * 0.08, 0.02 * max(1.0, abs(low), abs(high)))
    low, high = low - pad, high + pad
    if min(known) >= 0:
        low = max(low, 0.0)
    if fraction and max(known) <= 1:
        high = min(high, 1.0)
    return low, high


def _pct(value: float) -> str:
    return f"{value:.0%}" if abs(value * 100 - round(value * 100)) < 1e-6 else f"{value:.1%}"


def _metric_axis(data: dict[str, Any]) -> tuple[str, bool]:
    """The y axis title and whether its values read as percentages (accuracy when the data
    names no metric)."""
    metric = data.get("metric") or {}
    return str(metric.get("axis", "validation accuracy")), bool(metric.get("percent", True))


def _y_axis(
    y: LinearScale, left: float, right: float, label: str, percent: bool = True
) -> list[str]:
    """Horizontal grid lines with percentage (or plain number) labels, and the axis title.
    Values grow upwards whatever the metric's direction; the title says when lower is
    better."""
    parts = []
    for tick in y.ticks(5):
        pos = y(tick)
        parts.append(el("line", {"x1": left, "x2": right, "y1": pos, "y2": pos, "class": "grid"}))
        shown = _pct(tick) if percent else f"{tick:.4g}"
        parts.append(text(left - 8, pos + 4, shown, "tick", text_anchor="end"))
    middle = (y.start + y.end) / 2
    parts.append(
        text(16, middle, label, "axis-title", text_anchor="middle",
             transform=f"rotate(-90 16 {_num(middle)})")
    )
    return parts


def _marker(kind: str, x: float, y: float, trial: int) -> str:
    """The mark of one complete trial; its shape as well as its colour tells its kind."""
    common = {"data-trial": trial, "data-kind": kind}
    if kind == "over_budget":
        d = f"M{_num(x)} {_num(y - 6)}L{_num(x + 6)} {_num(y)}L{_num(x)} {_num(y + 6)}" \
            f"L{_num(x - 6)} {_num(y)}Z"
        return el("path", {"d": d, "class": "point over", **common})
    if kind == "stopped":  # a small triangle: where the trial stood when it stopped
        d = f"M{_num(x)} {_num(y - 5)}L{_num(x + 5)} {_num(y + 4)}L{_num(x - 5)} {_num(y + 4)}Z"
        return el("path", {"d": d, "class": "point stopped", **common})
    radius = {"best": 8.0, "front": 6.0}.get(kind, 5.0)
    return el("circle", {"cx": x, "cy": y, "r": radius, "class": f"point {kind}", **common})


def _cross(x: float, y: float, cls: str, trial: int) -> str:
    d = f"M{_num(x - 5)} {_num(y - 5)}L{_num(x + 5)} {_num(y + 5)}" \
        f"M{_num(x - 5)} {_num(y + 5)}L{_num(x + 5)} {_num(y - 5)}"
    return el("path", {"d": d, "class": cls, "data-trial": trial})


def _strip(
    items: Sequence[dict[str, Any]], left: float, right: float, y: float, label: str, cls: str
) -> list[str]:
    """A row of failed (x) and running (o) trials, which have no size to place them by."""
    parts = [text(left, y - 14, label, "strip-label")]
    if not items:
        return [*parts, text(left + 6, y + 4, "none", "strip-empty")]
    step = min(22.0, (right - left) / max(len(items), 1))
    for i, item in enumerate(items):
        x = left + step * (i + 0.5)
        if item["state"] == "running":
            mark = el("circle", {"cx": x, "cy": y, "r": 5.0, "class": "running-point",
                                 "data-trial": item["trial"]})
        else:
            mark = _cross(x, y, cls, item["trial"])
        parts.append(trial_link(item["trial"], title(item["label"]), mark))
    return parts


def pareto_chart(data: dict[str, Any], width: int = 860, height: int = 470) -> str:
    """Size (log x) against the validation metric: every trial, the front, budget,
    baseline."""
    left, right, top, bottom = 78.0, width - 24.0, 20.0, height - 104.0
    points, base, budget = data["points"], data["baseline"], data["budget"]
    axis, percent = _metric_axis(data)
    sizes = [p["bytes"] for p in points] + [base["bytes"]] + ([budget] if budget else [])
    x = LogScale(max(min(sizes) / 1.3, 1.0), max(sizes) * 1.3, left, right)
    y = LinearScale(
        *accuracy_domain([p["val_accuracy"] for p in points] + [base["val_accuracy"]],
                         fraction=percent),
        bottom,
        top,
    )
    parts = _y_axis(y, left, right, axis, percent)
    for tick in x.ticks():
        pos = x(tick)
        parts.append(el("line", {"x1": pos, "x2": pos, "y1": top, "y2": bottom, "class": "grid"}))
        parts.append(text(pos, bottom + 18, fmt_bytes(tick), "tick", text_anchor="middle"))
    parts.append(
        text((left + right) / 2, bottom + 40, "file size (bytes, log scale)", "axis-title",
             text_anchor="middle")
    )
    parts.append(el("rect", {"x": left, "y": top, "width": right - left,
                             "height": bottom - top, "class": "frame"}))
    if budget:
        bx = x(budget)
        parts.append(el("rect", {"x": bx, "y": top, "width": max(right - bx, 0.0),
                                 "height": bottom - top, "class": "over-region"}))
        parts.append(el("line", {"x1": bx, "x2": bx, "y1": top, "y2": bottom,
                                 "class": "budget"}, title(data["budget_label"])))
        parts.append(text(bx + 6, top + 14, f"budget {fmt_bytes(budget)}", "budget-label"))
    front = data["front_line"]
    if front:
        d = f"M{_num(x(front[0][0]))} {_num(y(front[0][1]))}"
        for size, accuracy in front[1:]:
            d += f"H{_num(x(size))}V{_num(y(accuracy))}"
        if budget:
            d += f"H{_num(x(budget))}"
        parts.append(el("path", {"d": d, "class": "front-line"}))
    bx, by = x(base["bytes"]), y(base["val_accuracy"])
    parts.append(
        el("g", {"class": "baseline"}, title(data["baseline_label"]),
           el("rect", {"x": bx - 6, "y": by - 6, "width": 12.0, "height": 12.0,
                       "class": "baseline-mark"}))
    )
    parts.append(text(bx - 10, by + 4, "baseline", "mark-label", text_anchor="end"))
    # Draw dominated marks first so the front's marks sit on top of them.
    order = {"stopped": -1, "over_budget": 0, "feasible": 1, "front": 2, "best": 3}
    for point in sorted(points, key=lambda p: order[p["kind"]]):
        px, py = x(point["bytes"]), y(point["val_accuracy"])
        parts.append(trial_link(point["trial"], title(point["label"]),
                                _marker(point["kind"], px, py, point["trial"])))
        # Trial numbers tie marks to the tables; only the front's when they would crowd.
        if point["kind"] in ("front", "best"):
            parts.append(text(px + 9, py - 8, f"#{point['trial']}", "mark-label"))
        elif len(points) <= 30:
            parts.append(text(px + 8, py - 7, f"#{point['trial']}", "mark-label faint"))
    parts += _strip(data["failed"] + data["running"], left, right, height - 22.0,
                    "failed or running trials (no size yet)", "failed-point")
    return el("svg", {"class": "chart pareto", "viewBox": f"0 0 {width} {height}",
                      "width": width, "height": height, "role": "img",
                      "aria-label": f"Pareto plot of file size against {axis}"},
              *parts)


def history_chart(data: dict[str, Any], width: int = 860, height: int = 300) -> str:
    """Best feasible validation metric so far over trial number, with every trial's mark."""
    left, right, top, bottom = 78.0, width - 24.0, 16.0, height - 86.0
    trials = data["trials"]
    axis, percent = _metric_axis(data)
    last = max((t["trial"] for t in trials), default=0)
    x = LinearScale(-0.5, last + 0.5, left, right)
    values = [t["val_accuracy"] for t in trials] + [data["baseline_val_accuracy"]]
    y = LinearScale(*accuracy_domain(values, fraction=percent), bottom, top)
    parts = _y_axis(y, left, right, axis, percent)
    for tick in x.ticks(min(10, last + 1), integer=True):
        if tick < 0:
            continue
        parts.append(text(x(tick), bottom + 18, f"{tick:g}", "tick", text_anchor="middle"))
    parts.append(text((left + right) / 2, bottom + 40, "trial number", "axis-title",
                      text_anchor="middle"))
    parts.append(el("rect", {"x": left, "y": top, "width": right - left,
                             "height": bottom - top, "class": "frame"}))
    base = y(data["baseline_val_accuracy"])
    parts.append(el("line", {"x1": left, "x2": right, "y1": base, "y2": base,
                             "class": "baseline-line"}))
    parts.append(text(right - 4, base - 6, "baseline", "mark-label", text_anchor="end"))
    steps = [s for s in data["best_so_far"] if s["val_accuracy"] is not None]
    if steps:
        d = f"M{_num(x(steps[0]['trial']))} {_num(y(steps[0]['val_accuracy']))}"
        for step in steps[1:]:
            d += f"H{_num(x(step['trial']))}V{_num(y(step['val_accuracy']))}"
        d += f"H{_num(x(last + 0.5))}"
        parts.append(el("path", {"d": d, "class": "best-line"}))
    for trial in trials:
        if trial["val_accuracy"] is None:
            continue
        kind = "feasible" if trial["feasible"] else "over"
        mark = el("circle", {"cx": x(trial["trial"]), "cy": y(trial["val_accuracy"]),
                             "r": 4.0, "class": f"hpoint {kind}", "data-trial": trial["trial"]})
        parts.append(trial_link(trial["trial"], title(trial["label"]), mark))
    strip_y = height - 22.0
    parts.append(text(left - 8, strip_y + 4, "failed", "strip-label", text_anchor="end"))
    for trial in trials:
        if trial["state"] == "fail":
            parts.append(trial_link(trial["trial"], title(trial["label"]),
                                    _cross(x(trial["trial"]), strip_y, "hfail", trial["trial"])))
    return el("svg", {"class": "chart history", "viewBox": f"0 0 {width} {height}",
                      "width": width, "height": height, "role": "img",
                      "aria-label": f"Best feasible {axis} over trial number"},
              *parts)


def shade(share: float) -> tuple[str, bool]:
    """Cell colour for a share of the file (square root, so small layers still show) and
    whether its text must be light to stay readable."""
    t = math.sqrt(min(max(share, 0.0), 1.0))
    pale, deep = (240, 244, 250), (29, 78, 216)
    rgb = tuple(round(p + (d - p) * t) for p, d in zip(pale, deep, strict=True))
    return "#{:02x}{:02x}{:02x}".format(*rgb), t > 0.55


def heatmap_chart(data: dict[str, Any]) -> str:
    """Rows = front members, columns = layers; shade = share of the file, label = methods."""
    label_w, cell_w, cell_h, head_h = 150.0, 170.0, 58.0, 30.0
    columns, rows = data["columns"], data["rows"]
    width = label_w + cell_w * len(columns) + 8
    height = head_h + cell_h * len(rows) + 8
    parts = []
    for j, column in enumerate(columns):
        parts.append(text(label_w + cell_w * (j + 0.5), head_h - 10, column, "col-label",
                          text_anchor="middle"))
    for i, row in enumerate(rows):
        top = head_h + cell_h * i
        cls = "row-label best" if row["best"] else "row-label"
        parts.append(trial_link(row["trial"], title(row["title"]),
                                text(label_w - 10, top + 24, row["label"], cls,
                                     text_anchor="end"),
                                text(label_w - 10, top + 42, row["sublabel"], "row-sub",
                                     text_anchor="end")))
        for j, cell in enumerate(row["cells"]):
            x0 = label_w + cell_w * j
            if cell is None:
                parts.append(el("rect", {"x": x0 + 1, "y": top + 1, "width": cell_w - 2,
                                         "height": cell_h - 2, "class": "cell-empty"}))
                continue
            fill, light = shade(cell["share"])
            ink = "cell-text light" if light else "cell-text"
            middle = x0 + cell_w / 2
            parts.append(
                el("g", {"class": "cell", "data-trial": row["trial"], "data-layer": cell["layer"]},
                   title(cell["title"]),
                   el("rect", {"x": x0 + 1, "y": top + 1, "width": cell_w - 2,
                               "height": cell_h - 2, "fill": fill, "rx": 3.0}),
                   text(middle, top + 18, cell["lines"][0], ink + " strong",
                        text_anchor="middle"),
                   text(middle, top + 33, cell["lines"][1], ink, text_anchor="middle"),
                   text(middle, top + 48, cell["lines"][2], ink + " small",
                        text_anchor="middle"))
            )
    return el("svg", {"class": "chart heatmap", "viewBox": f"0 0 {_num(width)} {_num(height)}",
                      "width": width, "height": height, "role": "img",
                      "aria-label": "Per-layer decisions of the front members"},
              *parts)
