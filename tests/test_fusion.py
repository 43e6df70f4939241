"""Which modules after a compressed layer its kernel's epilogue computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoshrink.compiler.export import KernelCall
from autoshrink.compiler.fusion import find_epilogues
from autoshrink.compiler.layer_kernel import dense_kernel


class Block(nn.Module):
    """A convolution block whose wiring each case varies."""

    def __init__(self, wiring: str) -> None:
        super().__init__()
        self.wiring = wiring
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.relu_in_place = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.padded_pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.wiring == "block":
            return self.pool(self.relu(self.bn(y)))
        if self.wiring == "in place":  # export makes the in-place ReLU a plain one
            return self.pool(self.relu_in_place(self.bn(y)))
        if self.wiring == "pool first":
            return self.relu(self.pool(self.bn(y)))
        if self.wiring == "residual":  # the sums are read twice: nothing can be taken
            return self.relu(self.bn(y)) + y
        if self.wiring == "shared relu":  # the ReLU runs twice in the model
            return self.relu(self.relu(self.bn(y)) - 1)
        if self.wiring == "pool twice":  # one module, two calls: one pool is not two
            return self.pool(self.pool(self.relu(self.bn(y))))
        if self.wiring == "padded pool":
            return self.padded_pool(self.relu(self.bn(y)))
        if self.wiring == "norm after relu":
            return self.bn(self.relu(y))
        raise AssertionError(self.wiring)


@pytest.mark.parametrize(
    ("wiring", "absorbed", "relu", "pool"),
    [
        ("block", ("bn", "relu", "pool"), True, ((2, 2), (2, 2))),
        ("in place", ("bn", "relu_in_place", "pool"), True, ((2, 2), (2, 2))),
        ("pool first", ("bn", "pool", "relu"), True, ((2, 2), (2, 2))),
        ("residual", None, False, None),
        ("shared relu", ("bn",), False, None),
        ("pool twice", ("bn", "relu"), True, None),
        ("padded pool", ("bn", "relu"), True, None),
        ("norm after relu", ("relu",), True, None),
    ],
)
def test_the_epilogue_takes_only_a_single_chain(wiring, absorbed, relu, pool) -> None:
    model = Block(wiring).eval()
    side = 12 if wiring == "pool twice" else 6
    model.bn.running_var.fill_(4.0)
    model.bn.running_mean.fill_(1.0)
    model.conv = KernelCall(dense_kernel("conv", model.conv), (4, side, side))
    found = find_epilogues(model, (2, side, side), {"conv"})
    if absorbed is None:
        assert found == {}
        return
    epilogue = found["conv"]
    assert epilogue.absorbed == absorbed
    assert (epilogue.relu, epilogue.pool) == (relu, pool)
    if "bn" in absorbed:  # (x - 1) / sqrt(4 + eps): scale 1/2, shift -1/2
        np.testing.assert_allclose(epilogue.scale, 0.5, rtol=1e-5)
        np.testing.assert_allclose(epilogue.shift, -0.5, rtol=1e-5)
    else:
        assert epilogue.scale is None


def test_a_layer_not_asked_for_keeps_what_follows_it() -> None:
    model = Block("block").eval()
    model.conv = KernelCall(dense_kernel("conv", model.conv), (4, 6, 6))
    assert find_epilogues(model, (2, 6, 6), set()) == {}
