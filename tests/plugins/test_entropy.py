"""The `entropy` encoding method: conformance kit per codec, plus property tests."""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoshrink.methods import MethodConfig
from autoshrink.testing import EncodingMethodTests
from autoshrink_plugins.entropy import Entropy, _varint
from autoshrink_plugins.huffman import (
    MAX_CODE_BITS,
    _huffman_lengths,
    _package_merge_lengths,
    huffman_code_lengths,
)

CODECS = ("huffman", "lzma", "zlib")


class _DefaultCodec(Entropy):
    """Test-only: `entropy` whose default codec is ``codec``, so the kit (which calls
    ``method.config()``) exercises each codec. Explicit values still override it."""

    def __init__(self, codec: str) -> None:
        self.codec = codec

    def config(self, values: dict[str, Any] | None = None) -> MethodConfig:
        return super().config({"codec": self.codec, **(values or {})})


class TestHuffman(EncodingMethodTests):
    method = _DefaultCodec("huffman")


class TestLzma(EncodingMethodTests):
    method = _DefaultCodec("lzma")


class TestZlib(EncodingMethodTests):
    method = _DefaultCodec("zlib")


METHOD = Entropy()
HUFFMAN = METHOD.config({"codec": "huffman"})


@st.composite
def skewed_streams(draw: st.DrawFn) -> bytes:
    """Byte streams over a random alphabet with a random, often very skewed distribution
    (geometric decay of random steepness, like quantized weights or sparse indices)."""
    alphabet = draw(st.integers(1, 256))
    steepness = draw(st.floats(0.0, 3.0))
    size = draw(st.integers(0, 5000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p = np.exp(-steepness * np.arange(alphabet))
    symbols = rng.permutation(256)[:alphabet]  # which byte values, not always the low ones
    return rng.choice(symbols, size, p=p / p.sum()).astype(np.uint8).tobytes()


@pytest.mark.parametrize("codec", CODECS)
@settings(deadline=None)
@given(data=st.binary(max_size=5000))
def test_roundtrips_arbitrary_bytes(codec: str, data: bytes) -> None:
    config = METHOD.config({"codec": codec})
    assert METHOD.decode(METHOD.encode(data, config), config) == data


@pytest.mark.parametrize("codec", CODECS)
@settings(deadline=None)
@given(data=skewed_streams())
def test_roundtrips_skewed_streams(codec: str, data: bytes) -> None:
    config = METHOD.config({"codec": codec})
    coded = METHOD.encode(data, config)
    # Decoding is self-describing: the config passed to decode does not matter.
    assert METHOD.decode(coded, METHOD.config({"codec": "zlib"})) == data


@pytest.mark.parametrize("codec", CODECS)
@settings(deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_raises(codec: str, data: bytes, cut: float) -> None:
    config = METHOD.config({"codec": codec})
    coded = METHOD.encode(data, config)
    with pytest.raises(ValueError):
        METHOD.decode(coded[: int(cut * len(coded))], config)


@settings(deadline=None)
@given(data=skewed_streams(), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_skewed_huffman_raises(data: bytes, cut: float) -> None:
    coded = METHOD.encode(data, HUFFMAN)
    with pytest.raises(ValueError):
        METHOD.decode(coded[: int(cut * len(coded))], HUFFMAN)


@settings(deadline=None)
@given(
    data=skewed_streams().filter(bool),
    where=st.floats(0.0, 1.0, exclude_max=True),
    flip=st.integers(1, 255),
)
def test_corrupt_huffman_raises(data: bytes, where: float, flip: int) -> None:
    coded = bytearray(METHOD.encode(data, HUFFMAN))
    coded[int(where * len(coded))] ^= flip
    with pytest.raises(ValueError):
        METHOD.decode(bytes(coded), HUFFMAN)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tag=st.sampled_from([0, 1, 2, 3, 255]), rest=st.binary(max_size=300))
def test_garbage_raises_only_value_error(tag: int, rest: bytes) -> None:
    # Arbitrary input must either decode or fail with ValueError: no other exception, no hang.
    try:
        METHOD.decode(bytes([tag]) + rest, HUFFMAN)
    except ValueError:
        pass


def test_empty_and_bad_frames() -> None:
    for codec in CODECS:
        config = METHOD.config({"codec": codec})
        assert METHOD.decode(METHOD.encode(b"", config), config) == b""
    with pytest.raises(ValueError):
        METHOD.decode(b"", HUFFMAN)
    with pytest.raises(ValueError):
        METHOD.decode(b"\x07" + METHOD.encode(b"abc", HUFFMAN)[1:], HUFFMAN)
    with pytest.raises(ValueError):  # trailing bytes after a complete stream
        METHOD.decode(METHOD.encode(b"abcabc", HUFFMAN) + b"\x00", HUFFMAN)


def test_rejects_incomplete_code_table() -> None:
    # Two symbols with 2-bit codes: Kraft sum 1/2, which no encoder writes.
    data = b"ab"
    head = bytes([0]) + _varint(len(data)) + zlib.crc32(data).to_bytes(4, "little")
    table = bytes([1]) + b"ab" + bytes([0x11])
    with pytest.raises(ValueError, match="complete prefix code"):
        METHOD.decode(head + table + b"\x20", HUFFMAN)


def _huffman_header_bytes(data: bytes) -> int:
    """Bytes of the frame and symbol table in front of the bit stream (see the module doc)."""
    used = len(set(data))
    return 1 + len(_varint(len(data))) + 4 + 1 + min(used, 32) + (used + 1) // 2


@settings(deadline=None)
@given(data=skewed_streams().filter(bool))
def test_huffman_within_one_bit_of_entropy(data: bytes) -> None:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    entropy = float(-(p * np.log2(p)).sum())
    coded = METHOD.encode(data, HUFFMAN)
    stream_bits = 8 * (len(coded) - _huffman_header_bytes(data))
    # Huffman (even length-limited at 16 bits: the Shannon code, within H + 1, already fits
    # that limit for streams under 2**16 symbols) codes under H + 1 bits a symbol; the last
    # byte adds up to 7 bits of padding.
    assert stream_bits <= len(data) * (entropy + 1) + 7 + 1e-6


@settings(deadline=None)
@given(weights=st.lists(st.integers(1, 10**6), min_size=2, max_size=256))
def test_package_merge_is_optimal(weights: list[int]) -> None:
    huffman = _huffman_lengths(weights)
    merged = _package_merge_lengths(weights, MAX_CODE_BITS)
    # Same cost as unrestricted Huffman whenever the limit does not bind, and a complete code.
    cost = sum(w * n for w, n in zip(weights, merged, strict=True))
    if max(huffman) <= MAX_CODE_BITS:
        assert cost == sum(w * n for w, n in zip(weights, huffman, strict=True))
    assert max(merged) <= MAX_CODE_BITS
    assert sum(2.0 ** -n for n in merged) == 1.0


def test_length_limit_on_fibonacci_counts() -> None:
    # Fibonacci counts make plain Huffman as deep as possible (29 bits for 30 symbols).
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    assert max(_huffman_lengths(fib)) > MAX_CODE_BITS
    counts = np.zeros(256, dtype=np.int64)
    counts[:30] = fib
    lengths = huffman_code_lengths(counts)
    assert lengths.max() == MAX_CODE_BITS and math.isclose(sum(2.0 ** -lengths[:30]), 1.0)
    data = np.repeat(np.arange(30, dtype=np.uint8), fib[:30])
    np.random.default_rng(0).shuffle(data)
    raw = data[:200_000].tobytes()
    assert METHOD.decode(METHOD.encode(raw, HUFFMAN), HUFFMAN) == raw


def test_long_stream_uses_multi_symbol_path() -> None:
    # Long enough for the 16-bit multi-symbol table, with a stream length that is not a
    # multiple of anything convenient, so the single-symbol tail runs too.
    rng = np.random.default_rng(3)
    raw = rng.choice(5, 100_003, p=[0.7, 0.2, 0.05, 0.03, 0.02]).astype(np.uint8).tobytes()
    coded = METHOD.encode(raw, HUFFMAN)
    assert len(coded) < len(raw) / 4
    assert METHOD.decode(coded, HUFFMAN) == raw
