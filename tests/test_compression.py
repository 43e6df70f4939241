"""Every method through the real artifact path on a model with Linear and Conv2d layers:
files shrink as knobs tighten, and write -> read gives identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.compress import compress
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers
from autoshrink.tasks import Split
from autoshrink.training import fit

WIDTH = 0.25  # a narrow fashion-mnist-cnn: two Conv2d and two Linear layers


def plan_for(
    layers: list[str],
    structure: Choice | None = None,
    value: Choice | None = None,
    encoding: Choice | None = None,
) -> Plan:
    layer = LayerPlan(
        structure=structure or Choice(method="dense"), value=value or Choice(method="float")
    )
    return Plan(layers={name: layer for name in layers}, encoding=encoding)


SETTINGS = {
    "hashing": ("structure", "ratio", [0.5, 0.1, 0.02]),
    "lowrank": ("structure", "rank", [0.8, 0.3, 0.05]),
    "pruning": ("structure", "threshold", [0.3, 1.0, 2.0]),
    "quantization": ("value", "bits", [8, 4, 1]),
    "float": ("value", "bits", [32, 16]),
}


def write_and_check(tmp_path: Path, registry, plan: Plan, name: str) -> int:
    task = registry.tasks["fashion-mnist-cnn"]
    torch.manual_seed(0)
    model = task.build_model(WIDTH)
    compressed = compress(model, plan, registry)
    x = torch.rand(32, 1, 28, 28)
    fit(compressed, Split(x, torch.randint(0, 10, (32,))), steps=2, batch_size=16, lr=1e-3, seed=0)
    path = tmp_path / f"{name}.safetensors"
    size = write_artifact(path, compressed, plan, task, registry, width=WIDTH)
    loaded = read_artifact(path, registry)
    with torch.no_grad():
        compressed.eval()
        assert torch.equal(loaded.model(x), compressed(x)), name
    return size


@pytest.mark.parametrize("method", list(SETTINGS))
def test_artifact_bytes_fall_as_the_knob_tightens(tmp_path: Path, registry, method: str):
    stage, knob, values = SETTINGS[method]
    layers = list(
        compressible_layers(registry.tasks["fashion-mnist-cnn"].build_model(WIDTH), registry)
    )
    sizes = []
    for value in values:
        choice = Choice(method=method, config={knob: value})
        plan = plan_for(layers, **{stage: choice})
        sizes.append(write_and_check(tmp_path, registry, plan, f"{method}-{value}"))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes


def test_deep_compression_plan_roundtrips_and_entropy_helps(tmp_path: Path, registry) -> None:
    layers = list(
        compressible_layers(registry.tasks["fashion-mnist-cnn"].build_model(WIDTH), registry)
    )
    structure = Choice(method="pruning", config={"threshold": 1.5})
    value = Choice(method="quantization", config={"bits": 4})
    plain = write_and_check(tmp_path, registry, plan_for(layers, structure, value), "dc")
    coded = write_and_check(
        tmp_path,
        registry,
        plan_for(layers, structure, value, Choice(method="entropy", config={"codec": "huffman"})),
        "dc-huffman",
    )
    assert coded < plain


def test_distilled_student_artifact(tmp_path: Path, registry) -> None:
    task = registry.tasks["digits-mlp"]
    plan = Plan(model=Choice(method="distillation", config={"width": 0.25}))
    student = task.build_model(0.25)
    path = tmp_path / "student.safetensors"
    size = write_artifact(path, compress(student, plan, registry), plan, task, registry, width=0.25)
    teacher = tmp_path / "teacher.safetensors"
    assert size < write_artifact(teacher, task.build_model(1.0), Plan(), task, registry) / 3
    loaded = read_artifact(path, registry)
    assert loaded.header.width == 0.25
    assert loaded.model.fc1.out_features == 32


def test_a_student_learns_from_teacher_outputs_computed_once(registry) -> None:
    """On data in memory the teacher's outputs are computed in one pass and looked up by
    example; the loss is the one asking the teacher every batch gives (the path a Dataset
    keeps)."""
    from torch.utils.data import TensorDataset

    from autoshrink.pipeline import model_step
    from autoshrink.tasks import DatasetSplit
    from autoshrink.trial import _distillation

    task = registry.tasks["digits-mlp"]
    train = task.load_data(None).train
    assert isinstance(train, Split)
    torch.manual_seed(0)
    teacher = task.build_model(1.0).eval()
    student = model_step(Choice(method="distillation", config={"width": 0.25}), registry)
    indexed, looked_up = _distillation(student, teacher, train)
    assert indexed.x is train.x and torch.equal(indexed.y, torch.arange(len(train)))
    from_dataset = DatasetSplit(TensorDataset(train.x, train.y))
    same, asked = _distillation(student, teacher, from_dataset)
    assert same is from_dataset
    pick = torch.tensor([5, 0, 17, 3])
    logits = task.build_model(0.25)(train.x[pick])
    expected = asked(logits, train.x[pick], train.y[pick])
    assert torch.allclose(looked_up(logits, train.x[pick], pick), expected, atol=1e-6)
    assert expected.item() > 0
    # Outputs larger than the inputs (ten per two features) are not held: asked each batch.
    narrow = Split(torch.randn(32, 2), torch.randint(0, 10, (32,)))
    kept, _ = _distillation(student, torch.nn.Linear(2, 10), narrow)
    assert kept is narrow


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_scheduled_pruning_through_a_trial(tmp_path: Path, registry, schedule: str) -> None:
    """A trial prunes on its schedule while it fine-tunes and writes only the survivors: the
    file's layers reach the target sparsity and the file is the trial's reported bytes."""
    from autoshrink.baseline import load_baseline
    from autoshrink.trial import TrialBudget, run_trial

    task = registry.tasks["digits-mlp"]
    data = task.load_data(None)
    baseline = load_baseline(task, data, registry)
    structure = Choice(
        method="pruning", config={"target": "sparsity", "sparsity": 0.9, "schedule": schedule}
    )
    value = Choice(method="quantization", config={"bits": 5, "mode": "kmeans"})
    plan = plan_for(list(compressible_layers(baseline.model, registry)), structure, value)
    outcome = run_trial(
        plan, task=task, data=data, baseline=baseline, registry=registry,
        artifact=tmp_path / "t.safetensors", budget=TrialBudget(finetune_steps=60), seed=0,
    )
    assert outcome.bytes == (tmp_path / "t.safetensors").stat().st_size
    loaded = read_artifact(tmp_path / "t.safetensors", registry, task).model
    for name, layer in compressible_layers(baseline.model, registry).items():
        kept = layer.weight.numel() - int(0.9 * layer.weight.numel())
        nonzero = int((loaded.get_submodule(name).dense_weight() != 0).sum())
        assert 0.9 * kept <= nonzero <= kept, (name, nonzero, kept)
    assert outcome.val_accuracy > 0.5  # digits: 10 classes, the baseline is near 0.97
