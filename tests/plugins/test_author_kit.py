"""The plugin author's kit: the engine registers value methods' parametrizations (owner lookup,
freezing, the ModuleDict naming trap), the structure helpers, the conformance kits' checks on
real payloads, and knob descriptions shown by ``autoshrink plugins``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from autoshrink.errors import PluginError
from autoshrink.methods import Columns, MethodConfig, payload_owner, restrict
from autoshrink.structure_kit import stored_bias, stored_payload
from autoshrink.testing import StructureMethodTests, ValueMethodTests
from autoshrink_plugins.floating import Float
from autoshrink_plugins.hashing import Hashing
from autoshrink_plugins.quantization import Quantization, UniformGrid
from tests.conftest import run_cli


class _Holder(nn.Module):
    """A structure-like module whose payload sits one level down, under a chosen name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.register_parameter(name, nn.Parameter(torch.linspace(-1, 1, 12)))


def test_apply_finds_the_owner_of_a_dotted_payload() -> None:
    holder = _Holder("shared")
    Quantization().apply(holder, "inner.shared", Quantization().config({"mode": "uniform"}))
    assert parametrize.is_parametrized(holder.inner, "shared")
    assert isinstance(holder.inner.parametrizations.shared[0], UniformGrid)
    assert holder.inner.shared.unique().numel() <= 16


@pytest.mark.parametrize("name", ["values", "keys", "items", "update"])
def test_a_payload_named_like_a_moduledict_attribute_is_refused(name: str) -> None:
    holder = _Holder(name)
    with pytest.raises(PluginError, match=f"attribute `{name}`; give the parameter another"):
        Float().apply(holder, f"inner.{name}", Float().config({"bits": 16}))
    assert not parametrize.is_parametrized(holder.inner)
    with pytest.raises(PluginError, match="cannot take a value method"):
        payload_owner(holder, f"inner.{name}")  # what the structure kit checks


def test_a_payload_that_is_not_a_parameter_is_refused() -> None:
    with pytest.raises(PluginError, match="payload `inner.missing` is not a parameter"):
        restrict(_Holder("shared"), "inner.missing", nn.Identity())


def test_the_engine_freezes_a_tensor_its_parametrization_ignores() -> None:
    """k-means: the codebook replaces the tensor, which is frozen; uniform (straight-through)
    keeps training it; float32 registers nothing."""
    kmeans, uniform = _Holder("shared"), _Holder("shared")
    method = Quantization()
    method.apply(kmeans, "inner.shared", method.config({"mode": "kmeans", "bits": 2}))
    method.apply(uniform, "inner.shared", method.config({"mode": "uniform", "bits": 2}))
    assert not kmeans.inner.parametrizations.shared.original.requires_grad
    assert uniform.inner.parametrizations.shared.original.requires_grad
    plain = _Holder("shared")
    Float().apply(plain, "inner.shared", Float().config({"bits": 32}))
    assert not parametrize.is_parametrized(plain.inner)


class _Recording(Float):
    """float16 storage that records the shape of every tensor it is asked to restrict."""

    name = "recording"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def parametrization(self, tensor: torch.Tensor, config: MethodConfig) -> nn.Module | None:
        self.shapes.append(tuple(tensor.shape))
        return super().parametrization(tensor, config)


@pytest.mark.parametrize(
    ("structure", "shapes"),
    [
        # K = ratio x weights: 0.25 x 1920 and 0.25 x 288.
        ("hashing", [(480,), (72,)]),
        # 20 % of 1920 and of 288 survive (the bitmask form: no fillers).
        ("pruning", [(384,), (58,)]),
        # rank 10 of 40 (a quarter) and 6 of 8 (the floor of 8, cut to stay below dense).
        ("lowrank", [(40, 10), (10, 48), (8, 6, 1, 1), (6, 4, 3, 3)]),
    ],
)
def test_value_kit_runs_on_the_payloads_structures_hand_over(structure, shapes) -> None:
    recording = _Recording()
    kit = type("Kit", (ValueMethodTests,), {"method": recording, "configs": [{"bits": 16}]})()
    kit.test_structure_payloads_roundtrip_exactly(structure)
    assert recording.shapes == shapes


