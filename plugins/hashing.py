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
    "HASH", "HashedConv2d", "HashedEmbedding", "HashedLinear", "Hashing", "HashingConfig",
    "hashed_positions", "mix32", "position_hash",
]

#: The seed every layer's hashes use. It is written into each layer's code, so a later version
#: may change it without breaking artifacts written with this one.
SEED = 0x5EED
#: The position hash new layers use, written into each layer's code as ``hash``: murmur3's
#: 32-bit finalizer, whose two multiplies a compiled kernel computes 16 lanes at a time.
#: Layers written before it (no ``hash`` in their code) used ``splitmix64``, still decoded.
HASH = "mix32"
HASHES = ("mix32", "splitmix64")
#: splitmix64's hash streams: one chose the bucket, an independent one the sign.
_BUCKET_STREAM, _SIGN_STREAM = 0, 1

# splitmix64 (Steele, Lea & Flood 2014) constants. Plain uint64 arithmetic wraps the same way
# on every platform and numpy version, unlike numpy's or torch's random generators, whose
# streams are not promised to stay the same across versions.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# murmur3's fmix32 multipliers (Appleby).
_FMIX = (0x85EBCA6B, 0xC2B2AE35)
_SHIFTS = (16, 13, 16)  # xor-shifts before, between and after them
_WORD = np.uint64(0xFFFFFFFF)


def _finalize(z: np.ndarray) -> np.ndarray:
    """The splitmix64 output function: a bijective avalanche of a uint64 array."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def position_hash(count: int, seed: int, stream: int) -> np.ndarray:
    """splitmix64 hashes of the flat positions ``0 .. count-1`` for ``seed`` and ``stream``
    (the hash of layers written before ``mix32``).

    Position p gets the (p+1)-th output of a splitmix64 generator whose state starts at a
    key mixed from (seed, stream), so different streams are unrelated to each other.
    """
    if not 0 <= seed < 2**62 or stream not in (0, 1):
        raise ValueError(f"seed {seed} or stream {stream} out of range")
    with np.errstate(over="ignore"):  # wrapping is the point of the arithmetic
        key = _finalize(np.array([seed * 2 + stream], dtype=np.uint64))
        positions = np.arange(1, count + 1, dtype=np.uint64)
        return _finalize(key + positions * _GAMMA)


def mix_key(seed: int) -> int:
    """The 32-bit key ``mix32`` mixes into every position: splitmix64 of the seed."""
    with np.errstate(over="ignore"):
        return int(_finalize(np.array([seed], dtype=np.uint64))[0]) & 0xFFFFFFFF


def mix32(count: int, seed: int) -> np.ndarray:
    """32-bit hashes (as uint64) of the flat positions ``0 .. count-1``: murmur3's fmix32 of
    ``position ^ key``, a bijection of 32-bit words, so no two positions hash alike. A
    position's bucket among K is ``(hash * K) >> 32``; its sign is the hash's lowest bit."""
    if count > 2**31:
        raise ValueError(f"a layer of {count} weights is too large to hash (at most 2**31)")
    h = np.arange(count, dtype=np.uint64) ^ np.uint64(mix_key(seed))
    for factor, shift in zip(_FMIX, _SHIFTS, strict=False):
        h = ((h ^ (h >> np.uint64(shift))) * np.uint64(factor)) & _WORD
    return h ^ (h >> np.uint64(_SHIFTS[-1]))


def hashed_positions(
    shape: tuple[int, ...], k: int, seed: int, hash: str = HASH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket (int64 in [0, k)) and sign (float32 +-1) of every element of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    if hash == "mix32":
        h = mix32(count, seed)
        bucket = (h * np.uint64(k)) >> np.uint64(32)
        bit = h & np.uint64(1)
    else:
        bucket = position_hash(count, seed, _BUCKET_STREAM) % np.uint64(k)
        # The top bit is the best mixed one of splitmix64's output.
        bit = position_hash(count, seed, _SIGN_STREAM) >> np.uint64(63)
    sign = 1.0 - 2.0 * bit.astype(np.float32)
    index = torch.from_numpy(bucket.astype(np.int64).reshape(shape))
    return index, torch.from_numpy(sign.astype(np.float32).reshape(shape))


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
        self, shape: tuple[int, ...], k: int, bias: bool, seed: int, hash: str = HASH
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.k = k
        self.seed = seed
        self.hash = hash
        # The K real weights. Not called `values`: torch's parametrize keeps parametrizations
        # in a ModuleDict, where `values` is a method name, so a value stage could not wrap it.
        self.shared = nn.Parameter(torch.zeros(k))
        self.bias = zero_bias(shape[0] if bias else None)
        index, sign = hashed_positions(self.shape, k, seed, hash)
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
            f"hash={self.hash}"
        )


class HashedLinear(_Hashed):
    """A Linear layer whose out x in weight is drawn from K shared values by hashing."""

    def __init__(
        self, in_features: int, out_features: int, k: int, bias: bool, seed: int, hash: str = HASH
    ) -> None:
        super().__init__((out_features, in_features), k, bias, seed, hash)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_weight(), self.bias)


class HashedConv2d(_Hashed):
    """A Conv2d layer whose out x in/groups x kh x kw weight is drawn from K shared values by
    hashing; stride, padding, dilation, groups and padding mode are those of the original."""

    def __init__(self, conv: nn.Conv2d, k: int, bias: bool, seed: int, hash: str = HASH) -> None:
        super().__init__(tuple(conv.weight.shape), k, bias, seed, hash)
        keep_conv_geometry(self, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self, x, self.virtual_weight(), self.bias)


class HashedEmbedding(_Hashed):
    """An Embedding whose num_embeddings x embedding_dim table is drawn from K shared values
    by hashing. A token's row is gathered from the bucket and sign tensors, so the whole
    table is never built; the ``padding_idx`` row, if any, is kept apart and fixed."""

    def __init__(
        self, table: nn.Embedding, k: int, seed: int, padding: PaddingRow | None, hash: str = HASH
    ) -> None:
        super().__init__(tuple(table.weight.shape), k, False, seed, hash)
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
    layer: nn.Module,
    k: int,
    bias: bool,
    seed: int,
    padding: PaddingRow | None = None,
    hash: str = HASH,
) -> _Hashed:
    if isinstance(layer, nn.Embedding):
        return HashedEmbedding(layer, k, seed, padding, hash)
    if isinstance(layer, nn.Conv2d):
        return HashedConv2d(layer, k, bias, seed, hash)
    assert isinstance(layer, nn.Linear)
    return HashedLinear(layer.in_features, layer.out_features, k, bias, seed, hash)


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
        if not isinstance(k, int) or not 1 <= k <= int(np.prod(shape)):
            raise ValueError(f"K = {k!r} does not fit a weight of shape {shape}")
        check_code_shape(code, shape)
        shared = stored_payload(code, "shared", (k,))
        bias = stored_bias(code, template)
        padding = padding_from_code(code, template)
        module = _make(template, k, bias is not None, seed, padding, hash)
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
        ``splitmix64`` have no compressed kernel (they compile dense)."""
        from autoshrink.compiler.kernels import dense_layer, supports

        if not supports(template) or code.meta.get("hash", "splitmix64") != "mix32":
            return None
        key, k = mix_key(int(code.meta["seed"])), int(code.meta["k"])

        def element(t: Any, p: Any) -> Callable[[Any], Any]:
            return lambda f: _hashed_weight(f, key, k, p["shared"])

        def compute(x: Any, t: Any, p: Any) -> Any:
            return dense_layer(x, template, element(t, p), t.get("bias"))

        return LoweredLayer(arrays=bias_arrays(code), compute=compute, element=element)


