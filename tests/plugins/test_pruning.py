"""`pruning`: the conformance kit plus the sparse storage and its byte accounting."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from autoshrink.methods import LayerCode
from autoshrink.packing import unpack_bits
from autoshrink.testing import StructureMethodTests, code_bytes, sample_input
from autoshrink_plugins.pruning import Pruned, Pruning, pruned_share, with_fillers

METHOD = Pruning()


class TestPruning(StructureMethodTests):
    method = METHOD
    # Default init is uniform, so |w| >= t*std keeps about 1 - t/sqrt(3): 71% and 13%.
    loose = {"threshold": 0.5}
    tight = {"threshold": 1.5}


def _layers() -> list[nn.Module]:
    torch.manual_seed(3)
    return [nn.Linear(64, 48), nn.Conv2d(8, 16, 3, padding=1)]


def _encode(layer: nn.Module, threshold: float) -> tuple[Pruned, LayerCode]:
    config = METHOD.config({"threshold": threshold})
    module = METHOD.build(copy.deepcopy(layer), config)
    assert isinstance(module, Pruned)
    return module, METHOD.encode(module, config)


def _expected_survivors(weight: torch.Tensor, threshold: float) -> np.ndarray:
    w = weight.detach().reshape(-1)
    std = w.std(correction=0)
    return np.flatnonzero((w.abs() >= threshold * std).numpy())


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv2d"])
def test_bytes_fall_as_threshold_rises(layer: nn.Module) -> None:
    sizes = [code_bytes(_encode(layer, t)[1]) for t in (0.3, 0.9, 1.5)]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    assert sizes[0] < sum(p.numel() * 4 for p in layer.parameters())


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv2d"])
@pytest.mark.parametrize("threshold", [0.0, 0.4, 1.0, 1.6, 3.0])
def test_survivors_match_magnitude_rule(layer: nn.Module, threshold: float) -> None:
    module, code = _encode(layer, threshold)
    expected = _expected_survivors(layer.weight, threshold)
    positions = module.positions.numpy()
    # Fillers (relative form only) are extra positions with the value zero.
    assert set(expected) <= set(positions)
    fillers = np.setdiff1d(positions, expected)
    assert np.all(module.survivors.detach().numpy()[np.isin(positions, fillers)] == 0)
    flat = layer.weight.detach().reshape(-1)
    dense = module.dense_weight().detach().reshape(-1)
    assert torch.equal(dense[expected], flat[expected])
    pruned = np.setdiff1d(np.arange(flat.numel()), expected)
    assert torch.all(dense[pruned] == 0)
    if threshold == 0.0:
        assert expected.size == flat.numel()


def _filler_count(positions: np.ndarray) -> int:
    """Fillers the relative form needs, counted the slow obvious way."""
    count, previous = 0, -1
    for position in positions.tolist():
        skip = position - previous - 1
        while skip > 255:
            count, skip = count + 1, skip - 256
        previous = position
    return count


def _spiky_linear(gap: int) -> nn.Linear:
    """A Linear whose weight is tiny except for a few large entries ``gap`` apart."""
    layer = nn.Linear(100, 40)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
        layer.weight.view(-1)[::gap] = 5.0
    return layer


@pytest.mark.parametrize(
    "layer",
    [*_layers(), _spiky_linear(700), _spiky_linear(50), _spiky_linear(3)],
    ids=["linear", "conv2d", "gap700", "gap50", "gap3"],
)
@pytest.mark.parametrize("threshold", [0.2, 0.8, 1.4, 2.5])
def test_position_form_is_the_smaller(layer: nn.Module, threshold: float) -> None:
    module, code = _encode(layer, threshold)
    numel = layer.weight.numel()
    survivors = _expected_survivors(layer.weight, threshold)
    fillers = _filler_count(survivors)
    mask_bytes = math.ceil(numel / 8) + 4 * survivors.size
    relative_bytes = 5 * (survivors.size + fillers)
    form = "relative" if relative_bytes < mask_bytes else "bitmask"
    assert code.meta["positions"] == form
    array = code.arrays["mask" if form == "bitmask" else "relative"]
    assert code_bytes(code) - code.arrays.get("bias", np.zeros(0)).nbytes == min(
        mask_bytes, relative_bytes
    )
    assert array.dtype == np.uint8
    if form == "bitmask":
        mask = unpack_bits(array, 1, numel).astype(bool)
        assert np.array_equal(np.flatnonzero(mask), survivors)
    else:
        assert code.payloads["survivors"].numel() == survivors.size + fillers
    _check_roundtrip(layer, module, code)


def test_fillers_bridge_long_gaps() -> None:
    layer = _spiky_linear(700)
    module, code = _encode(layer, 1.0)
    assert code.meta["positions"] == "relative"
    # Survivors at 0, 700, 1400, ...: two fillers (at +256, +512) per gap of 699.
    survivors = np.arange(0, 4000, 700)
    assert np.array_equal(with_fillers(survivors), module.positions.numpy())
    assert module.positions.numel() == survivors.size + 2 * (survivors.size - 1)
    assert code.arrays["relative"].max() <= 255
    _check_roundtrip(layer, module, code)


def test_encode_stores_no_dense_array() -> None:
    for layer in _layers():
        for threshold in (0.0, 1.0, 2.0):
            module, code = _encode(layer, threshold)
            numel = layer.weight.numel()
            assert set(code.payloads) == {"survivors"}
            assert code.payloads["survivors"].ndim == 1
            assert code.payloads["survivors"].numel() == module.positions.numel()
            assert set(code.arrays) <= {"mask", "relative", "bias"}
            for key, array in code.arrays.items():
                assert array.size < numel, key
                assert array.dtype == (np.float32 if key == "bias" else np.uint8), key
            assert not any(b.ndim > 1 for b in code.arrays.values())


def test_retraining_keeps_the_mask() -> None:
    layer = _layers()[1]
    config = METHOD.config({"threshold": 1.0})
    module = METHOD.build(copy.deepcopy(layer), config)
    pruned = module.dense_weight().detach() == 0
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = sample_input(layer)
    for _ in range(5):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()
    weight = module.dense_weight().detach()
    assert torch.all(weight[pruned] == 0)
    assert not torch.equal(weight, layer.weight.detach() * ~pruned)


def test_matches_original_layer_when_nothing_is_pruned() -> None:
    layers = [
        *_layers(),
        nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False),
    ]
    for layer in layers:
        module = METHOD.build(copy.deepcopy(layer), METHOD.config({"threshold": 0.0}))
        x = sample_input(layer)
        torch.testing.assert_close(module(x), layer(x), rtol=0, atol=1e-6)


def _check_roundtrip(layer: nn.Module, module: nn.Module, code: LayerCode) -> None:
    template = copy.deepcopy(layer)
    with torch.no_grad():
        for p in template.parameters():
            p.normal_()
    restored = METHOD.decode(code, template, METHOD.config())
    x = sample_input(layer)
    with torch.no_grad():
        assert torch.equal(module(x), restored(x))


def test_decode_rejects_codes_that_do_not_fit() -> None:
    layer = _layers()[0]
    config = METHOD.config()
    for threshold in (0.2, 1.6):  # one bitmask code, one relative code
        _, code = _encode(layer, threshold)
        form = code.meta["positions"]
        assert form == ("bitmask" if threshold < 1 else "relative")
        # One value too few or too many.
        for delta in (-1, 1):
            bad = copy.deepcopy(code)
            n = bad.payloads["survivors"].numel() + delta
            bad.payloads["survivors"] = torch.zeros(n)
            with pytest.raises(ValueError):
                METHOD.decode(bad, copy.deepcopy(layer), config)
        # Another layer shape, a missing bias, an unknown form.
        with pytest.raises(ValueError):
            METHOD.decode(copy.deepcopy(code), nn.Linear(64, 49), config)
        with pytest.raises(ValueError):
            METHOD.decode(copy.deepcopy(code), nn.Linear(64, 48, bias=False), config)
        bad = copy.deepcopy(code)
        bad.meta["positions"] = "dense"
        with pytest.raises(ValueError):
            METHOD.decode(bad, copy.deepcopy(layer), config)
        with pytest.raises(ValueError):
            METHOD.decode(copy.deepcopy(code), nn.Conv2d(64, 48, 1), config)
    # Relative indices that run past the end of the weight.
    _, code = _encode(layer, 1.6)
    code.arrays["relative"] = code.arrays["relative"].copy()
    code.arrays["relative"][-1] = 255
    code.arrays["relative"][:-1] = 255
    with pytest.raises(ValueError):
        METHOD.decode(code, copy.deepcopy(layer), config)
    # A truncated bitmask.
    _, code = _encode(layer, 0.2)
    code.arrays["mask"] = code.arrays["mask"][:-1]
    with pytest.raises(ValueError):
        METHOD.decode(code, copy.deepcopy(layer), config)


def test_everything_pruned_still_roundtrips() -> None:
    # Uniform init never reaches 3 std (its max is sqrt(3) std): only the bias remains.
    layer = _layers()[0]
    module, code = _encode(layer, 3.0)
    assert module.positions.numel() == 0
    assert code.meta["positions"] == "relative" and code.arrays["relative"].size == 0
    _check_roundtrip(layer, module, code)


def _alive_share(module: Pruned) -> float:
    assert module.alive is not None
    return float(module.alive.mean())


def _train_under(module: Pruned, config, steps: int) -> list[float]:
    """SGD steps on random data, calling the method's `step` as the trainer does; the alive
    share after each."""
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    shares = []
    for step in range(steps):
        x = sample_input(nn.Linear(64, 48), batch=16)
        loss = module(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        METHOD.step(module, config, (step + 1) / steps)
        shares.append(_alive_share(module))
    return shares


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_schedules_reach_their_target_sparsity(schedule: str) -> None:
    layer = _layers()[0]
    config = METHOD.config({"target": "sparsity", "sparsity": 0.8, "schedule": schedule})
    module = METHOD.build(copy.deepcopy(layer), config)
    assert isinstance(module, Pruned)
    numel = layer.weight.numel()
    # Built: iterative prunes its first round, gradual nothing yet.
    start = _alive_share(module)
    assert start == pytest.approx(1 - 0.8 / 3 if schedule == "iterative" else 1.0, abs=0.01)
    dead = (module.alive == 0).clone()
    shares = _train_under(module, config, 40)
    # The pruned share follows the schedule (within the 1 %-of-the-layer update step) and
    # only ever rises; a pruned weight stays pruned and stays zero.
    for step, share in enumerate(shares):
        expected = pruned_share(schedule, 0.8, (step + 1) / len(shares))
        assert 1 - share == pytest.approx(expected, abs=0.011 + 1 / numel)
    assert shares == sorted(shares, reverse=True)
    assert bool(torch.all(module.alive[dead] == 0))
    assert bool(torch.all(module.dense_weight().reshape(-1)[module.alive == 0] == 0))
    METHOD.settle(module, config)
    kept = numel - int(0.8 * numel)
    dense = module.dense_weight().detach()
    assert module.alive is None and int((dense != 0).sum()) <= kept
    assert module.goal == kept
    code = METHOD.encode(module, config)
    decoded = METHOD.decode(code, copy.deepcopy(layer), config)
    assert torch.equal(decoded.dense_weight(), dense)
    # Stored as compactly as a one-shot layer of the same survivor count.
    one_shot = METHOD.encode(
        METHOD.build(copy.deepcopy(layer), METHOD.config({"target": "sparsity", "sparsity": 0.8})),
        config,
    )
    assert code_bytes(code) == code_bytes(one_shot)


def test_iterative_prunes_in_three_rounds() -> None:
    shares = [pruned_share("iterative", 0.9, p) for p in (0.0, 0.2, 0.34, 0.6, 0.7, 1.0)]
    assert shares == pytest.approx([0.3, 0.3, 0.6, 0.6, 0.9, 0.9])
    assert pruned_share("gradual", 0.9, 0.0) == 0.0
    assert pruned_share("gradual", 0.9, 0.75) == pytest.approx(0.9)
    assert pruned_share("one-shot", 0.9, 0.0) == 0.9


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_one_shot_sparsity_keeps_the_largest(sparsity: float) -> None:
    layer = _layers()[1]
    config = METHOD.config({"target": "sparsity", "sparsity": sparsity})
    module = METHOD.build(copy.deepcopy(layer), config)
    flat = layer.weight.detach().reshape(-1)
    kept = flat.numel() - int(sparsity * flat.numel())
    dense = module.dense_weight().detach().reshape(-1)
    assert int((dense != 0).sum()) == kept
    smallest_kept = dense[dense != 0].abs().min()
    assert bool(torch.all(flat[dense == 0].abs() <= smallest_kept))


def test_a_threshold_target_with_a_schedule_ends_where_one_shot_starts() -> None:
    layer = _layers()[0]
    one_shot = _expected_survivors(layer.weight, 1.2).size
    config = METHOD.config({"threshold": 1.2, "schedule": "gradual"})
    module = METHOD.build(copy.deepcopy(layer), config)
    METHOD.settle(module, config)
    assert int((module.dense_weight() != 0).sum()) == one_shot


def test_an_unsettled_layer_is_not_encoded() -> None:
    config = METHOD.config({"schedule": "gradual"})
    module = METHOD.build(copy.deepcopy(_layers()[0]), config)
    with pytest.raises(ValueError, match="settle"):
        METHOD.encode(module, config)
