"""Report: ``pareto.json``, ``report.md`` and ``index.html`` in the study folder, all rendered
from one summary (:func:`autoshrink.pareto.summarize`), so the three never disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import humanize
import optuna

from autoshrink.errors import UsageError
from autoshrink.files import write_atomic
from autoshrink.journal import JournalError, check_journal
from autoshrink.metric import Metric
from autoshrink.pareto import BEST, summarize, write_json
from autoshrink.storage import display, is_journal, open_storage
from autoshrink.study import (
    Provided,
    StudyFolder,
    check_metric,
    prepare,
    storage_address,
    study_identity,
)

__all__ = [
    "choice_text",
    "latency_table",
    "layer_decisions",
    "load_study_readonly",
    "pct_text",
    "regenerate",
    "render_markdown",
    "size_text",
    "write_report",
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
        f"{counts['failed']} failed, {counts['running']} running.",
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
        lines.append(
            f"| {m['trial']} | {m['bytes']:,} | {m['ratio']:.1f}x | "
            f"{value(m['val_accuracy'])} | {value(m['test_accuracy'])} | {before} | "
            f"`{m['artifact']}` |"
        )
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
    failed = [t for t in summary["trials"] if t["state"] == "fail"]
    if failed:
        lines += ["", "## Failed trials", "", "| trial | reason |", "|---:|---|"]
        for t in failed:
            lines.append(f"| {t['trial']} | {_md_cell(t['failure'] or 'unknown')} |")
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


def write_report(root: Path, summary: dict[str, Any]) -> None:
    """Write ``pareto.json``, ``report.md`` and ``index.html`` into ``root``."""
    # html_report builds on this module's helpers, so it is imported here, not at the top.
    from autoshrink.html_report import render_html

    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "pareto.json", summary)
    write_atomic(root / "report.md", render_markdown(summary))
    write_atomic(root / "index.html", render_html(summary))


def load_study_readonly(folder: StudyFolder) -> optuna.Study:
    """The study in a folder's journal, read without writing to it.

    ``open_study(..., create=False)`` goes through ``create_study(load_if_exists=True)``,
    which appends a create-study record to the journal on every call; a report, which may be
    regenerated often and while a search writes the same journal, only reads.
    """
    settings = folder.load_settings()
    address = storage_address(folder, settings)
    if is_journal(address):
        if not folder.journal.is_file():
            raise UsageError(
                f"no study journal in {folder.root}; start one with `autoshrink search`"
            )
        found = check_journal(folder.journal)
        if found.problem:  # a cut tail is fine: Optuna's reader skips it
            raise JournalError(
                f"study journal {found.problem}. `autoshrink doctor {folder.name}` explains, "
                "`--repair` fixes it after a backup"
            )
    identity = study_identity(folder)
    storage = open_storage(address)
    if identity.name not in optuna.get_all_study_names(storage):
        raise UsageError(f"{display(address)} holds no study named `{identity.name}`")
    return optuna.load_study(study_name=identity.name, storage=storage)


def regenerate(folder: StudyFolder, provided: Provided | None = None) -> dict[str, Any]:
    """Rebuild ``pareto.json``, ``report.md`` and ``index.html`` from the study's journal,
    also while its search is still running; returns the summary. A study of a model handed
    over in Python needs it again (``provided``)."""
    settings = folder.load_settings()
    study = load_study_readonly(folder)
    if provided is None and settings.task.startswith("model:"):
        raise UsageError(
            f"study `{folder.name}` searched a model handed over in Python "
            f"({settings.task}); rebuild its report with `autoshrink.report(\"{folder.name}\", "
            "model=..., train=..., test=...)`"
        )
    setup = prepare(settings, provided=provided)  # the baseline is cached: no training here
    check_metric(study, setup.task)
    # Not final: a running search still needs the artifacts a final summary would delete.
    summary = summarize(study, folder, setup, final=False)
    best = next((m for m in summary["front"] if m["trial"] == summary["best"]), None)
    copy, source = folder.root / BEST, folder.root / (best or {}).get("artifact", "")
    # A finished search copied its recommended model; name the copy when it still is one.
    if best and copy.is_file() and source.is_file() and copy.read_bytes() == source.read_bytes():
        summary["best_artifact"] = BEST
    write_report(folder.root, summary)
    return summary


# `autoshrink.report(study)` is the API call of this module's name (autoshrink.api.report).
from autoshrink.api import callable_module  # noqa: E402

callable_module(__name__, "report")
