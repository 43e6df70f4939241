"""``index.html``: one self-contained page per study, rendered from the summary dict.

The page needs nothing from the network: charts are static inline SVG (:mod:`autoshrink.svg`),
the little interactivity (click a mark to see its trial's plan) is one inline script, and a
Content-Security-Policy allows only that script and the page's own style (by hash), so even a
mistake that let markup through could load nothing and run nothing.

Plot data is computed here by plain functions (:func:`pareto_plot_data`,
:func:`history_data`, :func:`heatmap_data`, :func:`recommended`) and drawn separately, so
tests check the data without parsing SVG. Every piece of text is escaped: plans and failure
reasons come from plugins.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Collection
from html import escape
from typing import Any

from autoshrink import svg
from autoshrink.metric import Metric
from autoshrink.report import (
    choice_text,
    latency_table,
    layer_decisions,
    size_text,
)

__all__ = [
    "heatmap_data",
    "history_data",
    "pareto_plot_data",
    "plan_lines",
    "recommended",
    "render_html",
    "trial_kind",
]


# ---------------------------------------------------------------------------- plot data


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
    or ``running`` (also any other unfinished state: no size yet)."""
    if row["state"] == "fail":
        return "failed"
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
    "running": "running",
}


def trial_label(row: dict[str, Any], summary: dict[str, Any]) -> str:
    """The hover text of a trial: what happened to it, then its plan."""
    kind = trial_kind(row, summary)
    head = f"trial {row['trial']}: {KIND_TEXT[kind]}"
    if kind == "failed":
        head += f": {row.get('failure') or 'unknown reason'}"
    elif kind == "running":
        head = f"trial {row['trial']}: {row['state']}"
    else:
        metric = Metric.of(summary)
        head += (f"\n{size_text(row['bytes'])}, validation {metric.name} "
                 f"{metric.text(row['val_accuracy'])}")
        if kind == "over_budget":
            head += f", {row['bytes'] - summary['budget_bytes']:,} B over the budget"
        if row.get("untrained"):
            head += f" ({row['untrained']})"
    return "\n".join([head, *plan_lines(row.get("plan"))])


