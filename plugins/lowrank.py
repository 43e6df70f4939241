"""`lowrank`: low-rank factorization (Denil et al. 2013; Denton et al. 2014).

A Linear weight W (out x in) becomes the product U V of an out x r and an r x in matrix; a
Conv2d becomes a kh x kw convolution to r channels (weight V, the original stride, padding
and dilation) followed by a 1x1 convolution to the output channels (weight U, with the
bias), which is W reshaped to (out, in*kh*kw) factored the same way. An Embedding's
num_embeddings x dim table becomes U V with U: num_embeddings x r (a token's row of
coefficients, gathered like a table of its own) and V: r x dim. Both factors start from
the truncated SVD of the trained weight, so the layer begins as the best rank-r fit of it.
Grouped convolutions are not supported (``applies`` is False for them).

With ``train_u=False`` the output-side factor U acts as the fixed "dictionary" of Denil et
al.'s predicted parameters and only the coefficients V train; U is still stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import LayerCode, LoweredLayer, Method, MethodConfig, StructureMethod
from autoshrink.structure_kit import (
    PaddingRow,
    bias_arrays,
    conv2d,
    copy_bias,
    keep_conv_geometry,
    padding_from_code,
    payloads,
    store_bias,
    stored_bias,
    stored_payload,
    zero_bias,
)

__all__ = [
    "RANK_FLOOR", "LowRank", "LowRankConfig", "LowRankConv2d", "LowRankEmbedding",
    "LowRankLinear", "full_rank", "rank_for",
]

#: The smallest rank a layer gets, unless the factors would then outweigh the dense layer. A
#: fraction that suits a 1200-wide layer leaves a 10-class output layer at rank 1, which
#: loses most of the accuracy; the floor keeps the knob meaningful across layer sizes.
RANK_FLOOR = 8


def full_rank(layer: nn.Module) -> int:
    """The largest rank of the layer's weight viewed as a matrix (out, in*kh*kw)."""
    weight = layer.weight
    return min(weight.shape[0], weight[0].numel())


