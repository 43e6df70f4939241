"""`hashing` (HashedNets): the conformance kit plus what makes it HashedNets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.testing import StructureMethodTests, code_bytes, sample_input
from autoshrink_plugins.floating import Float
from autoshrink_plugins.hash_positions import _finalize
from autoshrink_plugins.hashing import (
    SEED,
    HashedConv2d,
    HashedEmbedding,
    HashedLinear,
    Hashing,
    _Spread,
    hashed_positions,
    mix32,
    mix_key,
    position_hash,
    run_start,
)

METHOD = Hashing()


class TestHashing(StructureMethodTests):
    method = METHOD
    loose = {"ratio": 0.5}
    tight = {"ratio": 1 / 32}


class TestHashingInRuns(StructureMethodTests):
    method = METHOD
    loose = {"ratio": 0.5, "run": 16}
    tight = {"ratio": 1 / 32, "run": 16}


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


def _fmix32(h: int) -> int:
    """murmur3's 32-bit finalizer, written out independently of the plugin."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_hash_is_pinned() -> None:
    # murmur3's fmix32 of 1, as published; mix32 is it applied to position ^ key.
    assert _fmix32(1) == 0x514E28B7
    key = mix_key(SEED)
    assert [int(h) for h in mix32(5, SEED)] == [_fmix32(p ^ key) for p in range(5)]
    assert [int(h) for h in mix32(3, SEED)] == [0x88B30CF5, 0x40D90D6A, 0x22179780]
    index, sign = hashed_positions((4, 5), 7, SEED)
    assert index.flatten().tolist()[:8] == [3, 1, 0, 4, 5, 3, 4, 3]
    assert sign.flatten().tolist()[:4] == [-1.0, 1.0, 1.0, 1.0]


def test_layers_hashed_with_splitmix64_still_decode() -> None:
    # splitmix64's published first output for seed 0; the finalizer must stay exactly this.
    assert int(_finalize(np.array([0x9E3779B97F4A7C15], dtype=np.uint64))[0]) == (
        0xE220A8397B1DCDAF
    )
    assert [int(h) for h in position_hash(3, SEED, 0)] == [
        0x27733A43C2AABFD6,
        0xD0F06658B26230F8,
        0x3BED6214354973FE,
    ]
    index, sign = hashed_positions((4, 5), 7, SEED, "splitmix64")
    assert index.flatten().tolist()[:8] == [4, 6, 3, 0, 4, 2, 5, 2]
    assert sign.flatten().tolist()[:4] == [-1.0, -1.0, 1.0, 1.0]
    # A code written before `hash` existed decodes with the buckets it was trained with.
    layer = nn.Linear(5, 4)
    config = METHOD.config({"ratio": 0.35})
    code = METHOD.encode(METHOD.build(layer, config), config)
    assert code.meta.pop("hash") == "mix32"
    restored = METHOD.decode(code, layer, config)
    assert restored.hash == "splitmix64"
    assert torch.equal(restored.index, index)
    code.meta["hash"] = "md5"
    with pytest.raises(ValueError, match="not one of"):
        METHOD.decode(code, layer, config)


def test_a_run_reads_consecutive_values_signed_by_its_hash_bits() -> None:
    """In the run layout, rows 16g .. 16g+15 of a column are one run: its mix32 hash picks
    where its 16 consecutive values start (inside the K values) and its bits 0-15 the signs.
    A conv's rows are its output channels over the flattened rest."""
    index, sign = hashed_positions((20, 3, 2, 1), 100, SEED, run=16)
    columns = 6
    h = mix32(2 * columns, SEED)  # 2 row groups of 6 columns
    start = run_start(h, 100)
    assert int(start.max()) + 15 < 100
    for row, col in [(0, 0), (5, 4), (15, 5), (16, 0), (19, 3)]:
        run, lane = (row // 16) * columns + col, row % 16
        flat = index.reshape(20, columns)[row, col]
        assert int(flat) == int(start[run]) + lane
        bit = (int(h[run]) >> lane) & 1
        assert float(sign.reshape(20, columns)[row, col]) == 1.0 - 2.0 * bit
    # Fewer than 16 values: a run wraps around them.
    index, _ = hashed_positions((16, 2), 5, SEED, run=16)
    assert sorted(set(index[:, 0].tolist())) == [0, 1, 2, 3, 4]


def test_runs_round_trip_and_keep_their_layout() -> None:
    torch.manual_seed(5)
    layer = nn.Linear(24, 40)
    config = METHOD.config({"ratio": 0.1, "run": 16})
    module = METHOD.build(layer, config)
    assert module.run == 16 and "run=16" in repr(module)
    assert not torch.equal(module.index, METHOD.build(layer, METHOD.config({"ratio": 0.1})).index)
    restored = METHOD.decode(METHOD.encode(module, config), layer, config)
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))
    # Runs are only hashed with mix32: an older hash cannot claim them.
    code = METHOD.encode(module, config)
    code.meta["hash"] = "splitmix64"
    with pytest.raises(ValueError, match="runs of 16"):
        METHOD.decode(code, layer, config)


