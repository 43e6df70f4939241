"""``report.md``: the facts of ``pareto.json`` as markdown, for pull requests and terminals."""

from __future__ import annotations

from typing import Any

from autoshrink.metric import Metric
from autoshrink.reports.view import choice_text, latency_table, layer_decisions, size_text

__all__ = ["render_markdown"]


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: dict[str, Any]) -> str:
    """``report.md``: the same facts as ``pareto.json``, for pull requests and terminals."""
    base = summary["baseline"]
    counts = summary["counts"]
    metric = Metric.of(summary)
    value = metric.text
    lines = [
        f"# autoshrink study `{summary['study']}`",
        "",
        f"Task `{summary['task']}`, budget {size_text(summary['budget_bytes'])}. "
        f"Trials: {counts['complete']} complete ({counts['over_budget']} over budget), "
        f"{counts['failed']} failed, {counts.get('pruned', 0)} stopped early, "
        f"{counts['running']} running.",
        "",
        f"Metric: `{metric.name}`, {metric.direction}d ({metric.better_word}).",
        "",
        f"Baseline (float32): {size_text(base['bytes'])}, "
        f"validation {metric.name} {value(base['val_accuracy'])}, "
        f"test {value(base['test_accuracy'])}."
        + (f" Test {metric.name} was not measured: the search had no test data."
           if base["test_accuracy"] is None else ""),
        *(f"Note: {note}." for note in summary.get("notes", [])),
        "",
        "Interactive report with plots: `index.html` in this folder.",
        "",
    ]
    best = next((m for m in summary["front"] if m["trial"] == summary["best"]), None)
    lines.append("## Recommended model")
    lines.append("")
    if best is None:
        lines.append("No trial fit the budget: raise `--budget` or search longer.")
    else:
        where = summary.get("best_artifact") or best["artifact"]
        lines += [
            f"The {metric.best_word} validation {metric.name} within the budget (ties go to the "
            "smaller file).",
            "",
            f"Trial {best['trial']}: {size_text(best['bytes'])}, {best['ratio']:.1f}x smaller "
            f"than the baseline file, validation {metric.name} {value(best['val_accuracy'])}, "
            f"test {value(best['test_accuracy'])}. File: `{where}`.",
            "",
            "| layer | structure | value | bytes | share |",
            "|---|---|---|---:|---:|",
        ]
        plan_model = (best.get("plan") or {}).get("model")
        encoding = (best.get("plan") or {}).get("encoding")
        for row in layer_decisions(best):
            lines.append(
                f"| {row['layer']} | {_md_cell(row['structure'])} | {_md_cell(row['value'])} | "
                f"{row['bytes'] or 0:,} | {row['share']:.1%} |"
            )
        lines += [
            "",
            f"Model stage: {choice_text(plan_model)}. Encoding: {choice_text(encoding)}.",
        ]
        latency = latency_table(best.get("latency"))
        if latency is not None:
            facts = ", ".join(f"{k} {v}" for k, v in latency["info"].items())
            lines += [
                "",
                f"Latency in ms per batch ({facts}):" if facts else "Latency in ms per batch:",
                "",
                "| engine | " + " | ".join(f"batch {b}" for b in latency["batches"]) + " |",
                "|---|" + "---:|" * len(latency["batches"]),
            ]
            for row in latency["rows"]:
                cells = " | ".join("-" if ms is None else f"{ms:.3f}" for ms in row["ms"])
                lines.append(f"| {_md_cell(row['engine'])} | {cells} |")
    lines += [
        "",
        "## Pareto front (feasible trials)",
        "",
        f"| trial | bytes | ratio | validation {metric.name} | test {metric.name} "
        "| search: validation, test | artifact |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for m in summary["front"]:
        search = m.get("search")
        before = (
            f"{value(search['val_accuracy'])}, {value(search.get('test_accuracy'))} "
            f"(retrained {m['retrained']['epochs']:g} epochs)" if search
            else "(retraining validated worse)" if m.get("retrained") else "(not retrained)"
        )
        trial = f"{m['trial']} (start {m['start']})" if m.get("start") else str(m["trial"])
        lines.append(
            f"| {trial} | {m['bytes']:,} | {m['ratio']:.1f}x | "
            f"{value(m['val_accuracy'])} | {value(m['test_accuracy'])} | {before} | "
            f"`{m['artifact']}` |"
        )
    if summary.get("left_front"):
        left = ", ".join(str(n) for n in summary["left_front"])
        lines += ["", f"Retraining moved the front: trials {left} were on the search's front "
                  "and left it, beaten by retrained plans (their search figures are in "
                  "`pareto.json` under `trials`)."]
    if any(m.get("start") for m in summary["front"]):
        lines += ["", "A trial marked *start N* ran the preset's N-th starting plan; when the "
                  "front is retrained, every start is, on the search's front or not, and the "
                  "front is taken again over the figures that stand."]
    budget = summary["budget_bytes"]
    over = [t for t in summary["trials"] if t["state"] == "complete" and not t["feasible"]]
    if over:
        lines += ["", "## Over-budget trials", "",
                  f"| trial | bytes | over by | validation {metric.name} |",
                  "|---:|---:|---:|---:|"]
        for t in over:
            untrained = " (not trained: over the budget before training)" if t.get(
                "untrained") else ""
            lines.append(
                f"| {t['trial']} | {t['bytes']:,} | {t['bytes'] - budget:,} | "
                f"{value(t['val_accuracy'])}{untrained} |"
            )
    fitted = [str(t["trial"]) for t in summary["trials"] if t.get("fitted")]
    if fitted:
        lines += ["", f"Plans tightened to fit the budget before training (trials "
                  f"{', '.join(fitted)}): the sampler asked for larger settings of the same "
                  "methods."]
    failed = [t for t in summary["trials"] if t["state"] == "fail"]
    if failed:
        lines += ["", "## Failed trials", "", "| trial | reason |", "|---:|---|"]
        for t in failed:
            lines.append(f"| {t['trial']} | {_md_cell(t['failure'] or 'unknown')} |")
    stopped = [t for t in summary["trials"] if t["state"] == "pruned"]
    if stopped:
        lines += ["", "## Trials stopped early", "", "| trial | why |", "|---:|---|"]
        for t in stopped:
            lines.append(f"| {t['trial']} | {_md_cell(t.get('stopped') or 'unknown')} |")
    lines += [
        "",
        "## Reproduce",
        "",
        f"    {summary.get('command') or 'autoshrink search'}",
        "",
        "Seed {seed}, sampler {sampler}, backend {backend}.".format(**summary["settings"]),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)
