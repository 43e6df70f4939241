"""`lowrank` (SVD factorization): the conformance kit plus what makes it low-rank."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoshrink.testing import StructureMethodTests, code_bytes, sample_input
from autoshrink_plugins.floating import Float
from autoshrink_plugins.lowrank import LowRank, LowRankConv2d, LowRankEmbedding, LowRankLinear

METHOD = LowRank()


class TestLowRank(StructureMethodTests):
    method = METHOD
    loose = {"rank": 0.5}
    tight = {"rank": 0.1}


class TestLowRankFixedU(StructureMethodTests):
    method = METHOD
    loose = {"rank": 0.5, "train_u": False}
    tight = {"rank": 0.1, "train_u": False}


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(256, 128), nn.Conv2d(32, 64, 3, padding=1)]


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv2d"])
def test_bytes_fall_as_rank_tightens(layer: nn.Module) -> None:
    sizes = []
    for rank in (1.0, 0.25, 0.05):
        config = METHOD.config({"rank": rank})
        sizes.append(code_bytes(METHOD.encode(METHOD.build(layer, config), config)))
    assert sizes[0] > sizes[1] > sizes[2], sizes


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(48, 40),
        nn.Linear(20, 30, bias=False),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(3, 6, 5, stride=2, dilation=1, bias=False),
        nn.Conv2d(3, 5, 3, padding=2, dilation=2, padding_mode="circular"),
    ],
    ids=["linear", "linear-wide", "conv", "conv-strided", "conv-circular"],
)
def test_full_rank_reproduces_the_layer(layer: nn.Module) -> None:
    config = METHOD.config({"rank": 1.0})
    module = METHOD.build(copy.deepcopy(layer), config)
    assert isinstance(module, LowRankConv2d if isinstance(layer, nn.Conv2d) else LowRankLinear)
    x = sample_input(layer)
    with torch.no_grad():
        assert torch.allclose(module(x), layer(x), atol=1e-4)


def test_truncation_keeps_the_top_singular_values() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(120, 80)
    module = METHOD.build(layer, METHOD.config({"rank": 0.25}))  # r = 20
    approx = module.u @ module.v
    singular = torch.linalg.svdvals(layer.weight.detach().double())
    error = (approx.double() - layer.weight.double()).norm()
    # Eckart-Young: the best rank-20 error is the norm of the dropped singular values.
    assert torch.isclose(error, singular[20:].norm(), rtol=1e-4)


@pytest.mark.parametrize(
    ("layer", "fraction", "rank"),
    [
        (nn.Linear(1200, 10), 0.01, 8),  # a 10-class output layer keeps rank 8, not 1
        (nn.Linear(1200, 6), 0.01, 5),  # rank 6 would store more than the dense layer
        (nn.Linear(1200, 6), 1.0, 6),  # but the full rank, asked for, is given
        (nn.Linear(784, 1200), 0.01, 8),
        (nn.Linear(784, 1200), 0.25, 196),
        (nn.Conv2d(1, 32, 3), 0.3, 7),  # full rank 9; 7 x (32 + 9) = 287 < 288 dense
    ],
)
def test_rank_fraction_has_a_floor(layer: nn.Module, fraction: float, rank: int) -> None:
    module = METHOD.build(layer, METHOD.config({"rank": fraction}))
    assert module.rank == rank


def test_fixed_u_stays_fixed() -> None:
    for layer in _layers():
        module = METHOD.build(layer, METHOD.config({"rank": 0.5, "train_u": False}))
        u, v = module.u.detach().clone(), module.v.detach().clone()
        assert not module.u.requires_grad
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        module(sample_input(layer)).square().mean().backward()
        optimizer.step()
        assert torch.equal(module.u, u)
        assert not torch.equal(module.v, v)
        assert METHOD.payload_names(module) == ("u", "v")  # U is still stored


def test_grouped_conv_is_not_supported() -> None:
    grouped = nn.Conv2d(4, 8, 3, groups=2)
    assert not METHOD.applies(grouped)
    assert METHOD.applies(nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError):
        METHOD.build(grouped, METHOD.config())
    config = METHOD.config({"rank": 0.5})
    code = METHOD.encode(METHOD.build(nn.Conv2d(4, 8, 3), config), config)
    with pytest.raises(ValueError):
        METHOD.decode(code, grouped, config)


def test_flops_fall() -> None:
    # Multiply-adds per output pixel: dense out*in*k*k; factored r*(in*k*k + out).
    layer = nn.Conv2d(32, 64, 3, padding=1)
    module = METHOD.build(layer, METHOD.config({"rank": 0.1}))
    r = module.rank
    assert r == 8  # round(0.1 * min(64, 288)) = 6, raised to the floor
    assert r * (32 * 9 + 64) < 64 * 32 * 9


def test_decode_rejects_bad_codes() -> None:
    layer = nn.Linear(10, 6)
    config = METHOD.config({"rank": 0.5})
    good = METHOD.encode(METHOD.build(layer, config), config)
    for breakage in ("rank", "factor", "bias"):
        code = copy.deepcopy(good)
        if breakage == "rank":
            code.meta["rank"] = 7
        elif breakage == "factor":
            code.payloads["u"] = code.payloads["u"][:, :2]
        else:
            code.arrays.pop("bias")
        with pytest.raises(ValueError):
            METHOD.decode(code, layer, config)


def test_float16_value_stage_on_frozen_u() -> None:
    layer = nn.Conv2d(4, 6, 3)
    config = METHOD.config({"rank": 0.5, "train_u": False})
    module = METHOD.build(layer, config)
    value, value_config = Float(), Float().config({"bits": 16})
    for name in METHOD.payload_names(module):
        value.apply(module, name, value_config)
    assert not module.parametrizations.u.original.requires_grad
    code = METHOD.encode(module, config)
    for name, tensor in code.payloads.items():
        arrays, meta = value.encode(tensor, value_config)
        code.payloads[name] = value.decode(arrays, meta, tuple(tensor.shape), value_config)
    restored = METHOD.decode(code, layer, config)
    x = sample_input(layer)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))


def test_embedding_full_rank_reproduces_the_table() -> None:
    torch.manual_seed(5)
    table = nn.Embedding(40, 12, padding_idx=0)
    module = METHOD.build(copy.deepcopy(table), METHOD.config({"rank": 1.0}))
    assert isinstance(module, LowRankEmbedding) and module.rank == 12
    assert module.u.shape == (40, 12) and module.v.shape == (12, 12)
    tokens = sample_input(table)
    with torch.no_grad():
        assert torch.allclose(module(tokens), table(tokens), atol=1e-5)
        assert not module(torch.zeros(3, dtype=torch.long)).any()  # the pad, exactly


def test_embedding_bytes_fall_as_rank_tightens() -> None:
    table = nn.Embedding(500, 64)
    sizes = []
    for rank in (1.0, 0.25, 0.05):
        config = METHOD.config({"rank": rank})
        sizes.append(code_bytes(METHOD.encode(METHOD.build(table, config), config)))
    # (500 + 64) x r float32 values: r = 64 (more than dense), 16, 8 (the floor).
    assert sizes == [564 * 64 * 4, 564 * 16 * 4, 564 * 8 * 4]
