"""Report: ``pareto.json`` and ``report.md`` in the study folder, rendered from one summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import humanize

from autoshrink.pareto import write_json

__all__ = ["layer_decisions", "render_markdown", "write_report"]


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B ({humanize.naturalsize(n)})"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _choice(choice: dict[str, Any] | None) -> str:
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
                "structure": _choice(layer.get("structure")),
                "value": _choice(layer.get("value")),
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


def render_markdown(summary: dict[str, Any]) -> str:
    """``report.md``: the same facts as ``pareto.json``, for pull requests and terminals."""
    base = summary["baseline"]
    counts = summary["counts"]
    lines = [
        f"# autoshrink study `{summary['study']}`",
        "",
        f"Task `{summary['task']}`, budget {_size(summary['budget_bytes'])}. "
        f"Trials: {counts['complete']} complete ({counts['over_budget']} over budget), "
        f"{counts['failed']} failed, {counts['running']} running.",
        "",
        f"Baseline (float32): {_size(base['bytes'])}, validation {_pct(base['val_accuracy'])}, "
        f"test {_pct(base['test_accuracy'])}.",
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
            f"Trial {best['trial']}: {_size(best['bytes'])}, {best['ratio']:.1f}x smaller than "
            f"the baseline file, validation {_pct(best['val_accuracy'])}, "
            f"test {_pct(best['test_accuracy'])}. File: `{where}`.",
            "",
            "| layer | structure | value | bytes | share |",
            "|---|---|---|---:|---:|",
        ]
        plan_model = (best.get("plan") or {}).get("model")
        encoding = (best.get("plan") or {}).get("encoding")
        for row in layer_decisions(best):
            lines.append(
                f"| {row['layer']} | {row['structure']} | {row['value']} | "
                f"{row['bytes'] or 0:,} | {row['share']:.1%} |"
            )
        lines += ["", f"Model stage: {_choice(plan_model)}. Encoding: {_choice(encoding)}."]
    lines += [
        "",
        "## Pareto front (feasible trials)",
        "",
        "| trial | bytes | ratio | validation | test | artifact |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for m in summary["front"]:
        lines.append(
            f"| {m['trial']} | {m['bytes']:,} | {m['ratio']:.1f}x | {_pct(m['val_accuracy'])} | "
            f"{_pct(m['test_accuracy'])} | `{m['artifact']}` |"
        )
    failed = [t for t in summary["trials"] if t["state"] == "fail"]
    if failed:
        lines += ["", "## Failed trials", "", "| trial | reason |", "|---:|---|"]
        for t in failed:
            reason = (t["failure"] or "unknown").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {t['trial']} | {reason} |")
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
    """Write ``pareto.json`` and ``report.md`` into the study folder."""
    write_json(root / "pareto.json", summary)
    (root / "report.md").write_text(render_markdown(summary))
