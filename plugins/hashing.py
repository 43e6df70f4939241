"""`hashing`: HashedNets (Chen et al. 2015, "Compressing Neural Networks with the Hashing Trick").

Every element of a layer's virtual weight tensor (Linear: out x in; Conv2d: out x in/groups x
kh x kw; Embedding: the num_embeddings x embedding_dim table, so entry (row, col) of the
table) reads one of K real weights, chosen by a hash of the element's flat position, and
multiplies it by a +1/-1 sign taken from a second hash. Only the K real weights (and the
bias) are stored; the bucket and sign of every position are recomputed from the seed, so they
cost nothing in the artifact. The layer trains by ordinary backprop: gradients of all virtual
weights that share a bucket add up on its real weight. An Embedding's ``padding_idx`` row is
kept apart, exactly, as ``nn.Embedding`` keeps it fixed (see :mod:`autoshrink.embedding`).

With ``run = 16``, the weights are hashed in runs instead (in the manner of ROBE-Z, Desai et
al. 2022): the 16 elements of one column in rows 16g .. 16g+15 share one hash, which picks
where their run of 16 consecutive real weights starts and gives each its sign bit. A compiled
kernel then reads a run as one vector, where element hashing costs a hash and a gathered read
per weight. The hashes themselves are in :mod:`autoshrink_plugins.hash_positions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import (
    Columns,
    LayerCode,
    LoweredLayer,
    Method,
    MethodConfig,
    StructureMethod,
)
from autoshrink.structure_kit import (
    PaddingRow,
    bias_arrays,
    check_code_shape,
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
from autoshrink_plugins.hash_positions import (
    HASH,
    HASHES,
    RUN,
    SEED,
    hashed_positions,
    hashed_weight,
    mix32,
    mix_key,
    mixed,
    position_hash,
    run_column,
    run_start,
    run_weight,
)

__all__ = [
    "HASH", "RUN", "SEED", "HashedConv2d", "HashedEmbedding", "HashedLinear", "Hashing",
    "HashingConfig", "hashed_positions", "mix32", "mix_key", "position_hash", "run_start",
]

class _Spread(torch.autograd.Function):
    """``shared[index] * sign``, whose gradient for the K values is summed per bucket by
    ``bincount`` (in float64): autograd's own backward of the gather, an accumulating
    scatter, took twice as long a fine-tune step on a 1200 x 784 layer."""

    @staticmethod
    def forward(ctx: Any, shared: torch.Tensor, index: torch.Tensor, sign: torch.Tensor) -> Any:
        ctx.save_for_backward(index, sign)
        ctx.k = shared.shape[0]
        return shared[index] * sign

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        index, sign = ctx.saved_tensors
        spread = (grad * sign).reshape(-1).double()
        total = torch.bincount(index.reshape(-1), weights=spread, minlength=ctx.k)
        return total.to(grad.dtype), None, None


class _Hashed(nn.Module):
    """What hashed Linear, Conv2d and Embedding layers share: K real weights, the bias and the
    recomputed bucket/sign tensors (non-persistent buffers: never stored, moved by .to())."""

    bias: nn.Parameter | None

    def __init__(
        self,
        shape: tuple[int, ...],
        k: int,
        bias: bool,
        seed: int,
        hash: str = HASH,
        run: int = 1,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.k = k
        self.seed = seed
        self.hash = hash
        self.run = run
        # The K real weights. Not called `values`: torch's parametrize keeps parametrizations
        # in a ModuleDict, where `values` is a method name, so a value stage could not wrap it.
        self.shared = nn.Parameter(torch.zeros(k))
        self.bias = zero_bias(shape[0] if bias else None)
        index, sign = hashed_positions(self.shape, k, seed, hash, run)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)

    def virtual_weight(self) -> torch.Tensor:
        """The full weight tensor the layer acts with: shared[bucket] * sign, elementwise."""
        return _Spread.apply(self.shared, self.index, self.sign)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> None:
        """Set the K values to the least-squares fit of ``weight``: each bucket's value is
        the mean of sign * w over its positions (empty buckets get 0)."""
        flat = (weight.detach().to(self.sign) * self.sign).reshape(-1).double()
        index = self.index.reshape(-1)
        total = torch.bincount(index, weights=flat, minlength=self.k)
        count = torch.bincount(index, minlength=self.k).double()
        self.shared.copy_(torch.where(count > 0, total / count.clamp(min=1), 0.0))

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, k={self.k}, bias={self.bias is not None}, seed={self.seed}, "
            f"hash={self.hash}" + (f", run={self.run}" if self.run != 1 else "")
        )


class HashedLinear(_Hashed):
    """A Linear layer whose out x in weight is drawn from K shared values by hashing."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        bias: bool,
        seed: int,
        hash: str = HASH,
        run: int = 1,
    ) -> None:
        super().__init__((out_features, in_features), k, bias, seed, hash, run)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_weight(), self.bias)


class HashedConv2d(_Hashed):
    """A Conv2d layer whose out x in/groups x kh x kw weight is drawn from K shared values by
    hashing; stride, padding, dilation, groups and padding mode are those of the original."""

    def __init__(
        self, conv: nn.Conv2d, k: int, bias: bool, seed: int, hash: str = HASH, run: int = 1
    ) -> None:
        super().__init__(tuple(conv.weight.shape), k, bias, seed, hash, run)
        keep_conv_geometry(self, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self, x, self.virtual_weight(), self.bias)


