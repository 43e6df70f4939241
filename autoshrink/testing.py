"""Conformance kit for method plugins: subclass once, get the whole suite.

In a plugin's test module (pytest)::

    from autoshrink.testing import StructureMethodTests
    from my_plugin import MyMethod

    class TestMyMethod(StructureMethodTests):
        method = MyMethod()
        loose = {"ratio": 0.5}   # a config that compresses little
        tight = {"ratio": 0.05}  # a config that compresses a lot

The suite checks the schema (searchable bounds, defaults inside them, values outside them
rejected), which layers the method applies to, that the compressed layer trains, that
encode -> decode gives bit-identical outputs, and that tightening the knobs does not grow
the encoded bytes, on every sample layer (Linear, Conv2d, Embedding) the method claims in
``applies_to``; an Embedding's ``padding_idx`` row must stay exactly as trained; every payload
must take a value stage, and ``encode`` must store it as the value stage leaves it; a
compiled form (``lower``), where given, must compute what ``decode`` gives.
:class:`ValueMethodTests` (on a Linear weight, an embedding table and the payloads the
built-in structures hand over: hashed values, pruning survivors, low-rank factors),
:class:`EncodingMethodTests` and :class:`ModelMethodTests` do the same for the other stages.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from autoshrink.kit_contract import MethodTests
from autoshrink.kit_lowering import evaluate_lowering, layer_forms
from autoshrink.kit_samples import (
    STRUCTURE_PAYLOADS,
    Shift,
    code_bytes,
    copy_code,
    nudge,
    resized,
    sample_input,
    sample_layers,
    scramble,
)
from autoshrink.methods import (
    EncodingMethod,
    LayerCode,
    MethodConfig,
    ModelMethod,
    StructureMethod,
    ValueMethod,
    payload_owner,
    restrict,
)
from autoshrink.registry import load_registry

__all__ = [
    "EncodingMethodTests",
    "MethodTests",
    "ModelMethodTests",
    "StructureMethodTests",
    "ValueMethodTests",
    "code_bytes",
    "sample_input",
    "sample_layers",
]


class StructureMethodTests(MethodTests):
    """The suite for structure methods. ``loose`` and ``tight`` are two configs of which
    ``tight`` should compress at least as much."""

    method: ClassVar[StructureMethod]
    loose: ClassVar[dict[str, Any]] = {}
    tight: ClassVar[dict[str, Any]] = {}

    def layers(self) -> list[nn.Module]:
        """The layers to test on: the sample layers this method applies to."""
        return [layer for layer in sample_layers() if self.method.applies(layer)]

    def test_applies_to(self) -> None:
        assert self.layers(), f"`{self.method.name}` applies to none of the sample layers"
        for layer in sample_layers():
            assert self.method.applies(layer) == isinstance(layer, self.method.applies_to)
        assert not self.method.applies(nn.ReLU())
        assert not self.method.applies(nn.BatchNorm2d(4))

    @pytest.mark.parametrize("which", ["loose", "tight"])
    def test_build_keeps_shape_and_trains(self, which: str) -> None:
        config = self.method.config(getattr(self, which))
        for layer in self.layers():
            x = sample_input(layer)
            module = self.method.build(copy.deepcopy(layer), config)
            out = module(x)
            assert out.shape == layer(x).shape
            out.square().mean().backward()
            grads = [p.grad for p in module.parameters() if p.requires_grad]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), "nothing trains"

    @pytest.mark.parametrize("which", ["loose", "tight"])
    def test_roundtrip_is_exact(self, which: str) -> None:
        config = self.method.config(getattr(self, which))
        for layer in self.layers():
            x = sample_input(layer)
            module = self.method.build(copy.deepcopy(layer), config)
            nudge(module, x)
            self.method.settle(module, config)
            code = self.method.encode(module, config)
            for name in self.method.payload_names(module):
                payload_owner(module, name)  # a parameter a value method can restrict
            template = copy.deepcopy(layer).apply(scramble)
            restored = self.method.decode(copy_code(code), template, config)
            with torch.no_grad():
                assert torch.equal(module(x), restored(x)), "decode(encode(m)) differs from m"

    def test_encode_stores_what_the_value_stage_leaves(self) -> None:
        """Every payload takes a value stage (a parametrization that moves each value), and
        :meth:`~StructureMethod.encode` stores the payloads as it leaves them."""
        config = self.method.config(self.loose)
        for layer in self.layers():
            module = self.method.build(copy.deepcopy(layer), config)
            self.method.settle(module, config)
            plain = self.method.encode(module, config)
            for name in self.method.payload_names(module):
                restrict(module, name, Shift())
            shifted = self.method.encode(module, config)
            assert shifted.payloads.keys() == plain.payloads.keys()
            for key, tensor in shifted.payloads.items():
                assert torch.equal(tensor, plain.payloads[key] + 0.25), (
                    f"payload `{key}` stored without its value stage: read it as an attribute "
                    "(structure_kit.payloads), not as the raw parameter"
                )

    def _encoded(self, layer: nn.Module, config: MethodConfig) -> LayerCode:
        module = self.method.build(copy.deepcopy(layer), config)
        self.method.settle(module, config)
        return self.method.encode(module, config)

    def test_tight_is_not_larger(self) -> None:
        loose, tight = self.method.config(self.loose), self.method.config(self.tight)
        for layer in self.layers():
            dense = sum(p.numel() * 4 for p in layer.parameters())
            small = code_bytes(self._encoded(layer, tight))
            large = code_bytes(self._encoded(layer, loose))
            assert small <= large, f"tight config stores {small} bytes, loose {large}"
            assert small <= dense, f"tight config stores {small} bytes, dense layer {dense}"

    def test_decode_rejects_wrong_shape(self) -> None:
        """For the first sample layer of each type: a code does not decode into a layer of
        the same type with other shapes."""
        config = self.method.config(self.loose)
        firsts = {type(layer): layer for layer in reversed(self.layers())}
        for layer in firsts.values():
            code = self.method.encode(self.method.build(layer, config), config)
            with pytest.raises(ValueError):
                self.method.decode(code, resized(layer), config)

    @pytest.mark.parametrize("which", ["loose", "tight"])
    def test_embedding_padding_row_is_kept(self, which: str) -> None:
        """As in ``nn.Embedding``: the ``padding_idx`` token gives the trained table's
        padding row, exactly, after training, after a value stage that moves every stored
        value (as quantization moves a zero row to its nearest level) and after a round trip
        (only for methods that claim Embedding)."""
        config = self.method.config(getattr(self, which))
        padded = [layer for layer in self.layers()
                  if isinstance(layer, nn.Embedding) and layer.padding_idx is not None]
        for layer in padded:
            x = sample_input(layer)
            pad = layer.weight.detach()[layer.padding_idx]
            module = self.method.build(copy.deepcopy(layer), config)
            nudge(module, x)
            self.method.settle(module, config)
            for name in self.method.payload_names(module):
                restrict(module, name, Shift())
            nudge(module, x)
            template = copy.deepcopy(layer).apply(scramble)
            restored = self.method.decode(
                copy_code(self.method.encode(module, config)), template, config
            )
            with torch.no_grad():
                for rebuilt in (module, restored):
                    out = rebuilt(x)
                    assert torch.equal(out[:, 0], pad.expand_as(out[:, 0])), "pad row changed"
                    assert rebuilt(x[0]).shape == (x.shape[1], layer.embedding_dim)

    @pytest.mark.parametrize("which", ["loose", "tight"])
    def test_lowering_computes_what_decode_gives(self, which: str) -> None:
        """A compiled form (:meth:`~StructureMethod.lower`) of a Linear or Conv2d computes
        what the decoded layer does: ``compute``, ``weights`` and ``rows`` its outputs,
        ``element`` (one lane and 16) and ``columns`` its every weight."""
        config = self.method.config(getattr(self, which))
        for layer in self.layers():
            if not isinstance(layer, nn.Linear | nn.Conv2d):
                continue
            code = self._encoded(layer, config)
            lowered = self.method.lower(copy_code(code), copy.deepcopy(layer), config)
            if lowered is None:
                continue  # no compiled form: the compiler reads the decoded dense weight
            restored = self.method.decode(copy_code(code), copy.deepcopy(layer), config)
            x = sample_input(layer)
            payloads = {key: t.detach().numpy() for key, t in code.payloads.items()}
            outputs, weights = layer_forms(lowered, layer, x.numpy(), payloads)
            with torch.no_grad():
                expected = restored(x).numpy()
                if isinstance(layer, nn.Linear):  # the weight, column by column
                    eye = torch.eye(layer.in_features)
                    weight = (restored(eye) - restored(torch.zeros_like(eye))).T.numpy()
            for form, out in outputs.items():
                np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5, err_msg=form)
            for form, found in weights.items():
                np.testing.assert_allclose(found, weight, rtol=1e-5, atol=1e-6, err_msg=form)


class ValueMethodTests(MethodTests):
    """The suite for value methods; ``configs`` lists the configs to exercise."""

    method: ClassVar[ValueMethod]
    configs: ClassVar[list[dict[str, Any]]] = [{}]

    def _check_roundtrip(self, layer: nn.Module, x: torch.Tensor) -> None:
        """Each config restricts ``layer.weight``, trains it on ``x`` a little, and stores
        it bit-exactly."""
        for values in self.configs:
            config = self.method.config(values)
            restricted = copy.deepcopy(layer)
            self.method.apply(restricted, "weight", config)
            nudge(restricted, x)
            weight = restricted.weight.detach().clone()
            arrays, meta = self.method.encode(weight, config)
            arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
            restored = self.method.decode(arrays, meta, tuple(weight.shape), config)
            assert restored.dtype == torch.float32
            assert torch.equal(restored, weight), f"decode(encode(t)) differs from t ({values})"

    def test_restricted_values_roundtrip_exactly(self) -> None:
        self._check_roundtrip(nn.Linear(40, 30), torch.randn(6, 40))

    def test_embedding_table_roundtrips_exactly(self) -> None:
        """A value method works on any payload: here a whole embedding table (dense
        structure), trained on token batches."""
        tokens = torch.randint(0, 60, (8, 5), generator=torch.Generator().manual_seed(2))
        self._check_roundtrip(nn.Embedding(60, 12), tokens)

    @pytest.mark.parametrize("structure", list(STRUCTURE_PAYLOADS))
    def test_structure_payloads_roundtrip_exactly(self, structure: str) -> None:
        """What a search hands a value method: the payloads of a built-in structure (K
        hashed values, pruning survivors, low-rank factors) of a Linear and a Conv2d layer,
        restricted, trained through the structure, stored; each payload comes back
        bit-exactly and the rebuilt layer computes exactly what the trained one did."""
        method = load_registry().structure(structure)
        s_config = method.config(STRUCTURE_PAYLOADS[structure])
        for values in self.configs:
            config = self.method.config(values)
            for layer in (nn.Linear(48, 40), nn.Conv2d(4, 8, 3, padding=1)):
                x = sample_input(layer)
                module = method.build(copy.deepcopy(layer), s_config)
                method.settle(module, s_config)
                for name in method.payload_names(module):
                    self.method.apply(module, name, config)
                module(x).square().mean().backward()
                assert any(p.grad is not None and p.grad.abs().sum() > 0
                           for p in module.parameters()), f"nothing trains ({values})"
                nudge(module, x)
                code = method.encode(module, s_config)
                for key, tensor in code.payloads.items():
                    arrays, meta = self.method.encode(tensor.detach().clone(), config)
                    arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
                    restored = self.method.decode(arrays, meta, tuple(tensor.shape), config)
                    assert restored.dtype == torch.float32
                    assert torch.equal(restored, tensor), f"{structure} `{key}` differs ({values})"
                    code.payloads[key] = restored
                rebuilt = method.decode(code, copy.deepcopy(layer).apply(scramble), s_config)
                with torch.no_grad():
                    assert torch.equal(rebuilt(x), module(x)), f"{structure} layer ({values})"

    def test_still_trains(self) -> None:
        for values in self.configs:
            config = self.method.config(values)
            layer = nn.Linear(20, 10)
            self.method.apply(layer, "weight", config)
            layer(torch.randn(4, 20)).square().mean().backward()
            grads = [p.grad for p in layer.parameters() if p.grad is not None]
            assert any(g.abs().sum() > 0 for g in grads)

    def test_lowering_reads_what_decode_gives(self) -> None:
        """When the method gives a compiled form, a TVM kernel built from it rebuilds every
        element exactly as :meth:`decode` does, one element at a time and 16 at a time (the
        decoding kernel's vector lanes)."""
        for values in self.configs:
            config = self.method.config(values)
            layer = nn.Linear(40, 30)
            self.method.apply(layer, "weight", config)
            arrays, meta = self.method.encode(layer.weight.detach().clone(), config)
            shape = tuple(layer.weight.shape)
            lowered = self.method.lower(arrays, meta, shape, config)
            if lowered is None:
                return  # no compiled form: the compiler reads the decoded float32 values
            restored = self.method.decode(arrays, meta, shape, config).reshape(-1).numpy()
            assert np.array_equal(evaluate_lowering(lowered, restored.size), restored), values
            in_lanes = evaluate_lowering(lowered, restored.size, lanes=True)
            assert np.array_equal(in_lanes, restored), (values, "in vector lanes")
            if lowered.table is not None or lowered.codes is not None:
                # The table-lookup kernel computes with table[codes], not with `element`.
                assert lowered.table is not None and lowered.codes is not None, (
                    "a lowering gives `table` and `codes` together, or neither"
                )
                codes = np.asarray(lowered.codes).reshape(-1)
                assert codes.size == restored.size and codes.min(initial=0) >= 0, values
                assert np.array_equal(np.asarray(lowered.table, np.float32)[codes], restored)

    def test_decode_rejects_wrong_shape(self) -> None:
        config = self.method.config(self.configs[0])
        layer = nn.Linear(10, 10)
        self.method.apply(layer, "weight", config)
        arrays, meta = self.method.encode(layer.weight.detach(), config)
        with pytest.raises(ValueError):
            self.method.decode(arrays, meta, (107,), config)


class EncodingMethodTests(MethodTests):
    """The suite for encoding methods: lossless on every kind of input."""

    method: ClassVar[EncodingMethod]

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"\x00",
            b"a" * 1000,
            bytes(range(256)) * 3,
            np.random.default_rng(0).integers(0, 4, 5000).astype(np.uint8).tobytes(),
            np.random.default_rng(1).bytes(3000),
        ],
    )
    def test_roundtrip(self, data: bytes) -> None:
        config = self.method.config()
        assert self.method.decode(self.method.encode(data, config), config) == data

    def test_skewed_data_shrinks(self) -> None:
        data = np.random.default_rng(0).choice(4, 20000, p=[0.85, 0.1, 0.03, 0.02])
        raw = data.astype(np.uint8).tobytes()
        assert len(self.method.encode(raw, self.method.config())) < len(raw) // 2

    def test_decode_stops_at_the_limit(self) -> None:
        """A stream whose output would exceed ``limit`` is refused, not decoded (a few KB
        of zeros compress from megabytes: the limit is what keeps memory bounded)."""
        config = self.method.config()
        coded = self.method.encode(bytes(1 << 20), config)
        assert self.method.decode(coded, config, limit=1 << 20) == bytes(1 << 20)
        with pytest.raises(ValueError):
            self.method.decode(coded, config, limit=(1 << 20) - 1)


class ModelMethodTests(MethodTests):
    """The suite for model-stage methods."""

    method: ClassVar[ModelMethod]

    def test_width_and_loss(self) -> None:
        config = self.method.config()
        assert 0 < self.method.width(config) <= 16
        student = torch.randn(8, 10, requires_grad=True)
        loss = self.method.loss(student, torch.randn(8, 10), torch.randint(0, 10, (8,)), config)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
