"""`dense`: the layer kept as it is (the structure stage's "no compression" choice).

An Embedding with ``padding_idx`` is kept as a :class:`PaddedTable`: the whole table, plus its
padding row held apart, so that a value stage that restricts the table's values (k-means
quantization moves a zero row to its nearest centroid) leaves the pad exactly as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import LayerCode, LoweredLayer, Method, MethodConfig, StructureMethod
from autoshrink.structure_kit import (
    PaddingRow,
    bias_arrays,
    padding_from_code,
    payloads,
    store_bias,
    stored_bias,
    stored_payload,
)

__all__ = ["Dense", "PaddedTable"]


class PaddedTable(nn.Module):
    """An Embedding's whole table (``weight``, trainable) whose padding token reads the
    fixed ``padding`` row instead of its row of the table."""

    def __init__(self, table: nn.Embedding, padding: PaddingRow) -> None:
        super().__init__()
        self.weight = nn.Parameter(table.weight.detach().clone())
        self.scale_grad_by_freq = table.scale_grad_by_freq
        self.padding = padding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight, scale_grad_by_freq=self.scale_grad_by_freq)
        return self.padding(tokens, rows)


class Dense(StructureMethod):
    name = "dense"
    summary = "keep the layer's weight matrix (or embedding table) as it is"
    Config = MethodConfig
    applies_to = (nn.Linear, nn.Conv2d, nn.Embedding)

    def build(self, layer: nn.Module, config: MethodConfig) -> nn.Module:
        padding = PaddingRow.of(layer)
        if padding is not None:
            return PaddedTable(layer, padding).to(layer.weight.device)
        return copy.deepcopy(layer)

    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("weight",)

    def encode(self, module: nn.Module, config: MethodConfig) -> LayerCode:
        code = LayerCode(payloads=payloads(module, self.payload_names(module)))
        store_bias(module, code)
        padding = module.padding if isinstance(module, PaddedTable) else PaddingRow.of(module)
        if padding is not None:  # also a plain table, as an uncompressed model holds it
            padding.store(code)
        return code

    def decode(self, code: LayerCode, template: nn.Module, config: MethodConfig) -> nn.Module:
        padding = padding_from_code(code, template)
        module = copy.deepcopy(template) if padding is None else PaddedTable(template, padding)
        weight = stored_payload(code, "weight", tuple(module.weight.shape))
        bias = stored_bias(code, module)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def lower(
        self, code: LayerCode, template: nn.Module, config: MethodConfig
    ) -> LoweredLayer | None:
        """A Linear / Conv2d whose weight elements come from the value stage as it reads
        them (codes stay codes); grouped or non-zero-padded convolutions and embedding
        tables stay dense."""
        from autoshrink.compiler.kernels import dense_layer, supports

        if not supports(template):
            return None
        return LoweredLayer(
            arrays=bias_arrays(code),
            compute=lambda x, t, p: dense_layer(x, template, p["weight"], t.get("bias")),
            weights=("weight",),
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Dense())
