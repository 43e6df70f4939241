"""The examples run as users run them (on small settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bring_your_own_model(tmp_path: Path) -> None:
    from autoshrink.datasets import fashion_mnist_dir
    from autoshrink.errors import DataNotFoundError

    try:
        fashion_mnist_dir(None)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bring_your_own.py"), "1500", "2",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "AUTOSHRINK_FINETUNE_STEPS": "30", "AUTOSHRINK_RETRAIN_EPOCHS": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"([\d,]+) bytes, test accuracy ([\d.]+)%", done.stdout)
    assert found, done.stdout[-2000:]
    pareto = json.loads((tmp_path / "bring-your-own" / "pareto.json").read_text())
    best = next(m for m in pareto["front"] if m["trial"] == pareto["best"])
    assert int(found.group(1).replace(",", "")) == best["bytes"] <= 20_000
    assert float(found.group(2)) == pytest.approx(100 * best["test_accuracy"], abs=0.006)
    assert pareto["task"] == "model:ResidualCNN"
