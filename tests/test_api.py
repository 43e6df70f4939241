"""The Python API: the same results as the command line, and a model of your own with its
data loaders, no task needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoshrink
from autoshrink.errors import UsageError
from tests.conftest import run_cli

SETTINGS = {"finetune_steps": 20, "seed": 4, "retrain_epochs": 0}


def test_api_and_cli_give_the_same_front(tmp_path: Path) -> None:
    done = run_cli(
        "search", "--task", "digits-mlp", "--budget", "40kB", "--trials", "3", "--seed", "4",
        "--finetune-steps", "20", "--retrain-epochs", "0", "--out", str(tmp_path / "cli"),
        "--study", "s",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = autoshrink.search(
        task="digits-mlp", budget="40kB", trials=3, out=tmp_path / "api", study="s", **SETTINGS
    )
    cli = json.loads((tmp_path / "cli" / "s" / "pareto.json").read_text())
    assert [(m["trial"], m["bytes"], m["val_accuracy"]) for m in cli["front"]] == [
        (m.trial, m.bytes, m.val_accuracy) for m in result.front
    ]
    assert result.best is not None and result.best.trial == cli["best"]
    assert result.best.artifact.stat().st_size == result.best.bytes
    again = autoshrink.report("s", out=tmp_path / "api")
    assert [m.bytes for m in again.front] == [m.bytes for m in result.front]


class Net(nn.Module):
    """A model the search has never seen: no width knob, no task."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.first = nn.Linear(64, hidden)
        self.second = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


@pytest.fixture(scope="module")
def digits() -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(x[:1400]), y[:1400])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "net": net.eval(),
        "train": DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=100),
        "test": TensorDataset(x[1400:], y[1400:]),
        "x": x[1400:], "y": y[1400:],
    }


def test_your_own_model_with_data_loaders(digits: dict, tmp_path: Path) -> None:
    result = autoshrink.search(
        digits["net"], train=digits["train"], test=digits["test"], budget="12kB", trials=3,
        out=tmp_path, study="mine", **SETTINGS,
    )
    assert result.front and result.best is not None
    summary = result.summary
    assert summary["task"] == "model:Net"
    # Its trained weights are the baseline: measured, not trained again.
    with torch.no_grad():
        kept = (digits["net"](digits["x"]).argmax(1) == digits["y"]).float().mean().item()
    assert summary["baseline"]["test_accuracy"] == pytest.approx(kept)
    # No student was given: distillation is not in the space, and the report says why.
    assert all(t["plan"] is None or t["plan"].get("model") is None for t in summary["trials"])
    assert any("student=" in note for note in summary["notes"])
    assert "student=" in (tmp_path / "mine" / "report.md").read_text()
    for member in result.front:
        model = autoshrink.load(member.artifact, model=Net())
        with torch.no_grad():
            measured = (model(digits["x"]).argmax(1) == digits["y"]).float().mean().item()
        assert measured == pytest.approx(member.test_accuracy)
    # A report reads the study folder alone, so the command line rebuilds this one too,
    # without the model, to the same figures.
    written = json.loads((tmp_path / "mine" / "pareto.json").read_text())
    line = run_cli("report", "mine", "--out", str(tmp_path))
    assert line.returncode == 0, line.stderr
    rebuilt = json.loads((tmp_path / "mine" / "pareto.json").read_text())
    assert rebuilt["front"] == written["front"] and rebuilt["best"] == written["best"]
    again = autoshrink.report(
        "mine", out=tmp_path, model=digits["net"], train=digits["train"], test=digits["test"]
    )
    assert [m.bytes for m in again.front] == [m.bytes for m in result.front]


def test_a_student_brings_distillation_back(digits: dict, tmp_path: Path) -> None:
    from autoshrink.api import model_task

    task = model_task(digits["net"], input_shape=(64,), student=lambda w: Net(round(48 * w)))
    assert task.narrows and task.build_model(0.5).first.out_features == 24
    with pytest.raises(UsageError, match="student"):
        model_task(digits["net"]).build_model(0.5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"train": "not data", "test": "x"}, "expected a DataLoader"),
        ({"train": None, "test": None}, "needs `train=`"),
        ({"task": "digits-mlp"}, "either `model`"),
        ({"train": torch.utils.data.TensorDataset(torch.zeros(5, 64)), "test": "x"},
         "must be an \\(input, target\\) pair"),
    ],
)
def test_bad_api_input_is_one_clear_error(digits: dict, tmp_path: Path, kwargs, needle) -> None:
    with pytest.raises(UsageError, match=needle):
        autoshrink.search(digits["net"], budget="12kB", out=tmp_path, **kwargs)


