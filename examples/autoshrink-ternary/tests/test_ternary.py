import torch
from autoshrink_ternary import Ternary

from autoshrink.artifact import read_artifact, size_breakdown, write_artifact
from autoshrink.compress import compress
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.testing import ValueMethodTests


class TestTernary(ValueMethodTests):
    method = Ternary()
    configs = [{"threshold": 0.0}, {"threshold": 0.05}, {"threshold": 0.3}]


def test_a_task_compressed_with_it_reads_back(registry, tmp_path):
    task = registry.tasks["digits-mlp"]
    plan = Plan(layers={"fc1": LayerPlan(value=Choice(method="ternary"))})
    model = compress(task.build_model(1.0), plan, registry).eval()
    path = tmp_path / "ternary.safetensors"
    write_artifact(path, model, plan, task, registry)
    x = task.example_input(8)
    with torch.no_grad():
        assert torch.equal(read_artifact(path, registry).model(x), model(x))
    # fc1: 128 x 64 weights in 2 bits each, and its 128 biases as float32
    assert size_breakdown(path)["fc1"] == 128 * 64 // 4 + 128 * 4