class _RawHashing(Hashing):
    """Stores the raw K values, ignoring the value stage: what the structure kit must catch."""

    def encode(self, module: nn.Module, config: MethodConfig):
        code = super().encode(module, config)
        if parametrize.is_parametrized(module, "shared"):
            code.payloads["shared"] = module.parametrizations.shared.original.detach().clone()
        return code


def test_structure_kit_catches_payloads_stored_without_the_value_stage() -> None:
    kit = type("Kit", (StructureMethodTests,), {"method": _RawHashing()})()
    with pytest.raises(AssertionError, match="payload `shared` stored without its value stage"):
        kit.test_encode_stores_what_the_value_stage_leaves()
    good = type("Kit", (StructureMethodTests,), {"method": Hashing()})()
    good.test_encode_stores_what_the_value_stage_leaves()


class _ShiftedTable(Quantization):
    """Names a table its codes do not index as ``decode`` does: what the value kit must
    catch, since the table-lookup kernel computes with ``table[codes]``."""

    def lower(self, arrays, meta, shape, config):
        lowered = super().lower(arrays, meta, shape, config)
        lowered.table = np.roll(lowered.table, 1)
        return lowered


def test_value_kit_checks_the_table_a_lowering_names() -> None:
    configs = [{"bits": 3, "mode": "kmeans"}]
    kit = type("Kit", (ValueMethodTests,), {"method": _ShiftedTable(), "configs": configs})()
    with pytest.raises(AssertionError):
        kit.test_lowering_reads_what_decode_gives()
    good = type("Kit", (ValueMethodTests,), {"method": Quantization(), "configs": configs})()
    good.test_lowering_reads_what_decode_gives()


class _FlippedColumns(Hashing):
    """Gives ``columns`` whose weights have the wrong signs, ``element`` right: what the
    structure kit must catch, since the decoding kernel computes with ``columns``."""

    def lower(self, code, template, config):
        lowered = super().lower(code, template, config)
        runs = lowered.columns if lowered is not None else None
        if runs is not None:
            lowered.columns = lambda t, p: Columns(
                key=runs(t, p).key, weights=lambda g, key: -runs(t, p).weights(g, key)
            )
        return lowered


def test_structure_kit_checks_the_columns_a_lowering_gives() -> None:
    loose = {"ratio": 0.5, "run": 16}
    kit = type("Kit", (StructureMethodTests,), {"method": _FlippedColumns(), "loose": loose})()
    with pytest.raises(AssertionError, match="columns"):
        kit.test_lowering_computes_what_decode_gives("loose")
    good = type("Kit", (StructureMethodTests,), {"method": Hashing(), "loose": loose})()
    good.test_lowering_computes_what_decode_gives("loose")


def test_structure_helpers_check_what_decode_reads() -> None:
    method = Hashing()
    config = method.config({"ratio": 0.5})
    layer = nn.Linear(6, 4)
    code = method.encode(method.build(layer, config), config)
    assert torch.equal(stored_bias(code, layer), layer.bias.detach())
    with pytest.raises(ValueError, match=r"bias of shape \(5,\) expected, got \(4,\)"):
        stored_bias(code, nn.Linear(6, 5))
    with pytest.raises(ValueError, match="no bias expected for Linear"):
        stored_bias(code, nn.Linear(6, 4, bias=False))
    assert stored_payload(code, "shared", (12,)).shape == (12,)
    with pytest.raises(ValueError, match=r"payload `shared` of shape \(11,\) expected, got"):
        stored_payload(code, "shared", (11,))


def test_every_builtin_knob_is_described(registry) -> None:
    for method in registry.methods.values():
        for name, field in method.Config.model_fields.items():
            assert field.description and len(field.description) > 10, f"{method.name}.{name}"


def test_plugins_command_shows_each_knob_with_its_range_and_description() -> None:
    table = run_cli("plugins", env={"COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    assert "bits [1, 8] int: bits per stored value (2**bits levels)" in table.stdout
    listed = run_cli("plugins", "--json")
    methods = {m["name"]: m for m in json.loads(listed.stdout)["methods"]}
    assert methods["quantization"]["knobs"]["bits"] == "[1, 8] int"
    assert methods["distillation"]["knob_descriptions"]["alpha"].startswith("weight of the soft")
    assert methods["dense"]["knob_descriptions"] == {}