def _hashed_weight(index: Any, key: int, k: int, shared: Callable[[Any], Any]) -> Any:
    """The TVM expression of the weights at flat positions ``index`` (int32, one lane or
    many): ``shared[(h * k) >> 32]`` with its sign bit flipped where ``h``'s lowest bit is
    set, ``h`` being :func:`mix32` of the position."""
    from tvm import tirx

    from autoshrink.compiler.kernels import bound, constant, multiply32, typed

    def mixed(h: Any, factor: int, shift: int) -> Any:
        return multiply32(h ^ (h >> constant(h, shift, "uint32")), factor)

    def weight(h: Any) -> Any:
        bucket = (h.astype(typed(h, "uint64")) * constant(h, k, "uint64")) >> constant(
            h, 32, "uint64"
        )
        value = tirx.reinterpret(typed(h, "uint32"), shared(bucket.astype(typed(h, "int32"))))
        flipped = value ^ (h << constant(h, 31, "uint32"))
        return tirx.reinterpret(typed(h, "float32"), flipped)

    start = index.astype(typed(index, "uint32")) ^ constant(index, key, "uint32")
    first, second = _FMIX

    def finish(h: Any) -> Any:
        return bound(h ^ (h >> constant(h, _SHIFTS[2], "uint32")), weight)

    return bound(
        mixed(start, first, _SHIFTS[0]),
        lambda h: bound(mixed(h, second, _SHIFTS[1]), finish),
    )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Hashing())