def pareto_plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    """Everything the size-metric plot draws.

    ``metric``: ``name``, ``direction``, ``percent`` (values read as percentages) and
    ``axis`` (the y axis title, which says "lower is better" when it is); ``points``: one
    per complete trial (``trial``, ``bytes``, ``val_accuracy``, ``kind``, ``label``);
    ``failed`` and ``running``: trials without a size, drawn in a strip below;
    ``front_line``: ``[bytes, val_accuracy]`` of the front members as the search measured
    them (like the points; retrained figures are in the tables), smallest first;
    ``budget`` and ``baseline`` (from ``summary["baseline"]``; the trials list lacks it).
    """
    points, failed, running = [], [], []
    for row in sorted(summary["trials"], key=lambda r: r["trial"]):
        kind = trial_kind(row, summary)
        entry = {"trial": row["trial"], "kind": kind, "label": trial_label(row, summary)}
        if kind == "failed":
            failed.append({**entry, "state": "fail", "failure": row.get("failure")})
        elif kind == "running":
            running.append({**entry, "state": row["state"]})
        else:
            points.append({**entry, "bytes": row["bytes"], "val_accuracy": row["val_accuracy"]})
    base = summary["baseline"]
    budget = summary["budget_bytes"]
    metric = Metric.of(summary)
    return {
        "metric": _metric_data(metric),
        "points": points,
        "failed": failed,
        "running": running,
        "front_line": sorted(
            [m.get("search", m)["bytes"], m.get("search", m)["val_accuracy"]]
            for m in summary["front"]
        ),
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


def _by_size(member: dict[str, Any], metric: Metric) -> tuple[int, float]:
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
    members = sorted(summary["front"], key=lambda m: _by_size(m, metric))
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
    ``artifact`` and ``latency`` (:func:`autoshrink.report.latency_table`, or None)."""
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


def _e(value: Any) -> str:
    return escape(str(value))


def _table(
    head: list[str], rows: list[list[str]], numeric: Collection[int] = (), cls: str = ""
) -> str:
    """A table from already-escaped cells; columns in ``numeric`` align right."""
    def align(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    header = "".join(f"<th{align(i)}>{h}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{align(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _link(trial: int) -> str:
    return f'<a class="trial-link" href="#trial-{trial}" data-trial="{trial}">#{trial}</a>'


def _latency_html(latency: dict[str, Any] | None) -> str:
    if latency is None:
        return ""
    facts = ", ".join(f"{_e(k)} {_e(v)}" for k, v in latency["info"].items())
    rows = []
    for row in latency["rows"]:
        cells = [_e(row["engine"])]
        for batch, ms in zip(latency["batches"], row["ms"], strict=True):
            shown = "-" if ms is None else f"{ms:,.3f}"
            fast = latency["fastest"].get(batch) == row["engine"]
            cells.append(f"<strong>{shown}</strong>" if fast else shown)
        rows.append(cells)
    head = ["engine", *(f"batch {_e(b)} (ms)" for b in latency["batches"])]
    caption = f'<p class="note">Latency{": " + facts if facts else ""}; fastest in bold.</p>'
    return caption + _table(head, rows, set(range(1, len(head))), "compact")


def _plan_table(member: dict[str, Any]) -> str:
    """A member's per-layer decisions: methods, knobs, bytes and share with a bar."""
    rows = []
    for row in layer_decisions(member):
        size = "-" if row["bytes"] is None else f"{row['bytes']:,}"
        # A <progress> bar needs neither inline style nor script, which the CSP forbids.
        bar = f'<progress max="1" value="{row["share"]:.4f}"></progress>'
        rows.append([_e(row["layer"]), _e(row["structure"]), _e(row["value"]), size,
                     f"{row['share']:.1%} {bar}"])
    return _table(["layer", "structure", "value", "bytes", "share"], rows, {3, 4}) + _stages(
        member.get("plan")
    )


def _stages(plan: dict[str, Any] | None) -> str:
    """The whole-model stages of a plan: distillation (model stage) and encoding."""
    plan = plan or {}
    model = choice_text(plan["model"]) if plan.get("model") else "none (the original model)"
    encoding = choice_text(plan["encoding"]) if plan.get("encoding") else "none"
    return f'<p class="note">Model stage: {_e(model)}. Encoding: {_e(encoding)}.</p>'


def _trial_card(row: dict[str, Any], summary: dict[str, Any]) -> str:
    """What the side panel shows for a trial: outcome, then its plan layer by layer."""
    kind = trial_kind(row, summary)
    metric = Metric.of(summary)
    facts = [f'<span class="badge {kind}">{_e(KIND_TEXT[kind])}</span>']
    if row["bytes"] is not None:
        facts.append(f"{_e(size_text(row['bytes']))}, validation {_e(metric.name)} "
                     f"{_e(metric.text(row['val_accuracy']))}")
    if kind == "over_budget":
        facts.append(f"{row['bytes'] - summary['budget_bytes']:,} B over the budget")
    if row.get("untrained"):
        facts.append(_e(row["untrained"]))
    if row.get("failure"):
        facts.append(f'<span class="reason">{_e(row["failure"])}</span>')
    plan = row.get("plan") or {}
    rows = [[_e(name), _e(choice_text(layer.get("structure"))),
             _e(choice_text(layer.get("value")))]
            for name, layer in (plan.get("layers") or {}).items()]
    return (
        f'<div class="trial-card"><h3>Trial {row["trial"]}</h3><p>{"<br>".join(facts)}</p>'
        + _table(["layer", "structure", "value"], rows)
        + _stages(plan)
        + "</div>"
    )


LEGEND = [
    ('<circle cx="8" cy="8" r="6" class="point best"/>', "recommended"),
    ('<circle cx="8" cy="8" r="5" class="point front"/>', "Pareto front (within budget)"),
    ('<circle cx="8" cy="8" r="4.5" class="point feasible"/>', "within budget, dominated"),
    ('<path d="M8 2L14 8L8 14L2 8Z" class="point over"/>', "over budget"),
    ('<path d="M3 3L13 13M3 13L13 3" class="failed-point"/>', "failed (no size)"),
    ('<rect x="2" y="2" width="12" height="12" class="baseline-mark"/>', "baseline (float32)"),
    ('<line x1="8" x2="8" y1="0" y2="16" class="budget"/>', "budget"),
]


def _legend() -> str:
    items = "".join(
        f'<span><svg width="16" height="16" viewBox="0 0 16 16" aria-hidden="true">{mark}'
        f"</svg>{_e(text)}</span>"
        for mark, text in LEGEND
    )
    return f'<div class="legend">{items}</div>'


def _header(summary: dict[str, Any]) -> str:
    counts, base = summary["counts"], summary["baseline"]
    metric = Metric.of(summary)
    chips = [
        ("complete", f"{counts['complete']} complete"),
        ("over_budget", f"{counts['over_budget']} over budget"),
        ("failed", f"{counts['failed']} failed"),
    ]
    if counts["running"]:
        chips.append(("running", f"{counts['running']} running"))
    banner = ""
    if counts["running"]:
        banner = (
            f'<p class="banner">A snapshot of a search that is still running. Regenerate it '
            f"with <code>autoshrink report {_e(summary['study'])}</code>.</p>"
        )
    return (
        f"<header><h1>autoshrink study <code>{_e(summary['study'])}</code></h1>"
        f"<p>Task <code>{_e(summary['task'])}</code> · budget "
        f"<strong>{_e(size_text(summary['budget_bytes']))}</strong> · baseline "
        f"{_e(size_text(base['bytes']))}, validation {_e(metric.name)} "
        f"{_e(metric.text(base['val_accuracy']))}, test {_e(metric.text(base['test_accuracy']))}"
        + (" (not measured: no test data)" if base["test_accuracy"] is None else "")
        + f" · metric <code>{_e(metric.name)}</code>, {_e(metric.better_word)}</p>"
        + "".join(f'<p class="note">{_e(note)}</p>' for note in summary.get("notes", []))
        + '<p class="chips">'
        + "".join(f'<span class="badge {k}">{_e(t)}</span>' for k, t in chips)
        + f"</p>{banner}</header>"
    )


def _pareto_section(summary: dict[str, Any]) -> str:
    best = next((t for t in summary["trials"] if t["trial"] == summary["best"]), None)
    panel = (
        _trial_card(best, summary) if best
        else '<p class="note">Click a mark to see its trial\'s plan.</p>'
    )
    metric = Metric.of(summary)
    return (
        f'<section id="front"><h2>Size against {_e(metric.name)}</h2>'
        '<p class="note">Every trial: file size on a log scale against validation '
        f"{_e(metric.name)} ({_e(metric.better_word)}: the best models sit to the left and "
        f"{'low' if metric.lower_is_better else 'high'}). "
        "Hover a mark for its plan, click it to show the plan on the right.</p>"
        + _legend()
        + '<div class="plot-row"><div class="plot">'
        + svg.pareto_chart(pareto_plot_data(summary))
        + '</div><aside><p class="note">Selected trial (click a mark to change):</p>'
        + '<div id="selected-trial" aria-live="polite">'
        + panel
        + "</div></aside></div></section>"
    )


def _recommended_section(summary: dict[str, Any]) -> str:
    best = recommended(summary)
    if best is None:
        body = '<p class="banner">No trial fit the budget: raise <code>--budget</code> or ' \
               "search longer.</p>"
        return f'<section id="recommended"><h2>Recommended model</h2>{body}</section>'
    base = summary["baseline"]
    metric = Metric.of(summary)
    cards = [
        ("size", f"{best['bytes']:,} B", svg.fmt_bytes(best["bytes"])),
        ("smaller than the baseline", f"{best['ratio']:.1f}×", f"of {base['bytes']:,} B"),
        (metric.label("validation"), metric.text(best["val_accuracy"]),
         f"baseline {metric.text(base['val_accuracy'])}"),
        (metric.label("test"), metric.text(best["test_accuracy"]),
         f"baseline {metric.text(base['test_accuracy'])}"),
    ]
    html = "".join(
        f'<div class="card"><div class="card-label">{_e(label)}</div>'
        f'<div class="card-value">{_e(value)}</div><div class="card-sub">{_e(sub)}</div></div>'
        for label, value, sub in cards
    )
    return (
        f'<section id="recommended"><h2>Recommended model: trial {_link(best["trial"])}</h2>'
        f'<p class="note">The {metric.best_word} validation {_e(metric.name)} within the '
        f"budget ({_e(metric.better_word)}; ties go to the smaller file). "
        f"File: <code>{_e(best['artifact'])}</code></p>"
        f'<div class="cards">{html}</div>{_latency_html(best["latency"])}</section>'
    )


def _decisions_section(summary: dict[str, Any]) -> str:
    if not summary["front"]:
        return ('<section id="layers"><h2>Per-layer decisions</h2>'
                '<p class="note">No front member yet.</p></section>')
    details = []
    metric = Metric.of(summary)
    for member in sorted(summary["front"], key=lambda m: _by_size(m, metric)):
        is_best = member["trial"] == summary["best"]
        head = (
            f"{'★ ' if is_best else ''}Trial {member['trial']}: {member['bytes']:,} B "
            f"({member['ratio']:.1f}× smaller), validation {metric.name} "
            f"{metric.text(member['val_accuracy'])}, "
            f"test {metric.text(member.get('test_accuracy'))}"
        ) + retrained_text(member, metric)
        details.append(
            f"<details{' open' if is_best else ''}><summary>{_e(head)}</summary>"
            f"{_plan_table(member)}"
            f'<p class="note">Artifact: <code>{_e(member.get("artifact"))}</code></p>'
            f"{_latency_html(latency_table(member.get('latency')))}</details>"
        )
    return (
        '<section id="layers"><h2>Per-layer decisions of the front</h2>'
        '<p class="note">Rows: front members, smallest first (★ recommended). Columns: layers. '
        "Darker cells take a larger share of the file; labels name the structure and value "
        "methods.</p>"
        f'<div class="scroll">{svg.heatmap_chart(heatmap_data(summary))}</div>'
        + "".join(details)
        + "</section>"
    )


def _history_section(summary: dict[str, Any]) -> str:
    failed = [t for t in summary["trials"] if t["state"] == "fail"]
    over = [t for t in summary["trials"] if t["state"] == "complete" and not t["feasible"]]
    metric = Metric.of(summary)
    parts = [
        '<section id="history"><h2>Search history</h2>'
        f'<p class="note">The green line is the best ({metric.best_word}) validation '
        f"{_e(metric.name)} among the trials within budget so far; dots are trials (hollow "
        "orange: over budget), crosses failed trials.</p>",
        svg.history_chart(history_data(summary)),
    ]
    if failed:
        rows = [[_link(t["trial"]), f'<span class="reason">{_e(t["failure"] or "unknown")}'
                 "</span>"] for t in failed]
        parts.append(f"<h3>Failed trials ({len(failed)})</h3>" + _table(["trial", "reason"], rows))
    if over:
        budget = summary["budget_bytes"]
        rows = [[_link(t["trial"]), f"{t['bytes']:,}", f"{t['bytes'] - budget:,}",
                 _e(metric.text(t["val_accuracy"]))] for t in over]
        parts.append(f"<h3>Over-budget trials ({len(over)})</h3>"
                     + _table(["trial", "bytes", "over by", f"validation {_e(metric.name)}"],
                              rows, {1, 2, 3}))
    parts.append("</section>")
    return "".join(parts)


def _trials_section(summary: dict[str, Any]) -> str:
    rows = []
    metric = Metric.of(summary)
    for row in sorted(summary["trials"], key=lambda r: r["trial"]):
        kind = trial_kind(row, summary)
        size = "-" if row["bytes"] is None else f"{row['bytes']:,}"
        seconds = "-" if row.get("seconds") is None else f"{row['seconds']:.1f}"
        rows.append(
            f'<tr id="trial-{row["trial"]}"><td class="num">{row["trial"]}</td>'
            f'<td><span class="badge {kind}">{_e(KIND_TEXT[kind])}</span></td>'
            f'<td class="num">{size}</td><td class="num">{_e(metric.text(row["val_accuracy"]))}'
            f'</td><td class="num">{seconds}</td>'
            f"<td><details><summary>plan</summary>{_trial_card(row, summary)}</details></td></tr>"
        )
    head = "".join(
        f'<th{" class=num" if i in (0, 2, 3, 4) else ""}>{h}</th>'
        for i, h in enumerate(["trial", "outcome", "bytes", f"validation {_e(metric.name)}",
                               "seconds", "plan"])
    )
    return (
        '<section id="trials"><h2>All trials</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _reproduce_section(summary: dict[str, Any]) -> str:
    settings = summary.get("settings") or {}
    command = summary.get("command") or "autoshrink search"
    rows = [[f"<code>{_e(k)}</code>", f"<code>{_e(json.dumps(v))}</code>"]
            for k, v in settings.items()]
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in (summary.get("versions") or {}).items())
    return (
        '<section id="reproduce"><h2>Reproduce</h2>'
        f"<p>Command:</p><pre>{_e(command)}</pre>"
        f"<p>Seed <strong>{_e(settings.get('seed'))}</strong>, sampler "
        f"<strong>{_e(settings.get('sampler'))}</strong>, backend "
        f"<strong>{_e(settings.get('backend'))}</strong>. Versions: {versions}.</p>"
        f"<p>Regenerate this page, also while the search runs: "
        f"<code>autoshrink report {_e(summary['study'])}</code>. The same facts are in "
        "<code>pareto.json</code> and <code>report.md</code> next to it.</p>"
        "<details><summary>All settings</summary>"
        + _table(["setting", "value"], rows)
        + "</details></section>"
    )


SCRIPT = """
(function () {
  "use strict";
  function select(trial) {
    var card = document.querySelector("#trial-" + trial + " .trial-card");
    var panel = document.getElementById("selected-trial");
    if (!card || !panel) { return; }
    panel.replaceChildren(card.cloneNode(true));
    document.querySelectorAll(".selected").forEach(function (node) {
      node.classList.remove("selected");
    });
    document.querySelectorAll('[data-trial="' + trial + '"]').forEach(function (node) {
      node.classList.add("selected");
    });
  }
  function openRow(trial) {
    var details = document.querySelector("#trial-" + trial + " details");
    if (details) { details.open = true; }
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a.trial-link");
    if (!link) { return; }
    var trial = link.getAttribute("data-trial");
    select(trial);
    // In the plot the panel beside it shows the plan; elsewhere jump to the trial's row.
    if (link.closest(".pareto")) { event.preventDefault(); } else { openRow(trial); }
  });
  var match = /^#trial-(\\d+)$/.exec(window.location.hash);
  if (match) { openRow(match[1]); }
})();
"""

STYLE = """
:root { color-scheme: light; --ink: #111827; --muted: #4b5563; --line: #e5e7eb;
  --blue: #2563eb; --green: #16a34a; --orange: #ea580c; --red: #dc2626; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 22px; margin-bottom: 18px; }
h1 { font-size: 24px; margin: 0 0 6px; } h2 { font-size: 19px; margin: 0 0 8px; }
h3 { font-size: 16px; margin: 16px 0 6px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
pre { background: #f9fafb; border: 1px solid var(--line); border-radius: 6px; padding: 10px;
  white-space: pre-wrap; word-break: break-all; }
.note { color: var(--muted); margin: 4px 0 10px; }
.banner { background: #fffbeb; border: 1px solid #fcd34d; border-radius: 6px; padding: 8px 12px; }
.chips { margin: 8px 0 0; }
.badge { display: inline-block; border-radius: 999px; padding: 1px 10px; margin-right: 6px;
  font-size: 13px; background: #eef2ff; color: #3730a3; }
.badge.best { background: #dcfce7; color: #166534; } .badge.front { background: #dbeafe; }
.badge.over_budget { background: #ffedd5; color: #9a3412; }
.badge.failed { background: #fee2e2; color: #991b1b; }
.badge.running { background: #f3f4f6; color: #374151; }
.badge.feasible, .badge.complete { background: #eff6ff; color: #1e40af; }
.reason { color: #991b1b; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  font-size: 13px; word-break: break-word; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: #f9fafb; font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
table.compact { width: auto; min-width: 420px; }
td progress { width: 70px; height: 8px; vertical-align: middle; margin-left: 6px; }
tr:target { background: #faf5ff; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 500; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 4px 0 8px; font-size: 13px; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.plot-row { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
.plot { flex: 1 1 640px; min-width: 0; }
aside { flex: 0 1 380px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
  background: #fcfcfd; font-size: 14px; max-height: 470px; overflow: auto; }
aside h3 { margin-top: 0; }
aside table { table-layout: fixed; font-size: 13px; }
aside td { overflow-wrap: anywhere; }
h1 code { font-size: inherit; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 12px; }
.card { flex: 1 1 180px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card-label { color: var(--muted); font-size: 13px; }
.card-value { font-size: 24px; font-weight: 650; }
.card-sub { color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; }
svg.chart { max-width: 100%; height: auto; display: block; font-family: inherit; }
.grid { stroke: #eef0f3; } .frame { fill: none; stroke: #d1d5db; }
.tick { font-size: 12px; fill: var(--muted); }
.axis-title { font-size: 13px; fill: #374151; }
.over-region { fill: #fff1f2; }
.budget { stroke: var(--red); stroke-width: 2; stroke-dasharray: 6 4; }
.budget-label { font-size: 12px; font-weight: 600; fill: #b91c1c; }
.front-line { fill: none; stroke: var(--blue); stroke-width: 2; opacity: 0.45; }
.baseline-mark { fill: var(--ink); }
.mark-label { font-size: 12px; fill: #374151; } .mark-label.faint { fill: #9ca3af; }
.point { cursor: pointer; }
.point.best { fill: var(--green); stroke: #14532d; stroke-width: 2; }
.point.front { fill: var(--blue); stroke: #fff; stroke-width: 1.5; }
.point.feasible { fill: #fff; stroke: var(--blue); stroke-width: 1.6; }
.point.over { fill: #fff7ed; stroke: var(--orange); stroke-width: 1.8; }
.failed-point, .hfail { stroke: var(--red); stroke-width: 2.2; fill: none; cursor: pointer; }
.running-point { fill: none; stroke: #6b7280; stroke-dasharray: 2 2; stroke-width: 1.5; }
.strip-label, .strip-empty { font-size: 12px; fill: var(--muted); }
.hpoint.feasible { fill: var(--blue); } .hpoint { cursor: pointer; }
.hpoint.over { fill: #fff7ed; stroke: var(--orange); stroke-width: 1.6; }
.best-line { fill: none; stroke: var(--green); stroke-width: 2.5; }
.baseline-line { stroke: var(--ink); stroke-dasharray: 4 4; }
a.trial-link:hover .point, a.trial-link:hover .hpoint { stroke-width: 3; }
.selected.point, .selected.hpoint, .selected.failed-point, .selected.hfail {
  stroke: #9333ea; stroke-width: 3.5; }
.col-label { font-size: 13px; font-weight: 600; fill: var(--ink); }
.row-label { font-size: 13px; font-weight: 600; fill: var(--ink); }
.row-label.best { fill: #15803d; } .row-sub { font-size: 12px; fill: var(--muted); }
.cell-text { font-size: 12px; fill: var(--ink); } .cell-text.light { fill: #fff; }
.cell-text.strong { font-weight: 600; } .cell-text.small { font-size: 11px; }
.cell-empty { fill: #f9fafb; stroke: var(--line); }
"""


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def render_html(summary: dict[str, Any]) -> str:
    """``index.html``: one self-contained page with the same facts as ``pareto.json``."""
    policy = (
        f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    body = "".join(
        [
            _header(summary),
            _pareto_section(summary),
            _recommended_section(summary),
            _decisions_section(summary),
            _history_section(summary),
            _trials_section(summary),
            _reproduce_section(summary),
        ]
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{escape(policy)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty data: icon stops the browser from asking for /favicon.ico.
        '<link rel="icon" href="data:,">'
        f"<title>autoshrink · {_e(summary['study'])}</title>"
        f"<style>{STYLE}</style></head>"
        f"<body><main>{body}</main><script>{SCRIPT}</script></body></html>\n"
    )
