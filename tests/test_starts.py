"""Starting plans over the budget are tightened until their artifact fits it, keeping their
methods; plans that fit are left alone."""

from __future__ import annotations

import tempfile
from pathlib import Path

from autoshrink.artifact import write_artifact
from autoshrink.budget import fit_start
from autoshrink.compress import compress
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.space import build_space

EIGHT_BITS = LayerPlan(
    structure=Choice(method="dense"),
    value=Choice(method="quantization", config={"bits": 8, "mode": "kmeans"}),
)


def _bytes(plan: Plan, task, registry) -> int:
    model = task.build_model(1.0)
    with tempfile.TemporaryDirectory() as folder:
        return write_artifact(Path(folder) / "a.safetensors", compress(model, plan, registry),
                              plan, task, registry)


def test_a_start_over_budget_is_tightened_to_fit(registry) -> None:
    task = registry.tasks["digits-mlp"]
    model = task.build_model(1.0)
    space = build_space(model, registry)
    start = Plan(layers={layer.name: EIGHT_BITS for layer in space.layers})
    size = _bytes(start, task, registry)
    assert fit_start(start, task, space, registry, size) == start

    budget = size * 6 // 10
    fitted = fit_start(start, task, space, registry, budget)
    assert fitted is not None and fitted != start
    assert _bytes(fitted, task, registry) <= budget
    bits = {name: layer.value.config["bits"] for name, layer in fitted.layers.items()}
    # Same methods; a layer holding most bytes (64x128 and 128x64 tie) gave up bits first,
    # and no layer got wider.
    assert all(layer.value.method == "quantization" for layer in fitted.layers.values())
    assert all(b <= 8 for b in bits.values()) and min(bits.values()) < 8
    heaviest = max(space.layers, key=lambda layer: model.get_submodule(layer.name).weight.numel())
    assert bits[heaviest.name] == min(bits.values())

    # No setting of dense + quantization fits a few hundred bytes.
    assert fit_start(start, task, space, registry, 600) is None
