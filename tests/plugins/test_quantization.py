"""`quantization`: the conformance kit, exact storage of quantized tensors, trained sharing,
and the pruning + quantization composition of Deep Compression."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from autoshrink.testing import ValueMethodTests, sample_input
from autoshrink_plugins.pruning import Pruning
from autoshrink_plugins.quantization import Quantization, SharedWeights, kmeans_1d

METHOD = Quantization()
CONFIGS = [{"mode": mode, "bits": bits} for mode in ("kmeans", "uniform") for bits in (1, 2, 4, 8)]


class TestQuantization(ValueMethodTests):
    method = METHOD
    configs = CONFIGS


def _quantized(values: np.ndarray | torch.Tensor, config: dict[str, Any]) -> nn.Module:
    """A module whose parameter ``weight`` holds ``values`` restricted by ``apply``."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())
    METHOD.apply(holder, "weight", METHOD.config(config))
    return holder


def _roundtrip(tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    parsed = METHOD.config(config)
    arrays, meta = METHOD.encode(tensor, parsed)
    arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
    return METHOD.decode(arrays, meta, tuple(tensor.shape), parsed)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


@pytest.mark.parametrize("mode", ["kmeans", "uniform"])
def test_bytes_fall_as_bits_fall(mode: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 48)
    sizes = []
    for bits in (8, 4, 2, 1):
        config = {"mode": mode, "bits": bits}
        tensor = _quantized(weight, config).weight.detach()
        arrays, _ = METHOD.encode(tensor, METHOD.config(config))
        sizes.append(sum(a.nbytes for a in arrays.values()))
        assert arrays["indices"].nbytes == (weight.numel() * bits + 7) // 8
        assert arrays["codebook"].size <= 1 << bits
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
    assert sizes[0] < weight.numel() * 4 / 3


_floats = st.floats(-1e6, 1e6, allow_nan=False, width=32, allow_subnormal=True)
_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12)


@settings(max_examples=150, deadline=None)
@given(
    values=hnp.arrays(np.float32, _shapes, elements=_floats),
    bits=st.integers(1, 8),
    mode=st.sampled_from(["kmeans", "uniform"]),
)
def test_applied_tensors_roundtrip_bit_exactly(values: np.ndarray, bits: int, mode: str) -> None:
    config = {"mode": mode, "bits": bits}
    tensor = _quantized(values, config).weight.detach()
    assert tensor.shape == values.shape
    assert np.unique(tensor.numpy().view(np.uint32)).size <= 1 << bits
    assert _bits_equal(_roundtrip(tensor, config), tensor)


def test_signed_zeros_are_kept_apart() -> None:
    tensor = torch.tensor([0.0, -0.0, 1.0, -0.0])
    assert _bits_equal(_roundtrip(tensor, {"bits": 2}), tensor)
    with pytest.raises(ValueError):  # three bit patterns need two bits
        METHOD.encode(tensor, METHOD.config({"bits": 1}))


def test_encode_rejects_unquantized_tensor() -> None:
    with pytest.raises(ValueError, match="applied"):
        METHOD.encode(torch.randn(100), METHOD.config({"bits": 4}))


def test_decode_rejects_bad_input() -> None:
    config = METHOD.config({"bits": 2})
    tensor = _quantized(torch.randn(30), {"bits": 2}).weight.detach()
    arrays, meta = METHOD.encode(tensor, config)
    assert METHOD.decode(arrays, meta, (30,), config).shape == (30,)
    cases = [
        {**arrays, "codebook": arrays["codebook"][:2]},  # indices 2, 3 now point outside
        {**arrays, "codebook": np.zeros(5, dtype=np.float32)},  # too long for 2 bits
        {**arrays, "codebook": arrays["codebook"].astype(np.float64)},
        {**arrays, "indices": arrays["indices"][:-1]},
        {**arrays, "indices": np.concatenate([arrays["indices"], [0]]).astype(np.uint8)},
        {"indices": arrays["indices"]},
    ]
    for case in cases:
        with pytest.raises(ValueError):
            METHOD.decode(case, meta, (30,), config)


