"""What the conformance kit (:mod:`autoshrink.testing`) runs methods on: sample layers and
inputs, a few optimizer steps and a stand-in value stage (what it compiles is
:mod:`autoshrink.kit_lowering`)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from autoshrink.methods import LayerCode

__all__ = [
    "STRUCTURE_PAYLOADS", "Shift", "code_bytes", "copy_code", "nudge", "resized",
    "sample_input", "sample_layers", "scramble",
]


#: The built-in structures whose payloads :class:`ValueMethodTests` tries a value method on,
#: each with a config that compresses (so the payloads are their compressed form).
STRUCTURE_PAYLOADS: dict[str, dict[str, object]] = {
    "hashing": {"ratio": 0.25},
    "pruning": {"target": "sparsity", "sparsity": 0.8},
    "lowrank": {"rank": 0.25},
}


def sample_layers() -> list[nn.Module]:
    """Small trained-looking layers of every type autoshrink compresses."""
    torch.manual_seed(0)
    return [
        nn.Linear(48, 40),
        nn.Linear(30, 20, bias=False),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(3, 6, 5, stride=2, bias=False),
        nn.Embedding(50, 16),
        nn.Embedding(40, 24, padding_idx=3),  # its row 3 is the fixed zero "pad"
    ]


def sample_input(layer: nn.Module, batch: int = 5) -> torch.Tensor:
    """A random input batch that fits ``layer`` (an Embedding's holds its padding token)."""
    generator = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Embedding):
        tokens = torch.randint(0, layer.num_embeddings, (batch, 7), generator=generator)
        if layer.padding_idx is not None:
            tokens[:, 0] = layer.padding_idx
        return tokens
    if isinstance(layer, nn.Conv2d):
        return torch.randn(batch, layer.in_channels, 12, 12, generator=generator)
    return torch.randn(batch, layer.in_features, generator=generator)


def resized(layer: nn.Module) -> nn.Module:
    """A layer of the same type as ``layer`` with other shapes."""
    if isinstance(layer, nn.Embedding):
        return nn.Embedding(layer.num_embeddings + 3, layer.embedding_dim + 2)
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels + 3, layer.out_channels + 2, 3)
    return nn.Linear(layer.in_features + 3, layer.out_features + 2)


def code_bytes(code: LayerCode) -> int:
    """Bytes a layer code takes with float32 payloads (before the value stage)."""
    payload = sum(t.numel() * 4 for t in code.payloads.values())
    return payload + sum(a.nbytes for a in code.arrays.values())


def nudge(module: nn.Module, x: torch.Tensor) -> None:
    """A few optimizer steps, so round trips are checked on trained, not initial, values."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        module(x).sin().mean().backward()
        optimizer.step()


class Shift(nn.Module):
    """A stand-in value stage that moves every value of a payload (zeros included)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.25


def scramble(module: nn.Module) -> None:
    """Overwrite a template's parameters so decode cannot pass by reusing them."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.normal_()


def copy_code(code: LayerCode) -> LayerCode:
    return LayerCode(
        payloads={k: v.detach().clone() for k, v in code.payloads.items()},
        arrays={k: np.array(v, copy=True) for k, v in code.arrays.items()},
        meta=copy.deepcopy(code.meta),
    )
