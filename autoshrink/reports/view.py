"""What the reports show, as data: sizes, plans and per-layer decisions as text, latency
tables; the page's plot, history and heat-map data live here too (:mod:`.html` draws them)."""

from __future__ import annotations

from typing import Any

import humanize

import autoshrink.reports.svg as svg
from autoshrink.metric import Metric

__all__ = [
    "KIND_TEXT", "by_size", "choice_text", "heatmap_data", "history_data", "latency_table",
    "layer_decisions", "pareto_plot_data", "pct_text", "plan_lines", "recommended",
    "retrained_text", "size_text", "trial_kind",
]


def size_text(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B ({humanize.naturalsize(n)})"


def pct_text(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def choice_text(choice: dict[str, Any] | None) -> str:
    if not choice:
        return "-"
    knobs = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in choice["config"].items()
    )
    return f"{choice['method']}({knobs})" if knobs else choice["method"]


def layer_decisions(member: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer of a front member: structure, value, bytes and share of the file."""
    plan = member.get("plan") or {}
    sizes: dict[str, int] = member.get("layers") or {}
    total = sum(sizes.values()) or 1
    rows = []
    for name, layer in (plan.get("layers") or {}).items():
        rows.append(
            {
                "layer": name,
                "structure": choice_text(layer.get("structure")),
                "value": choice_text(layer.get("value")),
                "bytes": sizes.get(name),
                "share": sizes.get(name, 0) / total,
            }
        )
    for section in ("state", "header"):
        if section in sizes:
            rows.append(
                {
                    "layer": f"({section})",
                    "structure": "-",
                    "value": "-",
                    "bytes": sizes[section],
                    "share": sizes[section] / total,
                }
            )
    return rows


def latency_table(latency: Any) -> dict[str, Any] | None:
    """A member's ``latency`` dict as rows: milliseconds per engine and batch size, the
    fastest engine per batch, and the scalar facts (machine, threads). None when absent."""
    if not isinstance(latency, dict) or not isinstance(latency.get("engines"), dict):
        return None
    engines: dict[str, Any] = {
        str(name): times for name, times in latency["engines"].items() if isinstance(times, dict)
    }
    batches = [str(b) for b in latency.get("batches") or []]
    if not batches:
        keys = {str(k) for times in engines.values() for k in times}
        batches = sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    rows = []
    for name, times in engines.items():
        # JSON turns the batch sizes into strings; a dict built in Python may use ints.
        found = {str(k): v for k, v in times.items()}
        rows.append({"engine": name, "ms": [_number(found.get(b)) for b in batches]})
    fastest = {}
    for i, batch in enumerate(batches):
        timed = [(row["ms"][i], row["engine"]) for row in rows if row["ms"][i] is not None]
        if timed:
            fastest[batch] = min(timed)[1]
    info = {
        str(k): v
        for k, v in latency.items()
        if k not in ("engines", "batches") and isinstance(v, str | int | float | bool)
    }
    return {"batches": batches, "rows": rows, "fastest": fastest, "info": info}


def _number(value: Any) -> float | None:
    """A latency in ms, or None for a missing, failed (non-numeric) or NaN measurement."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return float(value)


def plan_lines(plan: dict[str, Any] | None) -> list[str]:
    """A plan as lines of text: model stage, one line per layer, encoding."""
    if not plan:
        return ["(no plan recorded)"]
    lines = []
    if plan.get("model"):
        lines.append(f"model: {choice_text(plan['model'])}")
    for name, layer in (plan.get("layers") or {}).items():
        lines.append(
            f"{name}: {choice_text(layer.get('structure'))} + {choice_text(layer.get('value'))}"
        )
    if plan.get("encoding"):
        lines.append(f"encoding: {choice_text(plan['encoding'])}")
    return lines


def _front_numbers(summary: dict[str, Any]) -> set[int]:
    return {m["trial"] for m in summary["front"]}


def trial_kind(row: dict[str, Any], summary: dict[str, Any]) -> str:
    """How the plot shows a trial: ``best`` (the recommended model), ``front`` (feasible and
    Pareto-optimal), ``feasible`` (within budget, dominated), ``over_budget``, ``failed``
    ``stopped`` (stopped early, at its checkpoint) or ``running`` (also any other unfinished
    state: no size yet)."""
    if row["state"] == "fail":
        return "failed"
    if row["state"] == "pruned":
        return "stopped"
    if row["state"] != "complete" or row["bytes"] is None:
        return "running"
    if row["trial"] == summary["best"]:
        return "best"
    if row["trial"] in _front_numbers(summary):
        return "front"
    return "feasible" if row["feasible"] else "over_budget"


KIND_TEXT = {
    "best": "recommended",
    "front": "on the Pareto front",
    "feasible": "within budget, dominated",
    "over_budget": "over budget",
    "failed": "failed",
    "stopped": "stopped early",
    "running": "running",
}


def trial_label(row: dict[str, Any], summary: dict[str, Any]) -> str:
    """The hover text of a trial: what happened to it, then its plan."""
    kind = trial_kind(row, summary)
    head = f"trial {row['trial']}: {KIND_TEXT[kind]}"
    if kind == "failed":
        head += f": {row.get('failure') or 'unknown reason'}"
    elif kind == "stopped":
        head += f": {row.get('stopped') or 'no reason recorded'}"
    elif kind == "running":
        head = f"trial {row['trial']}: {row['state']}"
    else:
        metric = Metric.of(summary)
        # A front member's figures as they stand (retrained where taken), like its point.
        member = next((m for m in summary["front"] if m["trial"] == row["trial"]), row)
        head += (f"\n{size_text(member['bytes'])}, validation {metric.name} "
                 f"{metric.text(member['val_accuracy'])}{retrained_text(member, metric)}")
        if kind == "over_budget":
            head += f", {row['bytes'] - summary['budget_bytes']:,} B over the budget"
        if row.get("untrained"):
            head += f" ({row['untrained']})"
        if row.get("fitted"):
            head += f" ({row['fitted']})"
    return "\n".join([head, *plan_lines(row.get("plan"))])


def pareto_plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    """Everything the size-metric plot draws.

    ``metric``: ``name``, ``direction``, ``percent`` (values read as percentages) and
    ``axis`` (the y axis title, which says "lower is better" when it is); ``points``: one
    per complete trial (``trial``, ``bytes``, ``val_accuracy``, ``kind``, ``label``);
    ``failed`` and ``running``: trials without a size, drawn in a strip below;
    ``front_line``: ``[bytes, val_accuracy]`` of the front members, smallest first, with the
    figures that stand (retrained where taken, as the front is taken: a front member's point
    sits there too, other points where the search measured them);
    ``budget`` and ``baseline`` (from ``summary["baseline"]``; the trials list lacks it).
    """
    points, failed, running = [], [], []
    members = {m["trial"]: m for m in summary["front"]}
    for row in sorted(summary["trials"], key=lambda r: r["trial"]):
        kind = trial_kind(row, summary)
        entry = {"trial": row["trial"], "kind": kind, "label": trial_label(row, summary)}
        if kind == "failed":
            failed.append({**entry, "state": "fail", "failure": row.get("failure")})
        elif kind == "stopped":
            point = row.get("checkpoint")
            if point:  # drawn where it stopped: its size and its figure at the checkpoint
                points.append({**entry, "bytes": point[0], "val_accuracy": point[1]})
            else:
                running.append({**entry, "state": row["state"]})
        elif kind == "running":
            running.append({**entry, "state": row["state"]})
        else:
            at = members.get(row["trial"], row)
            points.append({**entry, "bytes": at["bytes"], "val_accuracy": at["val_accuracy"]})
    base = summary["baseline"]
    budget = summary["budget_bytes"]
    metric = Metric.of(summary)
    return {
        "metric": _metric_data(metric),
        "points": points,
        "failed": failed,
        "running": running,
        "front_line": sorted([m["bytes"], m["val_accuracy"]] for m in summary["front"]),
        "budget": budget,
        "budget_label": f"budget {size_text(budget)}: trials right of this line are over it",
        "baseline": {
            "bytes": base["bytes"],
            "val_accuracy": base["val_accuracy"],
            "test_accuracy": base["test_accuracy"],
        },
        "baseline_label": f"baseline (float32): {size_text(base['bytes'])}, validation "
        f"{metric.name} {metric.text(base['val_accuracy'])}, "
        f"test {metric.text(base['test_accuracy'])}",
    }


def _metric_data(metric: Metric) -> dict[str, Any]:
    return {**metric.block(), "percent": metric.percent, "axis": metric.label()}


def by_size(member: dict[str, Any], metric: Metric) -> tuple[int, float]:
    return member["bytes"], -metric.score(member["val_accuracy"])


def history_data(summary: dict[str, Any]) -> dict[str, Any]:
    """The search over time: each trial (``trial``, ``state``, ``val_accuracy``,
    ``feasible``, ``label``) and, per trial number, the best validation metric (in its
    direction) among the feasible trials up to it (``best_so_far``: ``trial``,
    ``val_accuracy`` or None before the first feasible trial, ``best_trial``); ``metric`` as
    in :func:`pareto_plot_data`."""
    metric = Metric.of(summary)
    trials, best_so_far = [], []
    best: tuple[float, int] | None = None
    for row in sorted(summary["trials"], key=lambda r: r["trial"]):
        complete = row["state"] == "complete" and row["val_accuracy"] is not None
        trials.append(
            {
                "trial": row["trial"],
                "state": row["state"],
                "val_accuracy": row["val_accuracy"] if complete else None,
                "feasible": bool(row["feasible"]) and complete,
                "label": trial_label(row, summary),
            }
        )
        if complete and row["feasible"] and (
            best is None or metric.better(row["val_accuracy"], best[0])
        ):
            best = (row["val_accuracy"], row["trial"])
        best_so_far.append(
            {
                "trial": row["trial"],
                "val_accuracy": best[0] if best else None,
                "best_trial": best[1] if best else None,
            }
        )
    return {
        "metric": _metric_data(metric),
        "trials": trials,
        "best_so_far": best_so_far,
        "baseline_val_accuracy": summary["baseline"]["val_accuracy"],
    }


def _short(choice: dict[str, Any] | None, limit: int = 22) -> str:
    """A method and its first knob, short enough for a heat-map cell."""
    if not choice:
        return "-"
    name = str(choice.get("method", "?"))
    for key, value in (choice.get("config") or {}).items():
        shown = f"{value:.2g}" if isinstance(value, float) else str(value)
        candidate = f"{name} {key}={shown}"
        return candidate if len(candidate) <= limit else name[:limit]
    return name[:limit]


def heatmap_data(summary: dict[str, Any]) -> dict[str, Any]:
    """Per-layer decisions of every front member, smallest first.

    ``columns``: layer names in plan order, then ``(state)`` and ``(header)`` where present;
    ``rows``: one per member (``trial``, ``best``, labels) with one cell per column (None when
    the member lacks that part): ``layer``, ``bytes``, ``share`` of the file, ``structure``
    and ``value`` (full descriptions), ``lines`` (three short labels) and ``title``.
    """
    metric = Metric.of(summary)
    members = sorted(summary["front"], key=lambda m: by_size(m, metric))
    decisions = {m["trial"]: layer_decisions(m) for m in members}
    columns: list[str] = []
    for rows in decisions.values():
        for row in rows:
            if row["layer"] not in columns and not row["layer"].startswith("("):
                columns.append(row["layer"])
    for section in ("(state)", "(header)"):
        if any(r["layer"] == section for rows in decisions.values() for r in rows):
            columns.append(section)
    out = []
    for member in members:
        layers = (member.get("plan") or {}).get("layers") or {}
        by_layer = {r["layer"]: r for r in decisions[member["trial"]]}
        cells: list[dict[str, Any] | None] = []
        for column in columns:
            row = by_layer.get(column)
            if row is None:
                cells.append(None)
                continue
            size = "-" if row["bytes"] is None else f"{row['bytes']:,} B"
            if column.startswith("("):
                lines = [column.strip("()"), "not compressed" if column == "(state)" else
                         "metadata", f"{row['share']:.1%} · {size}"]
            else:
                plan = layers.get(column) or {}
                lines = [_short(plan.get("structure")), _short(plan.get("value")),
                         f"{row['share']:.1%} · {size}"]
            cells.append(
                {
                    "layer": column,
                    "bytes": row["bytes"],
                    "share": row["share"],
                    "structure": row["structure"],
                    "value": row["value"],
                    "lines": lines,
                    "title": f"trial {member['trial']}, {column}: {row['structure']} + "
                    f"{row['value']}\n{size}, {row['share']:.1%} of the file",
                }
            )
        best = member["trial"] == summary["best"]
        out.append(
            {
                "trial": member["trial"],
                "best": best,
                "label": f"{'★ ' if best else ''}trial {member['trial']}",
                "sublabel": f"{svg.fmt_bytes(member['bytes'])} · "
                f"{metric.text(member['val_accuracy'])}",
                "title": "\n".join(
                    [f"trial {member['trial']}: {size_text(member['bytes'])}, validation "
                     f"{metric.name} {metric.text(member['val_accuracy'])}",
                     *plan_lines(member.get("plan"))]
                ),
                "cells": cells,
            }
        )
    return {"columns": columns, "rows": out}


def retrained_text(member: dict[str, Any], metric: Metric | None = None) -> str:
    """", retrained N epochs (search: validation X, test Y)" for a retrained member."""
    search = member.get("search")
    if not search:
        return ""
    metric = metric or Metric()
    return (
        f", retrained {member['retrained']['epochs']:g} epochs (search: "
        f"{search['bytes']:,} B, validation {metric.text(search['val_accuracy'])}, "
        f"test {metric.text(search.get('test_accuracy'))})"
    )


def recommended(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The recommended model's facts (None when no trial fit the budget): ``trial``,
    ``bytes``, ``ratio`` to the baseline file, ``val_accuracy``, ``test_accuracy``,
    ``artifact`` and ``latency`` (:func:`latency_table`, or None)."""
    best = next((m for m in summary["front"] if m["trial"] == summary["best"]), None)
    if best is None:
        return None
    return {
        "trial": best["trial"],
        "bytes": best["bytes"],
        "ratio": best["ratio"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": best.get("test_accuracy"),
        "artifact": summary.get("best_artifact") or best.get("artifact"),
        "latency": latency_table(best.get("latency")),
    }


# ---------------------------------------------------------------------------- HTML