class HashedEmbedding(_Hashed):
    """An Embedding whose num_embeddings x embedding_dim table is drawn from K shared values
    by hashing. A token's row is gathered from the bucket and sign tensors, so the whole
    table is never built; the ``padding_idx`` row, if any, is kept apart and fixed."""

    def __init__(
        self,
        table: nn.Embedding,
        k: int,
        seed: int,
        padding: PaddingRow | None,
        hash: str = HASH,
        run: int = 1,
    ) -> None:
        super().__init__(tuple(table.weight.shape), k, False, seed, hash, run)
        self.padding = padding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.shared[self.index[tokens]] * self.sign[tokens]
        return rows if self.padding is None else self.padding(tokens, rows)


class HashingConfig(MethodConfig):
    ratio: float = Field(
        0.125, ge=1 / 256, le=1.0, json_schema_extra={"log": True},
        description="K, the number of real weights, as a share of the layer's weights",
    )
    run: Literal[1, 16] = Field(
        1,
        description=(
            "weights that share one hash: 1, each its own (HashedNets); 16, the 16 rows of a "
            "column read 16 consecutive real weights, one vector in a compiled kernel"
        ),
    )


def _make(
    layer: nn.Module,
    k: int,
    bias: bool,
    seed: int,
    padding: PaddingRow | None = None,
    hash: str = HASH,
    run: int = 1,
) -> _Hashed:
    if isinstance(layer, nn.Embedding):
        return HashedEmbedding(layer, k, seed, padding, hash, run)
    if isinstance(layer, nn.Conv2d):
        return HashedConv2d(layer, k, bias, seed, hash, run)
    assert isinstance(layer, nn.Linear)
    return HashedLinear(layer.in_features, layer.out_features, k, bias, seed, hash, run)


class Hashing(StructureMethod):
    name = "hashing"
    summary = "HashedNets: weights drawn from K = ratio x n shared values by a position hash"
    Config = HashingConfig
    applies_to = (nn.Linear, nn.Conv2d, nn.Embedding)

    def build(self, layer: nn.Module, config: HashingConfig) -> nn.Module:
        n = layer.weight.numel()
        k = max(1, round(config.ratio * n))
        bias = getattr(layer, "bias", None)
        padding = PaddingRow.of(layer)
        module = _make(layer, k, bias is not None, SEED, padding, HASH, config.run)
        module = module.to(layer.weight.device)
        module.fit(layer.weight)
        copy_bias(layer, module)
        return module

    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("shared",)

    def encode(self, module: nn.Module, config: HashingConfig) -> LayerCode:
        assert isinstance(module, _Hashed)
        code = LayerCode(
            payloads=payloads(module, self.payload_names(module)),
            meta={
                "seed": module.seed, "k": module.k, "shape": list(module.shape),
                "hash": module.hash,
            },
        )
        store_bias(module, code)
        if isinstance(module, HashedEmbedding) and module.padding is not None:
            module.padding.store(code)
        return code

    def decode(self, code: LayerCode, template: nn.Module, config: HashingConfig) -> nn.Module:
        if not self.applies(template):
            raise ValueError(f"`hashing` cannot rebuild a {type(template).__name__}")
        shape = tuple(template.weight.shape)
        meta: dict[str, Any] = code.meta
        seed, k, hash = meta.get("seed"), meta.get("k"), meta.get("hash", "splitmix64")
        if not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"hash seed {seed!r} is not valid")
        if hash not in HASHES:
            raise ValueError(f"hash {hash!r} is not one of {', '.join(HASHES)}")
        if config.run != 1 and hash != HASH:
            raise ValueError(f"runs of {config.run} are hashed with {HASH}, not {hash}")
        if not isinstance(k, int) or not 1 <= k <= int(np.prod(shape)):
            raise ValueError(f"K = {k!r} does not fit a weight of shape {shape}")
        check_code_shape(code, shape)
        shared = stored_payload(code, "shared", (k,))
        bias = stored_bias(code, template)
        padding = padding_from_code(code, template)
        module = _make(template, k, bias is not None, seed, padding, hash, config.run)
        with torch.no_grad():
            module.shared.copy_(shared)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def lower(
        self, code: LayerCode, template: nn.Module, config: HashingConfig
    ) -> LoweredLayer | None:
        """Only the K values (in their value format) and the bias: the kernel computes each
        weight's bucket and sign from its flat position and the seed, with the same ``mix32``
        hash as :func:`hashed_positions`, so no index array is stored. Layers hashed with
        ``splitmix64`` have no compressed kernel (they compile dense). In the run layout a
        column of 16 rows is one hash and one contiguous read (``columns``)."""
        from autoshrink.compiler.kernels import dense_layer, supports

        if not supports(template) or code.meta.get("hash", "splitmix64") != "mix32":
            return None
        key, k = mix_key(int(code.meta["seed"])), int(code.meta["k"])
        shape = tuple(template.weight.shape)
        columns = int(np.prod(shape[1:]))

        def element(t: Any, p: Any) -> Callable[[Any], Any]:
            if config.run == RUN:
                return lambda f: run_weight(f, key, k, columns, p["shared"])
            return lambda f: hashed_weight(f, key, k, p["shared"])

        def runs(t: Any, p: Any) -> Columns:
            return Columns(
                key=lambda g, c: mixed(g * columns + c, key, lambda h: h),
                weights=lambda g, h: run_column(h, k, p["shared"]),
            )

        def compute(x: Any, t: Any, p: Any) -> Any:
            return dense_layer(x, template, element(t, p), t.get("bias"))

        whole = config.run == RUN and k >= RUN  # whole runs inside the K values: no wrap
        return LoweredLayer(
            arrays=bias_arrays(code), compute=compute, element=element,
            columns=runs if whole else None,
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Hashing())
