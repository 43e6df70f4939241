"""Search space: parameter names from schemas, presets that may only narrow, plan checks."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

from autoshrink.errors import PlanError, UsageError
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.space import build_space, load_preset


@pytest.fixture
def mlp(registry):
    return registry.tasks["digits-mlp"].build_model(1.0)


def test_every_layer_gets_every_applicable_method(registry, mlp) -> None:
    space = build_space(mlp, registry)
    assert [layer.name for layer in space.layers] == ["fc1", "fc2", "out"]
    rows = dict(space.rows())
    assert rows["layer.fc1.structure"].split(" | ") == [
        m.name for m in registry.by_stage("structure")
    ]
    assert rows["layer.fc1.float.bits"] == "{32, 16}"
    assert "none" in rows["model.method"].split(" | ")


def test_sample_gives_a_valid_plan_with_named_params(registry, mlp) -> None:
    space = build_space(mlp, registry)
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    plan = space.sample(trial)
    plan.check(registry, mlp)
    assert set(plan.layers) == {"fc1", "fc2", "out"}
    assert all(name.split(".")[0] in {"model", "layer", "encoding"} for name in trial.params)
    replay = space.sample(optuna.trial.FixedTrial(trial.params))
    assert replay == plan


def preset(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_preset_narrows(tmp_path: Path, registry, mlp) -> None:
    path = preset(
        tmp_path,
        '[layers.Linear]\nstructure = ["dense"]\nvalue = ["float"]\n'
        "[ranges.float]\nbits = [16]\n",
    )
    space = build_space(mlp, registry, load_preset(str(path)))
    assert all(layer.structure == ("dense",) for layer in space.layers)
    assert space.ranges["float"]["bits"] == CategoricalDistribution((16,))


def test_preset_widening_a_bound_names_the_line(tmp_path: Path, registry, mlp) -> None:
    if "quantization" not in registry.methods:
        pytest.skip("needs the quantization method")
    path = preset(tmp_path, "# comment\n[ranges.quantization]\nbits = [2, 12]\n")
    with pytest.raises(UsageError, match=r"p.toml line 3: `ranges.quantization.bits`.*widens"):
        build_space(mlp, registry, load_preset(str(path)))
    narrowed = preset(tmp_path, "[ranges.quantization]\nbits = [2, 4]\n")
    space = build_space(mlp, registry, load_preset(str(narrowed)))
    assert space.ranges["quantization"]["bits"] == IntDistribution(2, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[layers.Linear]\nstructure = ["nope"]\n', r"line 2: .*unknown method `nope`"),
        ("[ranges.float]\nwidth = [1, 2]\n", r"line 2: `ranges.float.width` is not a knob"),
        ("[ranges.nope]\nx = 1\n", r"`ranges.nope` names an unknown method"),
        ("colour = 'red'\n", r"line 1: `colour` is not a preset key"),
        ("[ranges.float]\nbits = [8]\n", r"is not a subset"),
    ],
)
def test_bad_presets(tmp_path: Path, registry, mlp, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_space(mlp, registry, load_preset(str(preset(tmp_path, text))))


def test_unknown_builtin_preset() -> None:
    with pytest.raises(UsageError, match="unknown search-space preset `nope`; built-in: "):
        load_preset("nope")


def test_builtin_presets_load(registry, mlp) -> None:
    from importlib import resources

    for item in resources.files("autoshrink_search_spaces").iterdir():
        if item.name.endswith(".toml"):
            build_space(mlp, registry, load_preset(item.name[:-5]))


def test_plan_errors_name_the_layer(registry, mlp) -> None:
    bad = Plan(layers={"fc9": LayerPlan()})
    with pytest.raises(PlanError, match="layer `fc9` is not a compressible layer"):
        bad.check(registry, mlp)
    wrong_stage = Plan(layers={"fc2": LayerPlan(structure=Choice(method="float"))})
    with pytest.raises(PlanError, match="layer `fc2`: `float` is a value method"):
        wrong_stage.check(registry, mlp)
    bad_knob = Plan(layers={"out": LayerPlan(value=Choice(method="float", config={"bits": 8}))})
    with pytest.raises(PlanError, match="layer `out` value stage: `float.bits`"):
        bad_knob.check(registry, mlp)


def test_default_preset_starts_replay_exactly(registry, mlp) -> None:
    from autoshrink.space import params_of

    space = build_space(mlp, registry, load_preset("default"))
    assert len(space.starts) == 4
    assert all(start.model is not None for start in space.starts[2:])  # distilled students
    assert space.starts[3].layers["out"] != space.starts[3].layers["fc1"]  # its own last layer
    for plan in space.starts:
        params = params_of(space, plan)
        assert params is not None
        assert space.sample(optuna.trial.FixedTrial(params)) == plan


def test_a_start_gives_the_last_layer_its_own_choice(tmp_path: Path, registry, mlp) -> None:
    kmeans = 'method = "quantization", config = { bits = %d, mode = "kmeans" }'
    path = preset(
        tmp_path,
        '[[start]]\nevery_layer.structure = { method = "dense", config = {} }\n'
        f"every_layer.value = {{ {kmeans % 2} }}\n"
        'last_layer.structure = { method = "dense", config = {} }\n'
        f"last_layer.value = {{ {kmeans % 6} }}\n",
    )
    (start,) = build_space(mlp, registry, load_preset(str(path))).starts
    bits = {name: layer.value.config["bits"] for name, layer in start.layers.items()}
    assert bits == {"fc1": 2, "fc2": 2, "out": 6}
    typo = preset(tmp_path, '[[start]]\nlast_layer.value = { method = "zstd", config = {} }\n')
    with pytest.raises(UsageError, match="names unknown `zstd`"):
        build_space(mlp, registry, load_preset(str(typo)))


def test_start_outside_the_space_is_skipped_and_unknown_method_is_an_error(
    tmp_path: Path, registry, mlp
) -> None:
    outside = preset(
        tmp_path,
        '[layers.Linear]\nstructure = ["dense"]\n'
        '[[start]]\nevery_layer.structure = { method = "pruning", config = { threshold = 1 } }\n',
    )
    assert build_space(mlp, registry, load_preset(str(outside))).starts == []
    unknown = preset(tmp_path, '[[start]]\nencoding = { method = "zstd", config = {} }\n')
    with pytest.raises(UsageError, match="names unknown `zstd`"):
        build_space(mlp, registry, load_preset(str(unknown)))