class Counting(torch.utils.data.Dataset):
    """A dataset that counts the examples read from it."""

    def __init__(self, size: int) -> None:
        self.size, self.reads = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.reads += 1
        return torch.full((4,), float(index % 7)), index % 3


def test_loader_data_is_read_a_batch_at_a_time() -> None:
    from autoshrink.tasks import DatasetSplit
    from autoshrink.training import evaluate, fit
    from autoshrink.user_task import to_split

    dataset = Counting(100_000)
    split = to_split(DataLoader(dataset, batch_size=50), "train")
    assert isinstance(split, DatasetSplit)
    dataset.reads = 0
    split.fingerprint()
    assert dataset.reads == 128  # the first and last 64 examples, not all 100,000
    dataset.reads = 0
    model = nn.Linear(4, 3)
    fit(model, split, steps=5, batch_size=16, lr=1e-2, seed=0)
    assert dataset.reads <= 5 * 16
    small = to_split(Counting(300), "test")
    score = evaluate(model, small, lambda out, y: (out.argmax(1) == y).float().mean().item())
    assert 0.0 <= score <= 1.0


def test_without_test_data_the_figures_say_not_measured(digits: dict, tmp_path: Path) -> None:
    result = autoshrink.search(
        digits["net"], train=digits["train"], budget="12kB", trials=2, out=tmp_path,
        study="no-test", **SETTINGS,
    )
    assert result.summary["baseline"]["test_accuracy"] is None
    assert all(m.test_accuracy is None for m in result.front)
    assert "not measured" in (tmp_path / "no-test" / "report.md").read_text()
    assert "not measured" in (tmp_path / "no-test" / "index.html").read_text()


PARITY_MODULE = '''
import torch
from sklearn.datasets import load_digits
from torch import nn

import autoshrink


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def parts():
    """The trained model and its splits, the same in every process."""
    data = load_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(net(x[:1200]), y[:1200])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval(), (x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:])


def task():
    net, train, val, test = parts()
    return autoshrink.model_task(net, train=train, val=val, test=test)
'''


def test_a_model_task_by_reference_gives_the_api_front(tmp_path: Path, monkeypatch) -> None:
    """Your model searched from Python, and the same model named as `module:function` on the
    command line: the same plans and figures; the artifacts record the reference, so the
    command line rebuilds them without the model object."""
    (tmp_path / "parity_model.py").write_text(PARITY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import parity_model

    net, train, val, test = parity_model.parts()
    api = autoshrink.search(net, train=train, val=val, test=test, budget="9kB", trials=3,
                            out=tmp_path / "api", study="s", **SETTINGS)
    done = run_cli("search", "--task", "parity_model:task", "--budget", "9kB", "--trials", "3",
                   "--seed", "4", "--finetune-steps", "20", "--retrain-epochs", "0",
                   "--out", str(tmp_path / "cli"), "--study", "s",
                   env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    cli = json.loads((tmp_path / "cli" / "s" / "pareto.json").read_text())
    assert api.front and [(m.trial, m.plan.model_dump(), m.val_accuracy, m.test_accuracy)
                          for m in api.front] == [
        (m["trial"], m["plan"], m["val_accuracy"], m["test_accuracy"]) for m in cli["front"]
    ]
    # Only the task's name in the (compressed) header differs between the two files.
    for mine, theirs in zip(api.front, cli["front"], strict=True):
        assert abs(mine.bytes - theirs["bytes"]) <= 24
    best = tmp_path / "cli" / "s" / "best.safetensors"
    evaluated = run_cli("eval", str(best), "--task", "parity_model:task", "--json",
                        env={"PYTHONPATH": str(tmp_path)})
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    reported = next(m for m in cli["front"] if m["trial"] == cli["best"])
    assert json.loads(evaluated.stdout)["test_accuracy"] == reported["test_accuracy"]
    loaded = autoshrink.load(best, task="parity_model:task")
    assert loaded(test[0]).argmax(1).eq(test[1]).float().mean().item() == pytest.approx(
        reported["test_accuracy"])
