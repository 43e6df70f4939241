"""Canonical Huffman coding over byte symbols: the ``huffman`` codec of :mod:`.entropy`, as Deep
Compression (Han et al., 2016) applies to quantized weights and sparse indices. Code lengths
are limited to :data:`MAX_CODE_BITS` bits (package-merge when plain Huffman would be deeper),
which keeps the decoder's lookup table small.

The Huffman body is a compact table of the used symbols and their code lengths followed by
the bit stream (most significant bit first, zero-padded to a whole byte)::

    k - 1 (1 byte) | symbols: k bytes if k <= 32, else a 256-bit bitmap (32 bytes)
    | code length - 1 of each symbol in ascending symbol order (4 bits each, high nibble
      first) | bits

Every symbol takes at least one bit, so a Huffman body never decodes to more than eight times
its size: a hostile stream cannot make the decoder allocate without bound. Decoding
validates everything it reads and raises ValueError on truncated or corrupt input (the
entropy frame's CRC catches corruption that still parses).
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["MAX_CODE_BITS", "huffman_code_lengths", "huffman_decode", "huffman_encode"]

#: Longest Huffman code; 16 bits bounds the decoder's table at 2**16 entries.
MAX_CODE_BITS = 16
#: Symbols listed one byte each up to this many; beyond it a 32-byte bitmap is smaller.
_LIST_MAX = 32
#: Symbols the encoder handles per vectorised pass, which bounds its temporary memory.
_CHUNK = 1 << 20
#: Streams shorter than this do not repay building the full 2**16-entry decode table.
_SMALL_STREAM = 1 << 14
#: Bits "consumed" by an invalid table entry: far past any stream, so decoding stops there.
_INVALID = 1 << 62


# --- Huffman code construction ---------------------------------------------------------------


def huffman_code_lengths(counts: np.ndarray, limit: int = MAX_CODE_BITS) -> np.ndarray:
    """Optimal prefix-code lengths (at most ``limit`` bits) for symbols with these counts.

    Symbols with count 0 get length 0. A single used symbol gets one bit (a code must take
    some space). Plain Huffman is tried first since it is cheap; only when its deepest code
    exceeds ``limit`` does package-merge find the optimal code under the limit.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    if len(used) > 1 << limit:
        raise ValueError(f"{len(used)} symbols cannot have codes of at most {limit} bits")
    weights = [int(counts[s]) for s in used]
    found = _huffman_lengths(weights)
    if max(found) > limit:
        found = _package_merge_lengths(weights, limit)
    lengths[used] = found
    return lengths


