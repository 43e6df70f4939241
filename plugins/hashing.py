"""`hashing`: HashedNets (Chen et al. 2015, "Compressing Neural Networks with the Hashing Trick").

Every element of a layer's virtual weight tensor (Linear: out x in; Conv2d: out x in/groups x
kh x kw; Embedding: the num_embeddings x embedding_dim table, so entry (row, col) of the
table) reads one of K real weights, chosen by a hash of the element's flat position, and
multiplies it by a +1/-1 sign taken from a second hash. Only the K real weights (and the
bias) are stored; the bucket and sign of every position are recomputed from the seed, so they
cost nothing in the artifact. The layer trains by ordinary backprop: gradients of all virtual
weights that share a bucket add up on its real weight. An Embedding's ``padding_idx`` row is
kept apart, exactly, as ``nn.Embedding`` keeps it fixed (see :mod:`autoshrink.embedding`).
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

__all__ = [
    "HashedConv2d", "HashedEmbedding", "HashedLinear", "Hashing", "HashingConfig", "position_hash",
]

#: The seed every layer's hashes use. It is written into each layer's code, so a later version
#: may change it without breaking artifacts written with this one.
SEED = 0x5EED
#: Hash streams: one chooses the bucket, an independent one the sign.
_BUCKET_STREAM, _SIGN_STREAM = 0, 1

# splitmix64 (Steele, Lea & Flood 2014) constants. Plain uint64 arithmetic wraps the same way
# on every platform and numpy version, unlike numpy's or torch's random generators, whose
# streams are not promised to stay the same across versions.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _finalize(z: np.ndarray) -> np.ndarray:
    """The splitmix64 output function: a bijective avalanche of a uint64 array."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def position_hash(count: int, seed: int, stream: int) -> np.ndarray:
    """64-bit hashes of the flat positions ``0 .. count-1`` for ``seed`` and ``stream``.

    Position p gets the (p+1)-th output of a splitmix64 generator whose state starts at a
    key mixed from (seed, stream), so different streams are unrelated to each other.
    """
    if not 0 <= seed < 2**62 or stream not in (0, 1):
        raise ValueError(f"seed {seed} or stream {stream} out of range")
    with np.errstate(over="ignore"):  # wrapping is the point of the arithmetic
        key = _finalize(np.array([seed * 2 + stream], dtype=np.uint64))
        positions = np.arange(1, count + 1, dtype=np.uint64)
        return _finalize(key + positions * _GAMMA)


def hashed_positions(
    shape: tuple[int, ...], k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket (int64 in [0, k)) and sign (float32 +-1) of every element of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    bucket = position_hash(count, seed, _BUCKET_STREAM) % np.uint64(k)
    # The top bit is the best mixed one of splitmix64's output.
    bit = position_hash(count, seed, _SIGN_STREAM) >> np.uint64(63)
    sign = 1.0 - 2.0 * bit.astype(np.float32)
    index = torch.from_numpy(bucket.astype(np.int64).reshape(shape))
    return index, torch.from_numpy(sign.astype(np.float32).reshape(shape))


class _Hashed(nn.Module):
    """What hashed Linear, Conv2d and Embedding layers share: K real weights, the bias and the
    recomputed bucket/sign tensors (non-persistent buffers: never stored, moved by .to())."""

    bias: nn.Parameter | None

    def __init__(self, shape: tuple[int, ...], k: int, bias: bool, seed: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.k = k
        self.seed = seed
        # The K real weights. Not called `values`: torch's parametrize keeps parametrizations
        # in a ModuleDict, where `values` is a method name, so a value stage could not wrap it.
        self.shared = nn.Parameter(torch.zeros(k))
        self.bias = zero_bias(shape[0] if bias else None)
        index, sign = hashed_positions(self.shape, k, seed)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)

    def virtual_weight(self) -> torch.Tensor:
        """The full weight tensor the layer acts with: shared[bucket] * sign, elementwise."""
        return self.shared[self.index] * self.sign

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
        return f"shape={self.shape}, k={self.k}, bias={self.bias is not None}, seed={self.seed}"


class HashedLinear(_Hashed):
    """A Linear layer whose out x in weight is drawn from K shared values by hashing."""

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool, seed: int):
        super().__init__((out_features, in_features), k, bias, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_weight(), self.bias)


