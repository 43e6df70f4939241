"""`hashing` (HashedNets): the conformance kit plus what makes it HashedNets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from autoshrink.testing import StructureMethodTests, code_bytes, sample_input
from autoshrink_plugins.floating import Float
from autoshrink_plugins.hashing import (
    SEED,
    HashedConv2d,
    Hashing,
    _finalize,
    hashed_positions,
    position_hash,
)

METHOD = Hashing()


class TestHashing(StructureMethodTests):
    method = METHOD
    loose = {"ratio": 0.5}
    tight = {"ratio": 1 / 32}


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(64, 32), nn.Conv2d(8, 16, 3, padding=1)]


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv2d"])
def test_bytes_fall_as_ratio_tightens(layer: nn.Module) -> None:
    sizes = []
    for ratio in (1.0, 0.25, 1 / 16):
        config = METHOD.config({"ratio": ratio})
        sizes.append(code_bytes(METHOD.encode(METHOD.build(layer, config), config)))
    assert sizes[0] > sizes[1] > sizes[2], sizes


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv2d"])
def test_only_k_values_are_stored(layer: nn.Module) -> None:
    config = METHOD.config({"ratio": 0.1})
    module = METHOD.build(layer, config)
    code = METHOD.encode(module, config)
    k = max(1, round(0.1 * layer.weight.numel()))
    assert code.meta["k"] == k
    assert sum(t.numel() for t in code.payloads.values()) == k
    assert set(code.arrays) == {"bias"}
    # Bucket and sign tensors are recomputed, never saved with the model.
    assert set(module.state_dict()) == {"shared", "bias"}


def test_positions_sharing_a_bucket_share_a_value() -> None:
    layer = nn.Linear(20, 10)
    module = METHOD.build(layer, METHOD.config({"ratio": 0.05}))  # K = 10 for 200 weights
    weight = module.virtual_weight().detach()
    index, sign = module.index, module.sign
    first = (index == 3).nonzero()
    assert len(first) >= 2
    magnitudes = {abs(float(weight[tuple(p)])) for p in first}
    assert magnitudes == {abs(float(module.shared.detach()[3]))}
    assert torch.equal(weight, module.shared.detach()[index] * sign)
    # Both signs occur, so a bucket is not just a repeated value.
    assert set(sign.unique().tolist()) == {-1.0, 1.0}


def test_init_is_the_least_squares_fit() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(12, 9)
    module = METHOD.build(layer, METHOD.config({"ratio": 0.2}))
    index, sign, w = module.index.reshape(-1), module.sign.reshape(-1), layer.weight.reshape(-1)
    for bucket in range(module.k):
        mine = index == bucket
        expected = (w[mine] * sign[mine]).mean() if mine.any() else torch.tensor(0.0)
        assert torch.allclose(module.shared[bucket], expected, atol=1e-6)
    # Even with K = n some positions collide, but a least-squares fit never does worse than
    # predicting zero.
    full = METHOD.build(layer, METHOD.config({"ratio": 1.0}))
    error = (full.virtual_weight() - layer.weight).square().sum()
    assert error < layer.weight.square().sum()


def test_hash_is_pinned() -> None:
    # splitmix64's published first output for seed 0; the finalizer must stay exactly this.
    assert int(_finalize(np.array([0x9E3779B97F4A7C15], dtype=np.uint64))[0]) == (
        0xE220A8397B1DCDAF
    )
    assert [int(h) for h in position_hash(3, SEED, 0)] == [
        0x27733A43C2AABFD6,
        0xD0F06658B26230F8,
        0x3BED6214354973FE,
    ]
    index, sign = hashed_positions((4, 5), 7, SEED)
    assert index.flatten().tolist()[:8] == [4, 6, 3, 0, 4, 2, 5, 2]
    assert sign.flatten().tolist()[:4] == [-1.0, -1.0, 1.0, 1.0]


def test_conv_keeps_geometry_and_grouped_conv_works() -> None:
    torch.manual_seed(3)
    layer = nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect")
    config = METHOD.config({"ratio": 1.0})
    module = METHOD.build(copy.deepcopy(layer), config)
    assert isinstance(module, HashedConv2d)
    x = sample_input(layer)
    # The same virtual weight in the original layer gives the same output.
    with torch.no_grad():
        layer.weight.copy_(module.virtual_weight())
        assert torch.allclose(module(x), layer(x), atol=1e-5)
    restored = METHOD.decode(METHOD.encode(module, config), copy.deepcopy(layer), config)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))


def test_decode_rejects_mismatched_k() -> None:
    layer = nn.Linear(10, 6)
    config = METHOD.config({"ratio": 0.5})
    code = METHOD.encode(METHOD.build(layer, config), config)
    code.meta["k"] += 1
    with pytest.raises(ValueError):
        METHOD.decode(code, layer, config)
    code.meta["k"] -= 1
    code.arrays.pop("bias")
    with pytest.raises(ValueError):
        METHOD.decode(code, layer, config)


def test_float16_value_stage_roundtrips() -> None:
    layer = nn.Linear(16, 8)
    config = METHOD.config({"ratio": 0.25})
    module = METHOD.build(layer, config)
    value, value_config = Float(), Float().config({"bits": 16})
    for name in METHOD.payload_names(module):
        value.apply(module, name, value_config)
    code = METHOD.encode(module, config)
    arrays, meta = value.encode(code.payloads["shared"], value_config)
    code.payloads["shared"] = value.decode(arrays, meta, (module.k,), value_config)
    restored = METHOD.decode(code, layer, config)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))