def test_buckets_are_even_and_signs_balanced() -> None:
    index, sign = hashed_positions((300, 200), 1000, SEED)
    counts = np.bincount(index.numpy().ravel(), minlength=1000)
    # 60 positions a bucket on average: a Poisson spread stays well inside these bounds.
    assert counts.min() > 25 and counts.max() < 100
    assert abs(float(sign.mean())) < 0.02


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


def test_embedding_entry_reads_the_bucket_of_its_row_and_column() -> None:
    """Entry (row, col) of a hashed table is shared[bucket] * sign of flat position
    row * dim + col, exactly as the virtual table a Linear would use; a token's row is
    gathered without building the table."""
    torch.manual_seed(4)
    table = nn.Embedding(30, 8)
    module = METHOD.build(table, METHOD.config({"ratio": 0.1}))  # K = 24 for 240 entries
    assert isinstance(module, HashedEmbedding) and module.k == 24
    bucket = (mix32(240, SEED) * np.uint64(24)) >> np.uint64(32)
    row, col = 17, 5
    assert int(module.index[row, col]) == int(bucket[row * 8 + col])
    tokens = torch.tensor([[row, 2, 29], [0, row, row]])
    with torch.no_grad():
        out = module(tokens)
        assert torch.equal(out, torch.nn.functional.embedding(tokens, module.virtual_weight()))
        assert float(out[0, 0, col]) == float(module.shared[module.index[row, col]]) * float(
            module.sign[row, col]
        )
    assert set(module.state_dict()) == {"shared"}  # no bias, no stored index


@pytest.mark.parametrize("ratio", [1.0, 0.25, 1 / 16])
def test_embedding_stores_k_values_and_a_non_zero_pad(ratio: float) -> None:
    table = nn.Embedding(64, 12, padding_idx=1)
    config = METHOD.config({"ratio": ratio})
    code = METHOD.encode(METHOD.build(table, config), config)
    assert code.payloads["shared"].numel() == round(ratio * 64 * 12)
    assert code.arrays == {} and code.meta["padding_idx"] == 1  # a zero pad costs nothing
    with torch.no_grad():
        table.weight[1] = torch.arange(12.0)
    module = METHOD.build(table, config)
    code = METHOD.encode(module, config)
    assert np.array_equal(code.arrays["padding"], np.arange(12, dtype=np.float32))
    restored = METHOD.decode(code, copy.deepcopy(table), config)
    with torch.no_grad():
        assert torch.equal(restored(torch.tensor([1, 3])), module(torch.tensor([1, 3])))
        assert torch.equal(restored(torch.tensor([1]))[0], torch.arange(12.0))


def test_embedding_decode_rejects_other_padding() -> None:
    config = METHOD.config({"ratio": 0.5})
    code = METHOD.encode(METHOD.build(nn.Embedding(20, 4, padding_idx=0), config), config)
    for other in (nn.Embedding(20, 4), nn.Embedding(20, 4, padding_idx=2), nn.Linear(4, 20)):
        with pytest.raises(ValueError):
            METHOD.decode(code, other, config)


def test_gradient_of_the_k_values_is_summed_per_bucket() -> None:
    """The layer's own backward (bincount) gives autograd's gradient of the gather."""
    layer = HashedLinear(12, 7, k=5, bias=False, seed=3)
    with torch.no_grad():
        layer.shared.copy_(torch.randn(5))
    x = torch.randn(4, 12)
    layer(x).square().sum().backward()
    shared = layer.shared.detach().clone().requires_grad_()
    F.linear(x, shared[layer.index] * layer.sign).square().sum().backward()
    assert layer.shared.grad is not None and layer.shared.grad.abs().sum() > 0
    torch.testing.assert_close(layer.shared.grad, shared.grad)
    double = layer.shared.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: _Spread.apply(s, layer.index, layer.sign.double()), (double,)
    )
