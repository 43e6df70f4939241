"""Bit packing for plugins: store small unsigned integers in exactly ``bits`` bits each.

A value method that stores 3-bit cluster indices, or a structure method that stores a
1-bit mask, should not spend a whole byte per element. :func:`pack_bits` writes the values
one after another into a little-endian bit stream (bit 0 of the first value is bit 0 of the
first byte) and :func:`unpack_bits` reads them back. Both are vectorised with numpy and
exact for every count, including 0; the last byte is padded with zero bits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_BITS", "pack_bits", "packed_size", "unpack_bits"]

#: The widest value the functions pack (indices into a 65536-entry table).
MAX_BITS = 16


def _check_bits(bits: int) -> int:
    # bool is an int subclass; a width of True would be a silent mistake.
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise TypeError(f"bits must be an int, not {type(bits).__name__}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
    return int(bits)


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take once packed: ``ceil(count*bits/8)``."""
    bits = _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    return (int(count) * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``0 <= v < 2**bits`` into a 1-D ``uint8`` array.

    ``values`` may have any shape (it is read in C order) and any integer or bool dtype.
    The result has exactly ``ceil(values.size * bits / 8)`` bytes; bits are written
    least-significant first, so the stream does not depend on the machine's byte order.

    Raises ``ValueError`` for a width outside 1..16 or a value that does not fit in it,
    ``TypeError`` for a non-integer dtype.
    """
    bits = _check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    if flat.dtype != np.bool_ and not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"values must be integers, not {flat.dtype}")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to fit in {bits} bits")
    if bits == 1:
        # The common case (masks) needs no bit-plane expansion.
        return np.packbits(flat.astype(np.uint8), bitorder="little")
    # One row per value, one column per bit (least significant first), then the rows are
    # concatenated into a single bit stream: value i occupies bits i*bits .. i*bits+bits-1.
    shifts = np.arange(bits, dtype=np.uint32)
    planes = (flat.astype(np.uint32)[:, None] >> shifts) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` values of ``bits`` bits stored by :func:`pack_bits`, as a 1-D array.

    The dtype is ``uint8`` for widths up to 8 and ``uint16`` above. Bytes after the first
    ``ceil(count*bits/8)`` are ignored (a caller that needs an exact length checks
    :func:`packed_size` itself). Raises ``ValueError`` when ``packed`` is too short.
    """
    bits = _check_bits(bits)
    need = packed_size(count, bits)
    stream = np.asarray(packed)
    if stream.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, not {stream.dtype}")
    stream = stream.reshape(-1)
    if stream.size < need:
        raise ValueError(
            f"{count} values of {bits} bits need {need} packed bytes, got {stream.size}"
        )
    dtype = np.uint8 if bits <= 8 else np.uint16
    planes = np.unpackbits(stream[:need], count=int(count) * bits, bitorder="little")
    if bits == 1:
        return planes.astype(dtype)
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    # A matrix product sums each row's set bits times their place value.
    return (planes.reshape(int(count), bits).astype(np.uint32) @ weights).astype(dtype)
