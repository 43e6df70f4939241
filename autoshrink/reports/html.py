"""``index.html``: one self-contained page per study, rendered from the summary dict.

The page needs nothing from the network: charts are static inline SVG (:mod:`.svg`), the
little interactivity (click a mark to see its trial's plan) is one inline script, and a
Content-Security-Policy allows only that script and the page's own style (by hash), so even a
mistake that let markup through could load nothing and run nothing.

Plot data is computed by plain functions of :mod:`autoshrink.reports.view`
(``pareto_plot_data``, ``history_data``, ``heatmap_data``, ``recommended``) and drawn here,
so tests check the data without parsing SVG. Every piece of text is escaped: plans and failure
reasons come from plugins.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Collection
from html import escape
from importlib import resources
from typing import Any

import autoshrink.reports.svg as svg
from autoshrink.metric import Metric
from autoshrink.reports.view import (
    KIND_TEXT,
    by_size,
    choice_text,
    heatmap_data,
    history_data,
    latency_table,
    layer_decisions,
    pareto_plot_data,
    recommended,
    retrained_text,
    size_text,
    trial_kind,
)

__all__ = ["render_html"]


# ---------------------------------------------------------------------------- plot data


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
    if row.get("fitted"):
        facts.append(_e(row["fitted"]))
    if row.get("failure"):
        facts.append(f'<span class="reason">{_e(row["failure"])}</span>')
    if row.get("stopped"):
        facts.append(f'<span class="reason">{_e(row["stopped"])}</span>')
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
    ('<path d="M8 3L13 12L3 12Z" class="point stopped"/>', "stopped early (where it stood)"),
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
    if counts.get("pruned"):
        chips.append(("stopped", f"{counts['pruned']} stopped early"))
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
    for member in sorted(summary["front"], key=lambda m: by_size(m, metric)):
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
    stopped = [t for t in summary["trials"] if t["state"] == "pruned"]
    if stopped:
        rows = [[_link(t["trial"]), f'<span class="reason">{_e(t.get("stopped") or "")}</span>']
                for t in stopped]
        parts.append(f"<h3>Trials stopped early ({len(stopped)})</h3>"
                     + _table(["trial", "why"], rows))
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


#: The page's script and style, package data files (inlined, allowed by hash).
SCRIPT = (resources.files(__package__) / "page.js").read_text()
STYLE = (resources.files(__package__) / "page.css").read_text()


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
