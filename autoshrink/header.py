"""The artifact's header: what an artifact file says about itself, and reading it safely.

A file is a safetensors file with one ``uint8`` tensor holding every stored stream back to back
(format 2) and, in the metadata entry ``autoshrink.z``, base85 text of the raw-DEFLATE
compressed JSON :class:`Header`: the task, student width, plan, versions, the distribution of
each method, each layer's method metadata, each stream's dtype, shape, coding and length, and
a SHA-256 of the streams. Format 1 (a tensor per stream, the header as plain JSON under
``autoshrink``) still reads. Reading checks sizes, nesting and the checksum before anything
is built from a file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

from autoshrink.errors import ArtifactError
from autoshrink.plan import Plan

__all__ = [
    "Header", "LayerInfo", "PayloadInfo", "Stream", "digest", "header_json", "header_metadata",
    "read_header",
]

FORMAT = "autoshrink-artifact"
#: 2: one packed tensor and a compressed header; 1 (still read): a tensor per stream and the
#: header as plain JSON.
VERSION = 2
#: The safetensors metadata keys of the header: base85 text of its raw-DEFLATE-compressed
#: JSON (format 2), or the JSON itself (format 1).
HEADER_KEY, PLAIN_HEADER_KEY = "autoshrink.z", "autoshrink"
#: The one tensor of a format-2 file: every stream, back to back, in the header's order.
PACKED = "streams"
SUFFIX = ".safetensors"
#: Limits on the JSON header, checked before it is validated.
MAX_HEADER = 1 << 22
MAX_DEPTH = 32
DTYPES = {"float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "bool"}


class Stream(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal[
        "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "bool"
    ]
    shape: list[Annotated[int, Field(ge=0)]]
    coding: str | None = None
    #: Its length in the file's one packed tensor (format 2 on; format 1 stored each stream
    #: as a tensor of its own).
    bytes: int | None = Field(default=None, ge=0)


class PayloadInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[Annotated[int, Field(ge=0)]]
    meta: dict[str, Any]
    arrays: list[str]


class LayerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    meta: dict[str, Any]
    payloads: dict[str, PayloadInfo]
    arrays: list[str]


class Header(BaseModel):
    """The JSON header of an artifact (validated on every read)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["autoshrink-artifact"]
    version: int
    task: str
    width: float
    plan: Plan
    versions: dict[str, str]
    #: Each method the plan uses -> the distribution that provided it, as a requirement
    #: (``autoshrink-ternary==0.1.0``): reading refuses a third-party method of another
    #: version. Files written before it have none.
    methods: dict[str, str] = {}
    layers: dict[str, LayerInfo]
    state: list[str]
    streams: dict[str, Stream]
    sha256: str
    info: dict[str, Any] = {}


def digest(blobs: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(blobs):
        digest.update(name.encode() + b"\0" + len(blobs[name]).to_bytes(8, "little"))
        digest.update(blobs[name])
    return digest.hexdigest()


def header_metadata(raw: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata holding header ``raw`` (its fields as JSON values): the
    compact JSON, raw-DEFLATE compressed, as base85 text. Defaults are left out by the
    writer; field names stay whole, so the decompressed header describes itself."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    text = json.dumps(raw, separators=(",", ":")).encode()
    return {HEADER_KEY: base64.b85encode(packer.compress(text) + packer.flush()).decode()}


def header_json(metadata: dict[str, str]) -> Any:
    """The header JSON in an artifact's metadata (either format), decoded within
    :data:`MAX_HEADER` bytes and :data:`MAX_DEPTH` levels; ValueError otherwise."""
    if HEADER_KEY in metadata:
        text = metadata[HEADER_KEY]
        if len(text) > MAX_HEADER:
            raise ValueError(f"its header is over {MAX_HEADER:,} bytes")
        unpacker = zlib.decompressobj(-15)
        try:
            data = unpacker.decompress(base64.b85decode(text), MAX_HEADER + 1)
        except zlib.error as exc:
            raise ValueError(f"its header does not decompress ({exc})") from None
        if len(data) > MAX_HEADER or not unpacker.eof or unpacker.unused_data:
            raise ValueError("its header is over the size limit or cut short")
    elif PLAIN_HEADER_KEY in metadata:
        data = metadata[PLAIN_HEADER_KEY].encode()
        if len(data) > MAX_HEADER:
            raise ValueError(f"its header is over {MAX_HEADER:,} bytes")
    else:
        raise ValueError("it has no autoshrink header")
    try:
        raw = json.loads(data)
    except RecursionError:
        raise ValueError("its header is nested too deeply") from None
    if _depth(raw) > MAX_DEPTH:
        raise ValueError(f"its header is nested over {MAX_DEPTH} levels deep")
    return raw


def _unpack(header: Header, tensors: dict[str, bytes]) -> dict[str, bytes]:
    """The streams of a file, by name, from its tensors (one packed tensor in format 2)."""
    if header.version == 1:
        return tensors
    if set(tensors) != {PACKED}:
        raise ValueError(f"format 2 holds one tensor `{PACKED}`, not {len(tensors)}")
    packed, blobs, at = tensors[PACKED], {}, 0
    for key, stream in header.streams.items():
        if stream.bytes is None or at + stream.bytes > len(packed):
            raise ValueError(f"stream `{key}` has no length or runs past the data")
        blobs[key], at = packed[at : at + stream.bytes], at + stream.bytes
    if at != len(packed):
        raise ValueError(f"its streams take {at:,} bytes, its data {len(packed):,}")
    return blobs


def read_header(path: Path) -> tuple[Header, dict[str, bytes]]:
    """The validated header and raw streams of an artifact file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    problem = f"{path} is not a valid autoshrink artifact"
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                if handle.get_slice(key).get_dtype() != "U8":
                    raise ArtifactError(
                        f"{problem}: tensor `{key[:80]}` is not a byte stream "
                        f"({handle.get_slice(key).get_dtype()})"
                    )
            tensors = {key: handle.get_tensor(key).tobytes() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{problem} (truncated or corrupt safetensors file: {exc})") from exc
    try:
        header = Header.model_validate(header_json(metadata))
    except (ValueError, ValidationError) as exc:
        raise ArtifactError(
            f"{problem}: its header is corrupt ({str(exc).splitlines()[0]})"
        ) from exc
    if header.version not in (1, VERSION):
        raise ArtifactError(f"{problem}: format version {header.version}, expected {VERSION}")
    try:
        blobs = _unpack(header, tensors)
    except ValueError as exc:
        raise ArtifactError(f"{problem}: {exc}") from exc
    if set(blobs) != set(header.streams) or digest(blobs) != header.sha256:
        raise ArtifactError(f"{problem}: its data does not match its checksum (corrupt file)")
    return header, blobs


def _depth(value: Any) -> int:
    """How deeply JSON ``value`` nests (without recursion: a hostile header may be deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else ()
        todo.extend((child, depth + 1) for child in children)
    return deepest