def _huffman_lengths(weights: list[int]) -> list[int]:
    """Huffman's algorithm; each merge deepens every symbol below it by one bit."""
    depth = [0] * len(weights)
    # The running index breaks ties deterministically, so equal data gives equal bytes.
    heap = [(w, i, [i]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        w1, _, left = heapq.heappop(heap)
        w2, _, right = heapq.heappop(heap)
        for s in left + right:
            depth[s] += 1
        heapq.heappush(heap, (w1 + w2, order, left + right))
        order += 1
    return depth


def _package_merge_lengths(weights: list[int], limit: int) -> list[int]:
    """Package-merge (Larmore and Hirschberg 1990): optimal lengths of at most ``limit``.

    Each item is (weight, how often each symbol occurs in it); a symbol's code length is the
    number of times it occurs among the 2n - 2 lightest items of the final list.
    """
    n = len(weights)
    eye = np.eye(n, dtype=np.int64)
    leaves = sorted(((w, i) for i, w in enumerate(weights)))
    leaf_items = [(w, eye[i]) for w, i in leaves]
    items = list(leaf_items)
    for _ in range(limit - 1):
        packages = [
            (items[j][0] + items[j + 1][0], items[j][1] + items[j + 1][1])
            for j in range(0, len(items) - 1, 2)
        ]
        items = list(heapq.merge(leaf_items, packages, key=lambda item: item[0]))
    total = np.sum([vector for _, vector in items[: 2 * n - 2]], axis=0)
    return [int(x) for x in total]


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes: symbols sorted by (length, symbol) take consecutive code values, so
    the lengths alone define the code and are all the header has to store."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]
    code = 0
    previous = int(lengths[order[0]])
    for symbol in order:
        length = int(lengths[symbol])
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


# --- Huffman encode --------------------------------------------------------------------------


def huffman_encode(data: bytes) -> bytes:
    symbols = np.frombuffer(data, dtype=np.uint8)
    counts = np.bincount(symbols, minlength=256)
    lengths = huffman_code_lengths(counts)
    used = np.flatnonzero(lengths)
    table = bytearray([len(used) - 1])
    if len(used) <= _LIST_MAX:
        table += used.astype(np.uint8).tobytes()
    else:
        bitmap = np.zeros(256, dtype=np.uint8)
        bitmap[used] = 1
        table += np.packbits(bitmap).tobytes()
    nibbles = (lengths[used] - 1).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    table += (nibbles[0::2] << 4 | nibbles[1::2]).astype(np.uint8).tobytes()
    return bytes(table) + _pack_codes(symbols, lengths, _canonical_codes(lengths), counts)


def _pack_codes(
    symbols: np.ndarray, lengths: np.ndarray, codes: np.ndarray, counts: np.ndarray
) -> bytes:
    """The concatenated codes of ``symbols``, MSB first, without a per-bit Python loop.

    A code of at most 16 bits starting at bit offset 0..7 of a byte lies within three bytes,
    so each symbol contributes its code, shifted into a 24-bit window, to three consecutive
    output bytes. Codes never share a bit, so summing the contributions per byte (bincount)
    is the same as OR-ing them.
    """
    total_bits = int(np.dot(counts, lengths))
    out = np.zeros((total_bits + 7) // 8 + 3, dtype=np.uint8)
    lengths64, codes64 = lengths.astype(np.int64), codes.astype(np.int64)
    start = 0  # bit offset of the current chunk
    for first in range(0, len(symbols), _CHUNK):
        chunk = symbols[first : first + _CHUNK]
        size = lengths64[chunk]
        ends = np.cumsum(size) + start
        starts = ends - size
        window = codes64[chunk] << (24 - (starts & 7) - size)
        index = (starts >> 3) - (start >> 3)
        span = int(index[-1]) + 3
        base = start >> 3
        for shift, part in ((16, 0), (8, 1), (0, 2)):
            byte = (window >> shift) & 0xFF
            local = np.bincount(index + part, weights=byte, minlength=span)
            out[base : base + span] |= local.astype(np.uint8)
        start = int(ends[-1])
    return out[: (total_bits + 7) // 8].tobytes()


# --- Huffman decode --------------------------------------------------------------------------


def _read_table(body: bytes) -> tuple[np.ndarray, int]:
    """Code lengths of all 256 symbols from the table at the start of ``body``, and the
    offset where the bit stream begins. Rejects tables that are not a complete prefix code."""
    if not body:
        raise ValueError("huffman stream truncated before its symbol table")
    count = body[0] + 1
    at = 1
    if count <= _LIST_MAX:
        listed = np.frombuffer(body[at : at + count], dtype=np.uint8)
        if len(listed) != count:
            raise ValueError("huffman stream truncated in its symbol table")
        if np.any(np.diff(listed.astype(np.int64)) <= 0):
            raise ValueError("huffman symbol table is not strictly ascending")
        used = listed.astype(np.int64)
        at += count
    else:
        bitmap = np.frombuffer(body[at : at + 32], dtype=np.uint8)
        if len(bitmap) != 32:
            raise ValueError("huffman stream truncated in its symbol bitmap")
        used = np.flatnonzero(np.unpackbits(bitmap))
        if len(used) != count:
            raise ValueError(f"huffman bitmap lists {len(used)} symbols, header says {count}")
        at += 32
    packed = np.frombuffer(body[at : at + (count + 1) // 2], dtype=np.uint8)
    if len(packed) != (count + 1) // 2:
        raise ValueError("huffman stream truncated in its code lengths")
    at += len(packed)
    nibbles = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)
    if count % 2 and nibbles[-1]:
        raise ValueError("huffman code-length padding is not zero")
    lengths = np.zeros(256, dtype=np.int64)
    lengths[used] = nibbles[:count].astype(np.int64) + 1
    # Kraft sum in units of 2**-16: a complete code sums to exactly 1 (a lone symbol: 1/2).
    kraft = int(np.sum(1 << (MAX_CODE_BITS - lengths[used])))
    if kraft != (1 << (MAX_CODE_BITS - 1) if count == 1 else 1 << MAX_CODE_BITS):
        raise ValueError("huffman code lengths do not form a complete prefix code")
    if count == 1 and lengths[used[0]] != 1:
        raise ValueError("a lone huffman symbol must have a one-bit code")
    return lengths, at


def _decode_tables(lengths: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For every ``bits``-bit window: the symbol whose code starts it and that code's length
    (0 where no code starts it: only possible for the lone-symbol code)."""
    codes = _canonical_codes(lengths)
    symbol = np.zeros(1 << bits, dtype=np.uint8)
    size = np.zeros(1 << bits, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        length = int(lengths[s])
        low = int(codes[s]) << (bits - length)
        high = (int(codes[s]) + 1) << (bits - length)
        symbol[low:high] = s
        size[low:high] = length
    return symbol, size


def _multi_tables(
    symbol: np.ndarray, size: np.ndarray, bits: int
) -> tuple[list[bytes], list[int], list[int]]:
    """For every ``bits``-bit window: all the whole codes it holds, their total bits and
    count. One lookup then decodes several short codes at once, which is what makes the
    interpreted decode loop fast on skewed data (many one- and two-bit codes)."""
    windows = np.arange(1 << bits, dtype=np.int64)
    mask = (1 << bits) - 1
    consumed = np.zeros(1 << bits, dtype=np.int64)
    count = np.zeros(1 << bits, dtype=np.int64)
    active = np.ones(1 << bits, dtype=bool)
    decoded = np.zeros((1 << bits, bits), dtype=np.uint8)
    for j in range(bits):
        # Bits shifted in from the right are zeros, not stream bits, so a code is taken only
        # if it ends within the window.
        prefix = (windows << consumed) & mask
        length = size[prefix]
        take = active & (length > 0) & (consumed + length <= bits)
        decoded[take, j] = symbol[prefix[take]]
        consumed[take] += length[take]
        count[take] += 1
        active &= take
    consumed[count == 0] = _INVALID
    flat = decoded.tobytes()
    counts = count.tolist()
    chunks = [flat[i * bits : i * bits + c] for i, c in enumerate(counts)]
    return chunks, consumed.tolist(), counts


def huffman_decode(body: bytes, length: int) -> bytes:
    lengths, at = _read_table(body)
    stream = body[at:]
    limit = 8 * len(stream)
    if length > limit:
        # Every code takes at least one bit.
        raise ValueError(f"huffman stream truncated: {limit} bits cannot hold {length} symbols")
    longest = int(lengths.max())
    # Long streams repay a full 16-bit multi-symbol table; short ones use the smallest table
    # that still fits every code.
    bits = MAX_CODE_BITS if length >= _SMALL_STREAM else max(longest, 8)
    symbol, size = _decode_tables(lengths, bits)
    chunks, advance, produces = _multi_tables(symbol, size, bits)
    # 24-bit big-endian window at every byte; zero bytes appended so reads near the end (and
    # up to one window past it, which the checks below then reject) stay in bounds.
    padded = np.frombuffer(stream + bytes(4), dtype=np.uint8).astype(np.int64)
    window = ((padded[:-2] << 16) | (padded[1:-1] << 8) | padded[2:]).tolist()
    mask = (1 << bits) - 1
    top = 24 - bits
    out: list[bytes] = []
    append = out.append
    pos = produced = 0
    # Main loop: one lookup may yield up to ``bits`` symbols, so stop while that many remain.
    # ``pos <= limit`` keeps every read in bounds; invalid windows jump far past it.
    while length - produced > bits and pos <= limit:
        w = (window[pos >> 3] >> (top - (pos & 7))) & mask
        append(chunks[w])
        pos += advance[w]
        produced += produces[w]
    # Tail: one symbol at a time, so decoding stops exactly after ``length`` symbols.
    single_symbol = symbol.tolist()
    single_size = [s if s else _INVALID for s in size.tolist()]
    tail = bytearray()
    while produced < length and pos <= limit:
        w = (window[pos >> 3] >> (top - (pos & 7))) & mask
        tail.append(single_symbol[w])
        pos += single_size[w]
        produced += 1
    if pos > limit:
        raise ValueError("huffman stream is truncated or corrupt (ran past its end)")
    if len(stream) != (pos + 7) // 8:
        raise ValueError("huffman stream has trailing bytes")
    if pos % 8 and stream[-1] & ((1 << (8 - pos % 8)) - 1):
        raise ValueError("huffman stream padding is not zero")
    append(bytes(tail))
    return b"".join(out)
