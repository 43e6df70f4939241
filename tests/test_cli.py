"""The command line as users run it: output, exit codes, one-line errors, settings order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoshrink import datasets
from autoshrink.errors import DataNotFoundError, UsageError
from autoshrink.settings import load_settings
from tests.conftest import run_cli


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_baseline_then_eval_reproduces_its_accuracy() -> None:
    first = run_cli("baseline", "--task", "digits-mlp", "--json")
    assert first.returncode == 0, first.stderr
    baseline = json.loads(first.stdout)
    assert baseline["test_accuracy"] > 0.9 and baseline["val_accuracy"] > 0.9
    assert baseline["bytes"] == Path(baseline["artifact"]).stat().st_size
    again = run_cli("baseline", "--task", "digits-mlp")
    assert "(cached)" in again.stdout
    evaluated = run_cli("eval", baseline["artifact"], "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["bytes"] == baseline["bytes"]
    assert result["test_accuracy"] == baseline["test_accuracy"]


def test_space_lists_per_layer_parameters() -> None:
    result = run_cli("space", "--task", "digits-mlp")
    assert result.returncode == 0, result.stderr
    for name in ("layer.fc1.structure", "layer.out.value", "model.method", "encoding.method"):
        assert name in result.stdout


def test_unknown_task() -> None:
    line = one_line_error(run_cli("space", "--task", "mnist-resnet"), 2)
    assert "unknown task `mnist-resnet`" in line and "digits-mlp" in line


@pytest.mark.parametrize("budget", ["5XB", "-1MB"])
def test_bad_budget(tmp_path: Path, budget: str) -> None:
    line = one_line_error(run_cli("search", "--budget", budget, "--out", str(tmp_path)), 2)
    assert "budget" in line and budget in line
    assert list(tmp_path.iterdir()) == []


def test_preset_widening_a_bound(tmp_path: Path) -> None:
    preset = tmp_path / "wide.toml"
    preset.write_text("[ranges.float]\nbits = [8]\n")
    line = one_line_error(run_cli("space", "--task", "digits-mlp", "--space", str(preset)), 2)
    assert "line 2" in line and "ranges.float.bits" in line


def test_corrupt_artifact(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    line = one_line_error(run_cli("eval", str(path)), 1)
    assert "not a valid autoshrink artifact" in line


def test_settings_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "autoshrink.toml").write_text('task = "digits-mlp"\nseed = 3\nworkers = 2\n')
    monkeypatch.setenv("AUTOSHRINK_SEED", "5")
    settings = load_settings(workers=4, budget="5MiB")
    assert settings.task == "digits-mlp"  # config file over default
    assert settings.seed == 5  # environment over config file
    assert settings.workers == 4  # flag over everything
    assert settings.budget == 5 * 1024 * 1024
    assert load_settings(budget="5MB").budget == 5_000_000
    with pytest.raises(UsageError, match="• budget"):
        load_settings(budget="5XB")


def test_missing_fashion_mnist_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.delenv("AUTOSHRINK_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist(tmp_path, flatten=True)
