"""Bit packing: round trips for every width and count, exact packed lengths, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from autoshrink.packing import pack_bits, packed_size, unpack_bits


@st.composite
def bits_and_values(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    bits = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.uint64]))
    high = min((1 << bits) - 1, np.iinfo(dtype).max)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40))
    values = draw(hnp.arrays(dtype, shape, elements=st.integers(0, high)))
    return bits, values


@settings(max_examples=300, deadline=None)
@given(bits_and_values())
def test_roundtrip(case: tuple[int, np.ndarray]) -> None:
    bits, values = case
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == math.ceil(values.size * bits / 8) == packed_size(values.size, bits)
    restored = unpack_bits(packed, bits, values.size)
    assert restored.dtype == (np.uint8 if bits <= 8 else np.uint16)
    np.testing.assert_array_equal(restored, values.reshape(-1))


@settings(max_examples=100, deadline=None)
@given(bits_and_values(), st.binary(min_size=1, max_size=4))
def test_trailing_bytes_ignored_and_short_input_rejected(
    case: tuple[int, np.ndarray], extra: bytes
) -> None:
    bits, values = case
    packed = pack_bits(values, bits)
    longer = np.concatenate([packed, np.frombuffer(extra, dtype=np.uint8)])
    np.testing.assert_array_equal(unpack_bits(longer, bits, values.size), values.reshape(-1))
    if packed.size:
        with pytest.raises(ValueError):
            unpack_bits(packed[:-1], bits, values.size)


def test_bit_order_is_little_endian() -> None:
    # 1 then 2 in 3 bits: 001 then 010, least significant bit first -> 0b00010001.
    assert pack_bits(np.array([1, 2]), 3).tolist() == [0b00010001]
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool), 1).tolist() == [1, 1]
    assert pack_bits(np.array([0xABC]), 12).tolist() == [0xBC, 0x0A]


def test_empty() -> None:
    for bits in (1, 7, 16):
        packed = pack_bits(np.zeros(0, dtype=np.int64), bits)
        assert packed.size == 0
        assert unpack_bits(packed, bits, 0).size == 0


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_bad_width(bits: int) -> None:
    with pytest.raises(ValueError):
        pack_bits(np.zeros(3, dtype=np.uint8), bits)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(3, dtype=np.uint8), bits, 1)


def test_values_must_fit() -> None:
    with pytest.raises(ValueError):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 8)
    with pytest.raises(TypeError):
        pack_bits(np.array([0.5]), 8)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(1, dtype=np.uint8), 4, -1)
