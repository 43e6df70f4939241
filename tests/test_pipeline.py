"""The per-layer pipeline: one resolution of a plan into typed steps, typed registry look-ups,
plugins registered in-process, and the methods' distributions recorded in artifacts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.compress import apply_structure, apply_values, compress
from autoshrink.errors import ArtifactError, PlanError, PluginError, UsageError
from autoshrink.header import header_json, header_metadata, read_header
from autoshrink.methods import EncodingMethod, ModelMethod, StructureMethod, ValueMethod
from autoshrink.pipeline import model_step, plan_width, resolve_plan
from autoshrink.plan import Choice, LayerPlan, Plan
from autoshrink.registry import Origin, load_registry
from tests.conftest import ROOT

PACKAGE = ROOT / "autoshrink"
HASHED_4BIT = LayerPlan(
    structure=Choice(method="hashing", config={"ratio": 0.25}),
    value=Choice(method="quantization", config={"bits": 4, "mode": "kmeans"}),
)
PLAN = Plan(
    layers={"fc2": HASHED_4BIT},
    encoding=Choice(method="entropy", config={}),
)
PLUGIN = '''
from autoshrink import hookimpl
from autoshrink_plugins.floating import Float


class Half(Float):
    name = "{name}"


@hookimpl
def register_methods(register):
    register(Half())
'''


def test_a_plan_resolves_into_typed_steps_in_the_models_order(registry) -> None:
    task = registry.tasks["digits-mlp"]
    model = task.build_model(1.0)
    pipeline = resolve_plan(PLAN, model, registry)
    assert pipeline.names == ["fc1", "fc2", "out"]
    fc2 = pipeline.layers[1]
    assert fc2.module is model.fc2
    assert isinstance(fc2.structure, StructureMethod) and fc2.structure.name == "hashing"
    assert isinstance(fc2.value, ValueMethod) and fc2.value.name == "quantization"
    assert fc2.structure_config.ratio == 0.25  # type: ignore[attr-defined]
    assert (fc2.value_config.bits, fc2.value_config.mode) == (4, "kmeans")  # type: ignore
    assert fc2.methods == "hashing + quantization"
    # Layers the plan leaves out stay dense float32, at the methods' default knobs.
    assert [(s.structure.name, s.value.name) for s in pipeline.layers[::2]] == [
        ("dense", "float"), ("dense", "float")
    ]
    assert pipeline.layers[0].value_config == registry.value("float").config()
    assert isinstance(pipeline.encoder, EncodingMethod) and pipeline.encoder.name == "entropy"
    assert resolve_plan(Plan(), model, registry).encoder is None


def test_an_impossible_plan_fails_naming_the_layer(registry) -> None:
    model = registry.tasks["digits-mlp"].build_model(1.0)
    wrong_stage = Plan(layers={"fc2": LayerPlan(structure=Choice(method="float"))})
    with pytest.raises(PlanError, match="layer `fc2`: `float` is a value method"):
        resolve_plan(wrong_stage, model, registry)
    out_of_range = Plan(layers={"fc1": LayerPlan(
        value=Choice(method="quantization", config={"bits": 99}))})
    with pytest.raises(PlanError, match=r"layer `fc1` value stage: `quantization.bits`"):
        resolve_plan(out_of_range, model, registry)


def test_typed_lookups_name_the_stage_and_what_is_registered(registry) -> None:
    assert isinstance(registry.structure("pruning"), StructureMethod)
    assert isinstance(registry.value("quantization"), ValueMethod)
    assert isinstance(registry.encoder("entropy"), EncodingMethod)
    assert isinstance(registry.model("distillation"), ModelMethod)
    wrong = "`pruning` is a structure method, not a value method; value methods: float, "
    with pytest.raises(UsageError, match=re.escape(wrong)):
        registry.value("pruning")
    with pytest.raises(UsageError, match=r"unknown structure method `ghost`; registered: dense, "):
        registry.structure("ghost")


def test_the_model_stage_gives_the_students_width(registry) -> None:
    choice = Choice(method="distillation", config={"width": 0.5})
    student = model_step(choice, registry)
    assert student is not None and student.method is registry.model("distillation")
    assert student.width == plan_width(choice, registry) == 0.5
    assert model_step(None, registry) is None and plan_width(None, registry) == 1.0
    with pytest.raises(PlanError, match="model stage: `distillation.width`"):
        model_step(Choice(method="distillation", config={"width": 7}), registry)
    with pytest.raises(PlanError, match="model stage: `entropy` is a encoding method"):
        model_step(Choice(method="entropy"), registry)


def test_the_two_steps_make_what_compress_makes(registry) -> None:
    task = registry.tasks["digits-mlp"]
    torch.manual_seed(0)
    model = task.build_model(1.0)
    pipeline = resolve_plan(PLAN, model, registry)
    torch.manual_seed(1)
    stepwise = apply_structure(model, pipeline)
    apply_values(stepwise, pipeline)
    torch.manual_seed(1)
    at_once = compress(model, PLAN, registry)
    x = task.example_input(8)
    with torch.no_grad():
        assert torch.equal(stepwise(x), at_once(x))
    assert type(stepwise.fc2).__name__ != "Linear" and type(model.fc2).__name__ == "Linear"
    # 4-bit k-means: at most 16 distinct shared weights in the hashed layer.
    assert 2 <= stepwise.fc2.shared.unique().numel() <= 16


def test_no_module_asserts_a_methods_type() -> None:
    """Typed registry look-ups replaced the `assert isinstance(method, ...Method)` walks."""
    pattern = re.compile(r"assert isinstance\([^)]*\b\w*Method\b")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


def _plugin(folder: Path, module: str, method: str):
    """Import a plugin module written to ``folder`` (not installed anywhere)."""
    (folder / f"{module}.py").write_text(PLUGIN.format(name=method))
    sys.path.insert(0, str(folder))
    try:
        return __import__(module)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module, None)


def test_extra_plugins_register_in_process(tmp_path: Path, registry) -> None:
    plugin = _plugin(tmp_path, "half_plugin", "half")
    extended = load_registry(extra_plugins=[plugin])
    assert isinstance(extended.value("half"), ValueMethod)
    assert extended.problems == []
    # Not installed: its module's name stands for the distribution, with no version.
    assert extended.origins["half"] == Origin("half_plugin")
    assert extended.sources["half"] == "half_plugin"
    assert extended.origins["float"] == registry.origins["float"]
    assert registry.origins["float"].distribution == "autoshrink"
    # The cached registry is not touched, and each call with extras is a fresh one.
    assert "half" not in registry.methods and "half" not in load_registry().methods
    assert load_registry(extra_plugins=[plugin]) is not extended


def test_an_extra_plugin_follows_the_rules_of_installed_ones(
    tmp_path: Path, registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    clash = _plugin(tmp_path, "clash_plugin", "float")
    loaded = load_registry(extra_plugins=[clash])
    assert loaded.problems == [
        "plugin `clash_plugin` registered method `float`, already registered by "
        "autoshrink (built-in); skipped"
    ]
    with pytest.raises(PluginError, match="already registered"):
        load_registry(strict=True, extra_plugins=[clash])
    monkeypatch.setenv("AUTOSHRINK_BLOCK_PLUGINS", "half_plugin")
    blocked = load_registry(extra_plugins=[_plugin(tmp_path, "half_plugin", "half")])
    assert "half" not in blocked.methods


def _rewrite_header(path: Path, **changes) -> None:
    """Rewrite the artifact's header with ``changes`` (None deletes a field)."""
    with safe_open(str(path), framework="numpy") as handle:
        header = header_json(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    path.write_bytes(save(tensors, metadata=header_metadata(header)))


def test_the_header_records_each_methods_distribution(tmp_path: Path, registry) -> None:
    task = registry.tasks["digits-mlp"]
    student = Choice(method="distillation", config={"width": 0.5})
    plan = Plan(model=student, layers=PLAN.layers, encoding=PLAN.encoding)
    model = compress(task.build_model(0.5), plan, registry)
    path = tmp_path / "m.safetensors"
    write_artifact(path, model, plan, task, registry, width=0.5)
    header, _ = read_header(path)
    autoshrink = str(registry.origins["dense"])
    assert re.fullmatch(r"autoshrink==\d+\.\d+\.\S+", autoshrink)
    assert header.methods == {
        name: autoshrink
        for name in ("distillation", "dense", "float", "hashing", "quantization", "entropy")
    }
    assert read_artifact(path, registry).header.methods == header.methods


def test_a_third_party_method_of_another_version_fails_loudly(tmp_path: Path, registry) -> None:
    plugin = _plugin(tmp_path, "half_plugin", "half")
    extended = load_registry(extra_plugins=[plugin])
    task = extended.tasks["digits-mlp"]
    plan = Plan(layers={"fc1": LayerPlan(value=Choice(method="half", config={"bits": 16}))})
    path = tmp_path / "m.safetensors"
    write_artifact(path, compress(task.build_model(1.0), plan, extended), plan, task, extended)
    assert read_header(path)[0].methods["half"] == "half_plugin"
    assert read_artifact(path, extended).model is not None  # the same plugin reads it

    _rewrite_header(path, methods={**read_header(path)[0].methods, "half": "half-plugin==2.1"})
    with pytest.raises(ArtifactError) as refused:
        read_artifact(path, extended)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"{path} was written with method `half` of half-plugin 2.1, but half_plugin "
        "(version unknown) provides it here; install half-plugin==2.1 to read it"
    )
    with pytest.raises(ArtifactError) as missing:  # without the plugin
        read_artifact(path, registry)
    assert str(missing.value) == (
        f"{path} was written with method `half` of half-plugin 2.1, but it is not installed "
        "here; install half-plugin==2.1 to read it"
    )


def test_builtins_of_another_release_and_old_files_keep_loading(
    tmp_path: Path, registry
) -> None:
    task = registry.tasks["digits-mlp"]
    model = compress(task.build_model(1.0), PLAN, registry)
    path = tmp_path / "m.safetensors"
    write_artifact(path, model, PLAN, task, registry)
    x = task.example_input(4)
    with torch.no_grad():
        expected = read_artifact(path, registry).model(x)
    methods = read_header(path)[0].methods
    _rewrite_header(path, methods={name: "autoshrink==0.0.1" for name in methods})
    with torch.no_grad():
        assert torch.equal(read_artifact(path, registry).model(x), expected)
    _rewrite_header(path, methods=None)  # written before the field existed
    assert read_header(path)[0].methods == {}
    with torch.no_grad():
        assert torch.equal(read_artifact(path, registry).model(x), expected)