def rank_for(layer: nn.Module, fraction: float) -> int:
    """The rank ``fraction`` gives ``layer``: that share of its full rank, raised to
    :data:`RANK_FLOOR` where that still stores fewer weights than the dense layer."""
    out, rest = layer.weight.shape[0], layer.weight[0].numel()
    full = min(out, rest)
    saving = max(1, (out * rest - 1) // (out + rest))  # the largest rank smaller than dense
    return min(full, max(round(fraction * full), min(RANK_FLOOR, saving)))


class _LowRank(nn.Module):
    """What factored Linear, Conv2d and Embedding layers share: the factors ``u`` (output
    side) and ``v`` (input side), the bias, and whether ``u`` trains."""

    bias: nn.Parameter | None

    def __init__(
        self, u_shape: tuple[int, ...], v_shape: tuple[int, ...], bias: bool, train_u: bool
    ) -> None:
        super().__init__()
        self.rank = v_shape[0]
        self.u = nn.Parameter(torch.zeros(u_shape), requires_grad=train_u)
        self.v = nn.Parameter(torch.zeros(v_shape))
        self.bias = zero_bias(u_shape[0] if bias else None)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> None:
        """Set U and V to the rank-r truncated SVD of ``weight`` as an (out, rest) matrix,
        with the square roots of the singular values split between them so both factors
        have the same scale (which keeps their gradients balanced)."""
        matrix = weight.detach().reshape(weight.shape[0], -1).double()
        left, singular, right = torch.linalg.svd(matrix, full_matrices=False)
        root = singular[: self.rank].sqrt()
        self.u.copy_((left[:, : self.rank] * root).reshape(self.u.shape))
        self.v.copy_((root[:, None] * right[: self.rank]).reshape(self.v.shape))

    def extra_repr(self) -> str:
        return (
            f"u={tuple(self.u.shape)}, v={tuple(self.v.shape)}, bias={self.bias is not None}, "
            f"train_u={self.u.requires_grad}"
        )


class LowRankLinear(_LowRank):
    """A Linear layer computing x -> U (V x) + b with U: out x r and V: r x in."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, train_u: bool):
        super().__init__((out_features, rank), (rank, in_features), bias, train_u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin products cost r*(in+out) multiply-adds per row instead of in*out.
        return F.linear(F.linear(x, self.v), self.u, self.bias)


class LowRankConv2d(_LowRank):
    """A Conv2d layer as a kh x kw convolution to ``rank`` channels (V, the original stride,
    padding, dilation and padding mode) then a 1x1 convolution to the outputs (U, the bias)."""

    def __init__(self, conv: nn.Conv2d, rank: int, bias: bool, train_u: bool) -> None:
        out, inp, kh, kw = conv.weight.shape
        super().__init__((out, rank, 1, 1), (rank, inp, kh, kw), bias, train_u)
        keep_conv_geometry(self, conv)  # groups is 1: LowRank.applies refuses grouped convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(conv2d(self, x, self.v), self.u, self.bias)


class LowRankEmbedding(_LowRank):
    """An Embedding whose table is U V: a token's row is U[token] V (U: num x r, V: r x dim);
    the ``padding_idx`` row, if any, is kept apart and fixed."""

    def __init__(
        self, table: nn.Embedding, rank: int, train_u: bool, padding: PaddingRow | None
    ) -> None:
        num, dim = table.weight.shape
        super().__init__((num, rank), (rank, dim), False, train_u)
        self.scale_grad_by_freq = table.scale_grad_by_freq
        self.padding = padding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        coefficients = F.embedding(tokens, self.u, scale_grad_by_freq=self.scale_grad_by_freq)
        rows = coefficients @ self.v
        return rows if self.padding is None else self.padding(tokens, rows)


class LowRankConfig(MethodConfig):
    rank: float = Field(
        0.25, ge=0.01, le=1.0, json_schema_extra={"log": True},
        description=f"r as a share of the full rank, at least {RANK_FLOOR} while the factors "
        "stay smaller than the dense weight",
    )
    train_u: bool = Field(
        True, description="false keeps U (the output-side factor) at its SVD start"
    )


def _make(
    layer: nn.Module, rank: int, bias: bool, train_u: bool, padding: PaddingRow | None = None
) -> _LowRank:
    if isinstance(layer, nn.Embedding):
        return LowRankEmbedding(layer, rank, train_u, padding)
    if isinstance(layer, nn.Conv2d):
        return LowRankConv2d(layer, rank, bias, train_u)
    assert isinstance(layer, nn.Linear)
    return LowRankLinear(layer.in_features, layer.out_features, rank, bias, train_u)


class LowRank(StructureMethod):
    name = "lowrank"
    summary = (
        "factor the weight into two rank-r matrices from its SVD (conv: kxk to r channels, "
        "then 1x1; embedding: U[token] V); grouped conv not supported"
    )
    Config = LowRankConfig
    applies_to = (nn.Linear, nn.Conv2d, nn.Embedding)

    def applies(self, layer: nn.Module) -> bool:
        # A grouped conv's weight is block-diagonal over the groups; one kxk-then-1x1 pair
        # would mix the groups, so it cannot stand in for it.
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            return False
        return super().applies(layer)

    def build(self, layer: nn.Module, config: LowRankConfig) -> nn.Module:
        if not self.applies(layer):
            raise ValueError(f"`lowrank` does not apply to {layer!r}")
        rank = rank_for(layer, config.rank)
        bias = getattr(layer, "bias", None)
        padding = PaddingRow.of(layer)
        module = _make(layer, rank, bias is not None, config.train_u, padding)
        module = module.to(layer.weight.device)
        module.fit(layer.weight)
        copy_bias(layer, module)
        return module

    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("u", "v")

    def encode(self, module: nn.Module, config: LowRankConfig) -> LayerCode:
        assert isinstance(module, _LowRank)
        code = LayerCode(
            payloads=payloads(module, self.payload_names(module)), meta={"rank": module.rank}
        )
        store_bias(module, code)
        if isinstance(module, LowRankEmbedding) and module.padding is not None:
            module.padding.store(code)
        return code

    def decode(self, code: LayerCode, template: nn.Module, config: LowRankConfig) -> nn.Module:
        if not self.applies(template):
            raise ValueError(f"`lowrank` cannot rebuild {template!r}")
        meta: dict[str, Any] = code.meta
        rank = meta.get("rank")
        if not isinstance(rank, int) or not 1 <= rank <= full_rank(template):
            raise ValueError(f"rank {rank!r} does not fit {template!r}")
        bias = stored_bias(code, template)
        padding = padding_from_code(code, template)
        module = _make(template, rank, bias is not None, config.train_u, padding)
        with torch.no_grad():
            for name in ("u", "v"):
                target = getattr(module, name)
                target.copy_(stored_payload(code, name, tuple(target.shape)))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def lower(
        self, code: LayerCode, template: nn.Module, config: LowRankConfig
    ) -> LoweredLayer | None:
        """Two kernels' worth of loops in one: x -> V x (a kh x kw conv to r channels) ->
        U (V x) + b, each factor read in its stored value format."""
        from autoshrink.compiler.kernels import conv2d, linear, supports

        if not supports(template):
            return None
        rank = int(code.meta["rank"])
        out = template.weight.shape[0]
        inner = int(np.prod(template.weight.shape[1:]))

        def compute(x, t, p):
            v, u = p["v"], p["u"]
            if isinstance(template, nn.Linear):
                hidden = linear(x, lambda j, i: v(j * inner + i), rank, name="v")
                return linear(hidden, lambda o, j: u(o * rank + j), out, t.get("bias"))
            _, channels, kh, kw = template.weight.shape
            hidden = conv2d(
                x,
                lambda j, c, r, s: v(((j * channels + c) * kh + r) * kw + s),
                rank,
                kernel=template.kernel_size,
                stride=template.stride,
                padding=template.padding,
                dilation=template.dilation,
                name="v",
            )
            return conv2d(hidden, lambda o, j, r, s: u(o * rank + j), out, (1, 1),
                          bias=t.get("bias"))

        return LoweredLayer(
            arrays=bias_arrays(code),
            compute=compute,
            weights=("v", "u") if isinstance(template, nn.Linear) else (),
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(LowRank())
