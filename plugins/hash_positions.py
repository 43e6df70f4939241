"""Where a hashed weight reads: the position hashes of :mod:`autoshrink_plugins.hashing`, as
numpy arrays for the PyTorch layers and as TVM expressions for the compiled kernels, so the
two cannot drift apart.

``mix32`` is murmur3's 32-bit finalizer (Appleby) of ``position ^ key``; ``splitmix64``
(Steele, Lea & Flood 2014) is the hash of layers written before it. A bucket among K is
``(h * K) >> 32``, a sign the lowest bit. In the run layout the elements of one column in
rows 16g .. 16g+15 share one hash: it gives where their 16 consecutive values start and, in
its bits 0-15, their signs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "HASH", "HASHES", "RUN", "SEED", "hashed_positions", "hashed_weight", "mix32", "mix_key",
    "mixed", "position_hash", "run_column", "run_start", "run_starts", "run_weight",
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
#: The rows that share one hash in the run layout (``run = 16``): one vector of float32 lanes.
RUN = 16


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
    shape: tuple[int, ...], k: int, seed: int, hash: str = HASH, run: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket (int64 in [0, k)) and sign (float32 +-1) of every element of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    if run == RUN:
        return _run_positions(shape, k, seed)
    if hash == "mix32":
        h = mix32(count, seed)
        bucket = (h * np.uint64(k)) >> np.uint64(32)
        bit = h & np.uint64(1)
    else:
        bucket = position_hash(count, seed, _BUCKET_STREAM) % np.uint64(k)
        # The top bit is the best mixed one of splitmix64's output.
        bit = position_hash(count, seed, _SIGN_STREAM) >> np.uint64(63)
    return _tensors(bucket, bit, shape)


def run_starts(k: int) -> int:
    """How many places a run may start at among K real weights: ``K - 15``, so that a whole
    run lies inside them when K is at least 16 (runs among fewer wrap around)."""
    return max(k - (RUN - 1), 1)


def run_start(h: np.ndarray, k: int) -> np.ndarray:
    """Where the runs of hashes ``h`` start among K real weights: ``(h * starts) >> 32``
    (:func:`run_starts`)."""
    return (h * np.uint64(run_starts(k))) >> np.uint64(32)


def _run_positions(shape: tuple[int, ...], k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The run layout's buckets and signs. The weight is taken as rows (its first axis) over
    the flattened rest; the element at (row r, column c) is lane ``r % 16`` of the run
    ``(r // 16) * columns + c``, whose ``mix32`` hash ``h`` gives the bucket
    ``(run_start(h) + lane) % K`` and the sign bit ``(h >> lane) & 1``."""
    rows = shape[0]
    columns = int(np.prod(shape[1:], dtype=np.int64))
    groups = -(-rows // RUN)
    h = mix32(groups * columns, seed).reshape(groups, 1, columns)
    lane = np.arange(RUN, dtype=np.uint64).reshape(1, RUN, 1)
    bucket = (run_start(h, k) + lane) % np.uint64(k)
    bit = (h >> lane) & np.uint64(1)
    return _tensors(
        bucket.reshape(groups * RUN, columns)[:rows], bit.reshape(groups * RUN, columns)[:rows],
        shape,
    )


def _tensors(
    bucket: np.ndarray, bit: np.ndarray, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    sign = 1.0 - 2.0 * bit.astype(np.float32)
    index = torch.from_numpy(bucket.astype(np.int64).reshape(shape))
    return index, torch.from_numpy(sign.astype(np.float32).reshape(shape))


# --- The same hashes as TVM expressions (one lane or 16) ------------------------------------


def mixed(position: Any, key: int, then: Callable[[Any], Any]) -> Any:
    """``then(h)`` for ``h`` the TVM expression of :func:`mix32` of the int32 ``position``
    (one lane or many), each stage bound once."""
    from autoshrink.compiler.kernels import bound, constant, multiply32, typed

    def mixed(h: Any, factor: int, shift: int) -> Any:
        return multiply32(h ^ (h >> constant(h, shift, "uint32")), factor)

    def finish(h: Any) -> Any:
        return bound(h ^ (h >> constant(h, _SHIFTS[2], "uint32")), then)

    start = position.astype(typed(position, "uint32")) ^ constant(position, key, "uint32")
    first, second = _FMIX
    return bound(
        mixed(start, first, _SHIFTS[0]),
        lambda h: bound(mixed(h, second, _SHIFTS[1]), finish),
    )


def signed(value: Any, bit: Any) -> Any:
    """The float32 ``value`` with its sign flipped where the lowest bit of the uint32 ``bit``
    is set."""
    from tvm import tirx

    from autoshrink.compiler.kernels import constant, typed

    # (the lanes are counted on ``bit``: ``value`` may be a TE tensor's element, not typed)
    flipped = tirx.reinterpret(typed(bit, "uint32"), value) ^ (bit << constant(bit, 31, "uint32"))
    return tirx.reinterpret(typed(bit, "float32"), flipped)


def scaled(h: Any, k: int) -> Any:
    """``(h * k) >> 32`` as int32, for a uint32 ``h``: a bucket among ``k``."""
    from autoshrink.compiler.kernels import constant, typed

    wide = h.astype(typed(h, "uint64")) * constant(h, k, "uint64")
    return (wide >> constant(h, 32, "uint64")).astype(typed(h, "int32"))


def hashed_weight(index: Any, key: int, k: int, shared: Callable[[Any], Any]) -> Any:
    """The TVM expression of the weights at flat positions ``index`` (int32, one lane or
    many): ``shared[(h * k) >> 32]`` with its sign bit flipped where ``h``'s lowest bit is
    set, ``h`` being :func:`mix32` of the position."""
    return mixed(index, key, lambda h: signed(shared(scaled(h, k)), h))


def run_weight(index: Any, key: int, k: int, columns: int, shared: Callable[[Any], Any]) -> Any:
    """The TVM expression of the weights at flat positions ``index`` in the run layout (see
    :func:`hashed_positions`): lane ``row % 16`` of the run of ``(row // 16, column)``."""
    from autoshrink.compiler.kernels import constant, typed

    row = index // constant(index, columns, "int32")
    lane = row % constant(index, RUN, "int32")
    run = (row // constant(index, RUN, "int32")) * constant(index, columns, "int32") + (
        index % constant(index, columns, "int32")
    )
    def weight(h: Any) -> Any:
        bucket = (scaled(h, run_starts(k)) + lane) % constant(index, k, "int32")
        return signed(shared(bucket), h >> lane.astype(typed(h, "uint32")))

    return mixed(run, key, weight)


def run_column(h: Any, k: int, shared: Callable[[Any], Any]) -> Any:
    """The 16 weights of the run whose scalar uint32 hash is ``h`` (K at least 16): one
    contiguous read of the K values from the run's start, lane ``l`` signed by bit ``l``."""
    from tvm import tirx

    values = shared(tirx.Ramp(scaled(h, run_starts(k)), 1, RUN))
    # lane l tests bit l: the 16 bits become one mask register and the signs one masked xor
    one = tirx.const(1, "uint32")
    bits = tirx.Broadcast(one, RUN) << tirx.Ramp(tirx.const(0, "uint32"), one, RUN)
    flip = (tirx.Broadcast(h, RUN) & bits) != tirx.Broadcast(tirx.const(0, "uint32"), RUN)
    return tirx.Select(flip, -values, values)