def test_uniform_levels_and_binarization() -> None:
    weight = torch.linspace(-1.0, 2.0, 301)
    grid = _quantized(weight, {"mode": "uniform", "bits": 2}).weight.detach()
    assert torch.allclose(grid.unique(), torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    binary = _quantized(weight, {"mode": "uniform", "bits": 1}).weight.detach()
    scale = weight.double().abs().mean().float()
    assert torch.equal(binary, torch.where(weight >= 0, scale, -scale))


def test_uniform_trains_latent_weights_straight_through() -> None:
    holder = _quantized(torch.randn(50), {"mode": "uniform", "bits": 3})
    holder.weight.sum().backward()
    latent = holder.parametrizations.weight.original
    assert torch.equal(latent.grad, torch.ones(50))


def test_kmeans_initialisation_and_assignment() -> None:
    values = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.9, 10.0])
    centroids, assignment = kmeans_1d(values, 3)  # starts at 0, 5, 10
    assert torch.all(centroids[1:] >= centroids[:-1])
    # Every value sits at its nearest centroid.
    distance = (values[:, None] - centroids[None, :]).abs()
    assert torch.equal(distance.gather(1, assignment[:, None])[:, 0], distance.min(1).values)
    assert torch.allclose(centroids[assignment], torch.tensor([0.1] * 3 + [5.05] * 2 + [9.95] * 2))


def test_kmeans_centroids_train_assignments_stay() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    METHOD.apply(layer, "weight", METHOD.config({"mode": "kmeans", "bits": 3}))
    sharing = layer.parametrizations.weight[0]
    assert isinstance(sharing, SharedWeights)
    codebook, assignment = sharing.codebook.detach().clone(), sharing.assignment.clone()
    assert not layer.parametrizations.weight.original.requires_grad

    # The centroid's gradient is the sum of the gradients of its cluster's weights.
    x = torch.randn(16, 40)
    weight = layer.weight
    weight.retain_grad()
    torch.nn.functional.linear(x, weight, layer.bias).sin().sum().backward()
    expected = torch.zeros(8).index_add_(0, assignment.reshape(-1), weight.grad.reshape(-1))
    torch.testing.assert_close(sharing.codebook.grad, expected)

    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        layer(x).sin().sum().backward()
        optimizer.step()
    assert not torch.equal(sharing.codebook.detach(), codebook)
    assert torch.equal(sharing.assignment, assignment)
    assert torch.equal(layer.weight.detach(), sharing.codebook.detach()[assignment])
    assert layer.weight.detach().unique().numel() <= 8


@pytest.mark.parametrize("mode", ["kmeans", "uniform"])
def test_pruning_then_quantization_roundtrips(mode: str) -> None:
    """Deep Compression's pipeline: prune, quantize the survivors, retrain, store, rebuild."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    pruning, quantization = Pruning(), METHOD
    prune_config = pruning.config({"threshold": 1.0})
    quant_config = quantization.config({"mode": mode, "bits": 4})
    module = pruning.build(copy.deepcopy(layer), prune_config)
    for name in pruning.payload_names(module):
        quantization.apply(module, name, quant_config)
    x = sample_input(layer)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        module(x).sin().mean().backward()
        optimizer.step()

    code = pruning.encode(module, prune_config)
    stored = {}
    for name, tensor in code.payloads.items():
        arrays, meta = quantization.encode(tensor, quant_config)
        stored[name] = ({k: np.array(v, copy=True) for k, v in arrays.items()}, meta, tensor.shape)
    for name, (arrays, meta, shape) in stored.items():
        code.payloads[name] = quantization.decode(arrays, meta, tuple(shape), quant_config)
    template = copy.deepcopy(layer)
    with torch.no_grad():
        for p in template.parameters():
            p.normal_()
    restored = pruning.decode(code, template, prune_config)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))
        assert torch.equal(module.dense_weight(), restored.dense_weight())
    assert code.payloads["survivors"].unique().numel() <= 16
