"""`entropy`: lossless coding of an artifact's byte streams (the encoding stage).

Three codecs, chosen by the ``codec`` knob:

- ``huffman``: canonical Huffman coding over byte symbols, as Deep Compression (Han et al.,
  2016) applies to quantized weights and sparse indices (:mod:`.huffman`, which also
  describes its body).
- ``lzma`` and ``zlib``: the standard library's LZMA2 and DEFLATE, as raw streams without
  their own containers (this frame already holds the length and a checksum).

Every coded stream is self-describing, so :meth:`Entropy.decode` ignores its config::

    tag (1 byte: codec) | original length (LEB128 varint) | CRC-32 of the original (4 bytes LE)
    | body

Decoding validates everything it reads and raises ValueError on truncated or corrupt input;
the CRC catches corruption that still parses.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable
from typing import Literal, Protocol

from pydantic import Field

from autoshrink import hookimpl
from autoshrink.methods import EncodingMethod, Method, MethodConfig
from autoshrink_plugins.huffman import huffman_decode, huffman_encode

__all__ = ["Entropy", "EntropyConfig"]

_TAGS: dict[str, int] = {"huffman": 0, "lzma": 1, "zlib": 2}
_CODECS = {tag: codec for codec, tag in _TAGS.items()}


class EntropyConfig(MethodConfig):
    codec: Literal["huffman", "lzma", "zlib"] = Field(
        "huffman", description="canonical Huffman over bytes, or LZMA2, or DEFLATE"
    )


class Entropy(EncodingMethod):
    """Canonical Huffman (Deep Compression), LZMA or DEFLATE over each byte stream."""

    name = "entropy"
    summary = "lossless entropy coding of the artifact's streams (huffman, lzma or zlib)"
    Config = EntropyConfig

    def encode(self, data: bytes, config: EntropyConfig) -> bytes:
        data = bytes(data)
        codec = config.codec
        head = bytes([_TAGS[codec]]) + _varint(len(data))
        head += zlib.crc32(data).to_bytes(4, "little")
        if not data:
            return head
        if codec == "huffman":
            return head + huffman_encode(data)
        if codec == "lzma":
            filters = _lzma_filters(len(data))
            return head + lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
        # Raw DEFLATE: the zlib container's header and Adler-32 would repeat this frame's.
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        return head + packer.compress(data) + packer.flush()

    def decode(self, data: bytes, config: EntropyConfig, limit: int | None = None) -> bytes:
        data = bytes(data)
        if not data:
            raise ValueError("empty entropy stream (even empty data codes to a header)")
        codec = _CODECS.get(data[0])
        if codec is None:
            raise ValueError(f"unknown entropy codec tag {data[0]}")
        length, at = _read_varint(data, 1)
        if limit is not None and length > limit:
            raise ValueError(
                f"entropy stream claims {length:,} bytes; its dtype and shape hold {limit:,}"
            )
        if at + 4 > len(data):
            raise ValueError("entropy stream truncated in its header")
        crc = int.from_bytes(data[at : at + 4], "little")
        body = data[at + 4 :]
        if length == 0:
            if body:
                raise ValueError("entropy stream of empty data has trailing bytes")
            out = b""
        elif codec == "huffman":
            out = huffman_decode(body, length)
        elif codec == "lzma":
            unpacker = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_lzma_filters(length))
            out = _inflate(unpacker, body, length, lzma.LZMAError)
        else:
            out = _inflate(zlib.decompressobj(-15), body, length, zlib.error)
        if zlib.crc32(out) != crc:
            raise ValueError(f"{codec} stream is corrupt (checksum mismatch)")
        return out


# --- framing helpers -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    """LEB128: lengths below 128 take one byte, which matters for the many small streams."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at ``data[at:]`` and the offset after it."""
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("entropy stream truncated in its length")
        if shift > 42:
            raise ValueError("entropy stream length is implausibly large (over 2**49 bytes)")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _lzma_filters(length: int) -> list[dict[str, int]]:
    """LZMA2 at preset 6 with a dictionary no larger than the data: initialising the full
    8 MiB dictionary costs more than coding a small stream. Both sides derive it from the
    stored length, so it need not be stored; it is capped, so a hostile length cannot make
    the decoder allocate more."""
    dict_size = min(max(1 << 12, 1 << max(length - 1, 1).bit_length()), 1 << 23)
    return [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size}]


class _Decompressor(Protocol):
    """What ``lzma.LZMADecompressor`` and ``zlib.decompressobj()`` have in common."""

    eof: bool
    unused_data: bytes

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _inflate(unpacker: _Decompressor, body: bytes, length: int, error: type[Exception]) -> bytes:
    """Decompress exactly ``length`` bytes; ``max_length`` stops a stream that would inflate
    beyond what its header promised before it can use up memory."""
    try:
        out = unpacker.decompress(body, length + 1)
    except error as exc:
        raise ValueError(f"compressed stream is corrupt: {exc}") from exc
    if len(out) != length or not unpacker.eof or unpacker.unused_data:
        raise ValueError(f"compressed stream is truncated or corrupt ({len(out)}/{length} bytes)")
    return out


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Entropy())
