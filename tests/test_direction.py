"""Metrics with a direction: a regression model searched for the lowest mean squared error,
where lower is better everywhere (study, front, recommended model, retraining, reports,
plot), and the same figures back from the loaded artifact."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoshrink
from autoshrink.errors import UsageError
from autoshrink.metric import Metric
from autoshrink.reports.markdown import render_markdown
from autoshrink.reports.view import history_data, pareto_plot_data
from autoshrink.studies.retrain import spread_along
from autoshrink.studies.study import StudyFolder, load_study_readonly
from autoshrink.user_task import to_split

BUDGET = 6_000  # about half the float32 baseline's file
SETTINGS = {"finetune_steps": 30, "seed": 3, "retrain_epochs": 1, "retrain_top": 2}


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error (lower is better)."""
    return F.mse_loss(outputs, targets).item()


class Regressor(nn.Module):
    """Ten clinical measurements -> disease progression (standardised)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(10, 64)
        self.second = nn.Linear(64, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.second(torch.relu(self.first(x)))))


@pytest.fixture(scope="module")
def diabetes() -> dict:
    """scikit-learn's bundled diabetes data (nothing downloaded), a trained regressor."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32)[:, None]
    y = (y - y.mean()) / y.std()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    torch.manual_seed(0)
    net = Regressor()
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(100):
        loss = F.mse_loss(net(x[:300]), y[:300])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "net": net.eval(),
        "train": DataLoader(TensorDataset(x[:300], y[:300]), batch_size=50),
        "val": TensorDataset(x[300:370], y[300:370]),
        "test": DataLoader(TensorDataset(x[370:], y[370:]), batch_size=32),
        "x": x[370:], "y": y[370:],
    }


