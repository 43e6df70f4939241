"""Reports: ``pareto.json``, ``report.md`` and ``index.html`` in a study folder, all rendered
from one outcome (:func:`autoshrink.studies.pareto.collect`), so the three never disagree.

:mod:`.view` turns the summary into what is shown, :mod:`.markdown` and :mod:`.html` (with
:mod:`.svg` and the page's ``page.css`` / ``page.js``) render it. Nothing here reads a study
or trains: a report is drawn from the summary alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoshrink.files import write_atomic
from autoshrink.reports.html import render_html
from autoshrink.reports.markdown import render_markdown
from autoshrink.studies.pareto import write_json

__all__ = ["write_report"]


def write_report(root: Path, summary: dict[str, Any]) -> None:
    """Write ``pareto.json``, ``report.md`` and ``index.html`` into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "pareto.json", summary)
    write_atomic(root / "report.md", render_markdown(summary))
    write_atomic(root / "index.html", render_html(summary))
