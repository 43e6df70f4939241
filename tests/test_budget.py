"""Plans against the byte budget before training: starting plans over it are tightened until
their artifact fits (keeping their methods), and sampled plans far over it are measured as
they are instead of being trained."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.storages.journal import JournalFileBackend

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.baseline import load_baseline
from autoshrink.budget import FIGURE_SHAPE, tighten_to_fit
from autoshrink.compress import compress
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.space import build_space
from autoshrink.training import evaluate
from autoshrink.trial import TrialBudget, run_trial
from tests.conftest import run_cli

EIGHT_BITS = LayerPlan(
    structure=Choice(method="dense"),
    value=Choice(method="quantization", config={"bits": 8, "mode": "kmeans"}),
)


def _bytes(plan: Plan, task, registry, model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return write_artifact(Path(folder) / "a.safetensors", compress(model, plan, registry),
                              plan, task, registry, info=FIGURE_SHAPE)


def test_a_start_over_budget_is_tightened_to_fit(registry) -> None:
    task = registry.tasks["digits-mlp"]
    torch.manual_seed(0)
    model = task.build_model(1.0)
    space = build_space(model, registry)
    start = Plan(layers={layer.name: EIGHT_BITS for layer in space.layers})
    size = _bytes(start, task, registry, model)
    assert tighten_to_fit(start, task, space, registry, size, model) == start

    budget = size * 6 // 10
    fitted = tighten_to_fit(start, task, space, registry, budget, model)
    assert fitted is not None and fitted != start
    assert _bytes(fitted, task, registry, model) <= budget
    bits = {name: layer.value.config["bits"] for name, layer in fitted.layers.items()}
    # Same methods; a layer holding most bytes (64x128 and 128x64 tie) gave up bits first,
    # and no layer got wider.
    assert all(layer.value.method == "quantization" for layer in fitted.layers.values())
    assert all(b <= 8 for b in bits.values()) and min(bits.values()) < 8
    heaviest = max(space.layers, key=lambda layer: model.get_submodule(layer.name).weight.numel())
    assert bits[heaviest.name] == min(bits.values())

    # No setting of dense + quantization fits a few hundred bytes.
    assert tighten_to_fit(start, task, space, registry, 600, model) is None


def test_a_plan_far_over_the_budget_is_measured_untrained(tmp_path: Path, registry) -> None:
    task = registry.tasks["digits-mlp"]
    data = task.load_data(None)
    baseline = load_baseline(task, data, registry)
    plan = Plan(layers={name: EIGHT_BITS for name in ("fc1", "fc2", "out")})
    size = _bytes(plan, task, registry, baseline.model)
    path = tmp_path / "t.safetensors"
    torch.manual_seed(0)
    under = run_trial(plan, task=task, data=data, baseline=baseline, registry=registry,
                      artifact=path, budget=TrialBudget(finetune_steps=30, size_limit=size * 2),
                      seed=0)
    assert under.trained and abs(under.bytes - size) < size // 20
    over = run_trial(plan, task=task, data=data, baseline=baseline, registry=registry,
                     artifact=path, budget=TrialBudget(finetune_steps=30, size_limit=size // 2),
                     seed=0)
    assert not over.trained and over.bytes == path.stat().st_size > size // 2
    # Its figure is measured, on the file as written.
    reloaded = read_artifact(path, registry, task).model
    assert evaluate(reloaded, data.val, task.metric) == over.val_accuracy


def test_untrained_trials_are_recorded_as_such(tmp_path: Path) -> None:
    preset = tmp_path / "bits.toml"
    preset.write_text('[layers.Linear]\nstructure = ["dense"]\nvalue = ["float", "quantization"]\n')
    done = run_cli("search", "--task", "digits-mlp", "--finetune-steps", "30", "--budget", "12kB",
                   "--trials", "5", "--space", str(preset), "--retrain-epochs", "0", "--seed", "1",
                   "--out", str(tmp_path), "--study", "s")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = json.loads((tmp_path / "s" / "pareto.json").read_text())["trials"]
    limit = 12_000 + 1_200
    untrained = [t for t in trials if t["untrained"]]
    assert untrained, trials
    for t in trials:
        assert bool(t["untrained"]) == (t["bytes"] > limit), t
    assert "not trained" in (tmp_path / "s" / "report.md").read_text()


def test_a_sampled_plan_over_the_budget_is_tightened_before_training(
    tmp_path: Path, registry
) -> None:
    # Quantization alone, 1 to 8 bits: 8-bit layers are about twice this budget, so every
    # plan of more than 4 bits or so is over it as sampled.
    preset = tmp_path / "bits.toml"
    preset.write_text('[layers.Linear]\nstructure = ["dense"]\nvalue = ["quantization"]\n')
    done = run_cli("search", "--task", "digits-mlp", "--finetune-steps", "20", "--budget", "9kB",
                   "--trials", "6", "--space", str(preset), "--retrain-epochs", "0",
                   "--out", str(tmp_path), "--study", "s")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "s"
    trials = json.loads((folder / "pareto.json").read_text())["trials"]
    fitted = [t for t in trials if t["fitted"]]
    assert fitted, trials
    assert all(t["state"] == "complete" and t["bytes"] <= 9_000 and not t["untrained"]
               for t in trials), trials
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    study = optuna.load_study(study_name="s", storage=storage)
    kept = [row for row in fitted if row["artifact"]]  # the front's artifacts are kept
    assert kept, trials
    for row in kept:  # the plan recorded is the plan built
        artifact = read_artifact(folder / row["artifact"], registry, registry.tasks["digits-mlp"])
        assert artifact.header.plan.model_dump(mode="json") == row["plan"]
    for row in fitted:  # with fewer bits than the sampler asked for on some layer, on none more
        asked = study.trials[row["trial"]].params
        layers = row["plan"]["layers"]
        built = {name: layer["value"]["config"]["bits"] for name, layer in layers.items()}
        sampled = {name: asked.get(f"layer.{name}.quantization.bits", 8) for name in built}
        assert all(built[n] <= sampled[n] for n in built) and built != sampled, (built, sampled)
    assert "tightened to fit the budget" in (folder / "report.md").read_text()


def test_an_entropy_coded_plan_far_over_the_budget_is_tightened_to_fit(registry) -> None:
    # Huffman takes a share of every layer's bytes away, so the layers are aimed at the
    # budget's share of the file, not at the budget itself.
    task = registry.tasks["digits-mlp"]
    torch.manual_seed(0)
    model = task.build_model(1.0)
    space = build_space(model, registry)
    plan = Plan(layers={layer.name: EIGHT_BITS for layer in space.layers},
                encoding=Choice(method="entropy", config={"codec": "huffman"}))
    budget = _bytes(plan, task, registry, model) // 3
    fitted = tighten_to_fit(plan, task, space, registry, budget, model)
    assert fitted is not None and fitted.encoding == plan.encoding
    assert _bytes(fitted, task, registry, model) <= budget


def test_a_knob_moved_all_the_way_stays_inside_its_range() -> None:
    from autoshrink.budget import _toward

    layer = LayerPlan(structure=Choice(method="lowrank", config={"rank": 0.1007012080683658}),
                      value=Choice(method="float", config={"bits": 16}))
    moved = _toward(layer, {("structure", "rank"): 0.01}, 1.0)
    # unclamped, float rounding gives 0.009999999999999995, below the range and refused
    assert moved.structure.config["rank"] == 0.01