class HashedConv2d(_Hashed):
    """A Conv2d layer whose out x in/groups x kh x kw weight is drawn from K shared values by
    hashing; stride, padding, dilation, groups and padding mode are those of the original."""

    def __init__(self, conv: nn.Conv2d, k: int, bias: bool, seed: int) -> None:
        super().__init__(tuple(conv.weight.shape), k, bias, seed)
        keep_conv_geometry(self, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self, x, self.virtual_weight(), self.bias)


class HashedEmbedding(_Hashed):
    """An Embedding whose num_embeddings x embedding_dim table is drawn from K shared values
    by hashing. A token's row is gathered from the bucket and sign tensors, so the whole
    table is never built; the ``padding_idx`` row, if any, is kept apart and fixed."""

    def __init__(self, table: nn.Embedding, k: int, seed: int, padding: PaddingRow | None):
        super().__init__(tuple(table.weight.shape), k, False, seed)
        self.padding = padding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.shared[self.index[tokens]] * self.sign[tokens]
        return rows if self.padding is None else self.padding(tokens, rows)


class HashingConfig(MethodConfig):
    ratio: float = Field(
        0.125, ge=1 / 256, le=1.0, json_schema_extra={"log": True},
        description="K, the number of real weights, as a share of the layer's weights",
    )


def _make(
    layer: nn.Module, k: int, bias: bool, seed: int, padding: PaddingRow | None = None
) -> _Hashed:
    if isinstance(layer, nn.Embedding):
        return HashedEmbedding(layer, k, seed, padding)
    if isinstance(layer, nn.Conv2d):
        return HashedConv2d(layer, k, bias, seed)
    assert isinstance(layer, nn.Linear)
    return HashedLinear(layer.in_features, layer.out_features, k, bias, seed)


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
        module = _make(layer, k, bias is not None, SEED, padding).to(layer.weight.device)
        module.fit(layer.weight)
        copy_bias(layer, module)
        return module

    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("shared",)

    def encode(self, module: nn.Module, config: HashingConfig) -> LayerCode:
        assert isinstance(module, _Hashed)
        code = LayerCode(
            payloads=payloads(module, self.payload_names(module)),
            meta={"seed": module.seed, "k": module.k, "shape": list(module.shape)},
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
        seed, k = meta.get("seed"), meta.get("k")
        if not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"hash seed {seed!r} is not valid")
        if not isinstance(k, int) or not 1 <= k <= int(np.prod(shape)):
            raise ValueError(f"K = {k!r} does not fit a weight of shape {shape}")
        check_code_shape(code, shape)
        shared = stored_payload(code, "shared", (k,))
        bias = stored_bias(code, template)
        padding = padding_from_code(code, template)
        module = _make(template, k, bias is not None, seed, padding)
        with torch.no_grad():
            module.shared.copy_(shared)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def lower(
        self, code: LayerCode, template: nn.Module, config: HashingConfig
    ) -> LoweredLayer | None:
        """Only the K values (in their value format) and the bias: the kernel computes each
        weight's bucket and sign from its flat position and the seed, with the same
        splitmix64 hashes as :func:`position_hash`, so no index array is stored."""
        from tvm import te

        from autoshrink.compiler.kernels import dense_layer, modulo, splitmix64, supports

        if not supports(template):
            return None
        seed, k = int(code.meta["seed"]), int(code.meta["k"])
        streams = np.array([seed * 2 + _BUCKET_STREAM, seed * 2 + _SIGN_STREAM], np.uint64)
        with np.errstate(over="ignore"):
            bucket_key, sign_key = (int(key) for key in _finalize(streams))

        def compute(x: Any, t: Any, p: Any) -> Any:
            # Bucket and sign of every weight, computed from the position and the seed on each
            # call (stages of their own: the hash's let-bound halves must not be copied into
            # each place a value method reads its index).
            count = int(np.prod(template.weight.shape))
            bucket = te.compute(
                (count,), lambda f: splitmix64(bucket_key, f, lambda z: modulo(z, k)),
                name="bucket",
            )
            sign = te.compute(
                (count,),
                lambda f: splitmix64(sign_key, f, lambda z: 1 - 2 * (z[0] >> 31)).astype(
                    "float32"
                ),
                name="sign",
            )
            return dense_layer(
                x, template, lambda f: p["shared"](bucket[f]) * sign[f], t.get("bias")
            )

        return LoweredLayer(arrays=bias_arrays(code), compute=compute)


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Hashing())