@pytest.fixture(scope="module")
def searched(diabetes: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("direction")
    result = autoshrink.search(
        diabetes["net"], train=diabetes["train"], val=diabetes["val"], test=diabetes["test"],
        metric=mse, direction="minimize", loss=F.mse_loss, budget=BUDGET, trials=8,
        out=out, study="reg", **SETTINGS,
    )
    return {"result": result, "out": out, "folder": out / "reg"}


def _search_figures(member: dict) -> tuple[int, float]:
    """What the search measured (before any retraining): the front's own coordinates."""
    figures = member.get("search", member)
    return figures["bytes"], figures["val_accuracy"]


def test_the_study_minimises_both_objectives(searched: dict) -> None:
    study = load_study_readonly(StudyFolder(searched["folder"]))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.user_attrs["metric"] == {"name": "mse", "direction": "minimize"}
    summary = searched["result"].summary
    assert summary["metric"] == {"name": "mse", "direction": "minimize"}
    assert searched["result"].metric == Metric("mse", "minimize")


def test_front_and_recommended_model_follow_lower_is_better(searched: dict) -> None:
    summary = searched["result"].summary
    front = summary["front"]
    assert len(front) >= 2 and summary["best"] is not None
    # The front is taken over each trial's best known figures (retrained where taken).
    points = [(m["bytes"], m["val_accuracy"]) for m in front]
    # Non-dominated under "fewer bytes and lower error are better": smallest first, each
    # larger member strictly lower in error than every smaller one.
    assert [b for b, _ in points] == sorted(b for b, _ in points)
    errors = [e for _, e in points]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    # Every other feasible trial whose search figures are its best known (never retrained)
    # is dominated by a front member.
    on_front = {m["trial"] for m in front}
    cache = json.loads((searched["folder"] / "retrained.json").read_text())
    retrained = {int(key.split("/")[1]) for key in cache}
    for trial in summary["trials"]:
        if (trial["state"] == "complete" and trial["feasible"]
                and trial["trial"] not in on_front | retrained):
            assert any(b <= trial["bytes"] and e <= trial["val_accuracy"] for b, e in points)
    # The recommended model: the lowest validation error within the budget, ties to the
    # smaller file (the rule pareto.py documents), on the members' final figures.
    best = min(front, key=lambda m: (m["val_accuracy"], m["bytes"]))
    assert summary["best"] == best["trial"] == searched["result"].best.trial
    feasible = [t["val_accuracy"] for t in summary["trials"]
                if t["state"] == "complete" and t["feasible"]]
    assert min(m["val_accuracy"] for m in front) <= min(feasible)
    # Not the highest error, which is what "higher is better" would have picked.
    assert best["val_accuracy"] < max(m["val_accuracy"] for m in front)
    # Fine-tuning minimised the mean squared error: the best model is near the baseline.
    assert best["val_accuracy"] < 1.5 * summary["baseline"]["val_accuracy"]


def test_retraining_is_taken_only_when_not_worse(searched: dict) -> None:
    summary = searched["result"].summary
    retrained = [m for m in summary["front"] if "retrained" in m]
    for member in retrained:
        figures, search = member["retrained"], member.get("search", member)
        expect = figures["bytes"] <= BUDGET and figures["val_accuracy"] <= search["val_accuracy"]
        assert figures["taken"] is expect
        if expect:
            assert member["val_accuracy"] == figures["val_accuracy"]
    # Two spread along the search's front (the lowest error in each half of its size range
    # on a log scale) and every starting plan within the budget were retrained; the front
    # then holds those whose figures still stand.
    feasible = [t for t in summary["trials"] if t["state"] == "complete" and t["feasible"]]
    searched_front = [
        t for t in feasible
        if not any((o["bytes"], o["val_accuracy"]) != (t["bytes"], t["val_accuracy"])
                   and o["bytes"] <= t["bytes"] and o["val_accuracy"] <= t["val_accuracy"]
                   for o in feasible)
    ]
    spread = spread_along(searched_front, 2, Metric(summary["metric"]["name"], "minimize"))
    starts = {t["trial"] for t in feasible if t["start"] is not None}
    cache = json.loads((searched["folder"] / "retrained.json").read_text())
    assert {int(key.split("/")[1]) for key in cache} == {m["trial"] for m in spread} | starts
    assert {m["trial"] for m in retrained} <= {m["trial"] for m in spread} | starts
    # The front's lowest error is its largest member.
    by_size = sorted(summary["front"], key=lambda m: m["bytes"])
    assert min(summary["front"], key=lambda m: m["val_accuracy"]) is by_size[-1]


def test_reports_name_the_metric_and_its_direction(searched: dict) -> None:
    folder = searched["folder"]
    markdown = (folder / "report.md").read_text()
    page = (folder / "index.html").read_text()
    for text in (markdown, page):
        assert "mse" in text and "lower is better" in text
        assert "accuracy" not in text.lower()
        assert "lowest validation mse within the budget" in text
    summary = searched["result"].summary
    best = next(m for m in summary["front"] if m["trial"] == summary["best"])
    assert f"validation mse {best['val_accuracy']:.4g}" in markdown
    assert "| validation mse | test mse |" in markdown
    # Values are numbers, not percentages.
    assert not re.search(r"validation mse [0-9.]+%", markdown + page)


def test_plot_axis_says_lower_is_better(searched: dict) -> None:
    summary = searched["result"].summary
    page = (searched["folder"] / "index.html").read_text()
    pareto = re.search(r'<svg class="chart pareto".*?</svg>', page, re.S).group(0)
    assert ">validation mse (lower is better)</text>" in pareto
    ticks = re.findall(r'class="tick" text-anchor="end">([^<]*)<', pareto)
    assert ticks and not any(t.endswith("%") for t in ticks)
    data = pareto_plot_data(summary)
    assert data["metric"]["axis"] == "validation mse (lower is better)"
    # The front's staircase falls as files grow: lower error needs more bytes.
    errors = [e for _, e in data["front_line"]]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
    # Values grow upwards (the title says which way is better): the lower a front member's
    # error, the lower its mark sits (larger SVG y).
    found = re.findall(r'<circle cx="[^"]+" cy="([^"]+)" r="[^"]+" class="point (?:front|best)" '
                       r'data-trial="(\d+)"', pareto)
    heights = {int(trial): float(cy) for cy, trial in found}
    members = sorted(summary["front"], key=lambda m: _search_figures(m)[1])
    assert len(heights) == len(members)
    ys = [heights[m["trial"]] for m in members]
    assert ys == sorted(ys, reverse=True)
    history = history_data(summary)
    best_so_far = [s["val_accuracy"] for s in history["best_so_far"] if s["val_accuracy"]]
    assert best_so_far == sorted(best_so_far, reverse=True)
    assert history["best_so_far"][-1]["val_accuracy"] == min(
        t["val_accuracy"] for t in summary["trials"]
        if t["state"] == "complete" and t["feasible"]
    )


def test_loaded_artifact_reproduces_the_reported_test_error(
    searched: dict, diabetes: dict
) -> None:
    result = searched["result"]
    assert result.best is not None and result.best.test_metric is not None
    model = autoshrink.load(result.best.artifact, model=Regressor())
    with torch.no_grad():
        measured = mse(model(diabetes["x"]), diabetes["y"])
        baseline = mse(diabetes["net"](diabetes["x"]), diabetes["y"])
    assert measured == pytest.approx(result.best.test_metric, rel=1e-5)
    assert result.summary["baseline"]["test_accuracy"] == pytest.approx(baseline, rel=1e-5)
    assert result.best.artifact.stat().st_size == result.best.bytes


def test_report_takes_the_direction_from_the_study(searched: dict, diabetes: dict) -> None:
    data = {k: diabetes[k] for k in ("train", "val", "test")}
    again = autoshrink.report("reg", out=searched["out"], model=diabetes["net"], metric=mse,
                              **data)
    assert again.best.trial == searched["result"].best.trial
    assert again.summary["metric"] == {"name": "mse", "direction": "minimize"}
    with pytest.raises(UsageError, match="searched with metric `mse`.*pass `metric=`"):
        autoshrink.report("reg", out=searched["out"], model=diabetes["net"], **data)
    with pytest.raises(UsageError, match=r"`mse` \(minimize\), not `mse` \(maximize\)"):
        autoshrink.report("reg", out=searched["out"], model=diabetes["net"], metric=mse,
                          direction="maximize", **data)


def test_an_older_summary_reads_as_accuracy(searched: dict) -> None:
    old = copy.deepcopy(searched["result"].summary)
    del old["metric"]
    assert Metric.of(old) == Metric("accuracy", "maximize")
    markdown = render_markdown(old)
    assert "validation accuracy" in markdown and "highest validation accuracy" in markdown


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"direction": "lower"}, "`direction='lower'`: expected \"maximize\""),
        ({"metric": "mse"}, "`metric=`: expected a function"),
        ({"task": "digits-mlp", "metric": mse}, "`metric=` go with `model=`"),
    ],
)
def test_bad_metric_input_is_one_clear_error(
    diabetes: dict, tmp_path: Path, kwargs: dict, needle: str
) -> None:
    model = None if "task" in kwargs else diabetes["net"]
    train = None if "task" in kwargs else diabetes["train"]
    with pytest.raises(UsageError) as caught:
        autoshrink.search(model, train=train, budget=BUDGET, trials=1, out=tmp_path, **kwargs)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_regression_targets_stay_numbers() -> None:
    split = to_split((torch.zeros(4, 2), torch.tensor([0.5, 1.5, 2.5, 3.5])), "train")
    assert split.y.dtype == torch.float32 and split.y[0].item() == 0.5
    labels = to_split((torch.zeros(2, 2), torch.tensor([1, 2], dtype=torch.int32)), "train")
    assert labels.y.dtype == torch.int64
