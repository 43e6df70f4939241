"""Artifact: a compressed model as one safetensors file, with no pickle anywhere.

Layout: every stored array is one ``uint8`` tensor (its raw little-endian bytes, entropy coded
when the plan's encoding stage makes it smaller). The safetensors metadata entry
``autoshrink`` holds a JSON :class:`Header`: the task, student width, plan, versions, each
layer's method metadata, each stream's dtype, shape and coding, and a SHA-256 of the
streams. The artifact's size is the byte count of the file, header included.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save
from torch import nn

import autoshrink
from autoshrink.compress import replace_module
from autoshrink.errors import ArtifactError
from autoshrink.methods import EncodingMethod, LayerCode, Stage, StructureMethod, ValueMethod
from autoshrink.plan import Plan, compressible_layers
from autoshrink.tasks import Task

if TYPE_CHECKING:
    from autoshrink.plugins import Registry

__all__ = [
    "Artifact",
    "Header",
    "file_digest",
    "read_artifact",
    "read_header",
    "size_breakdown",
    "stream_array",
    "write_artifact",
]

FORMAT = "autoshrink-artifact"
VERSION = 1
SUFFIX = ".safetensors"
_DTYPES = {"float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "bool"}


class Stream(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal[
        "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "bool"
    ]
    shape: list[int]
    coding: str | None = None


class PayloadInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
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
    layers: dict[str, LayerInfo]
    state: list[str]
    streams: dict[str, Stream]
    sha256: str
    info: dict[str, Any] = {}


class Artifact(BaseModel):
    """A loaded artifact: its header, the file's byte count and the rebuilt model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path
    bytes: int
    header: Header
    model: nn.Module


def _digest(blobs: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(blobs):
        digest.update(name.encode() + b"\0" + len(blobs[name]).to_bytes(8, "little"))
        digest.update(blobs[name])
    return digest.hexdigest()


def write_artifact(
    path: Path,
    model: nn.Module,
    plan: Plan,
    task: Task,
    registry: Registry,
    *,
    width: float = 1.0,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> int:
    """Encode a model compressed by :func:`autoshrink.compress.compress` with ``plan`` into
    ``path`` and return the file's byte count. Refuses to overwrite unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} exists; choose another path or delete it first")
    layer_names = list(compressible_layers(task.build_model(width), registry))
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, LayerInfo] = {}
    for name in layer_names:
        choice = plan.layer(name)
        structure = registry.method(choice.structure.method, Stage.STRUCTURE)
        value = registry.method(choice.value.method, Stage.VALUE)
        assert isinstance(structure, StructureMethod) and isinstance(value, ValueMethod)
        code = structure.encode(
            model.get_submodule(name), structure.config(choice.structure.config)
        )
        value_config = value.config(choice.value.config)
        payloads = {}
        for payload, tensor in code.payloads.items():
            stored, meta = value.encode(tensor.detach(), value_config)
            for key, array in stored.items():
                arrays[f"{name}/{payload}/{key}"] = array
            payloads[payload] = PayloadInfo(
                shape=list(tensor.shape), meta=meta, arrays=list(stored)
            )
        for key, array in code.arrays.items():
            arrays[f"{name}/{key}"] = array
        layers[name] = LayerInfo(meta=code.meta, payloads=payloads, arrays=list(code.arrays))
    state = {
        key: tensor
        for key, tensor in model.state_dict().items()
        if not any(key.startswith(f"{name}.") for name in layer_names)
    }
    for key, tensor in state.items():
        arrays[f"state/{key}"] = tensor.detach().cpu().numpy()

    encoder = registry.method(plan.encoding.method, Stage.ENCODING) if plan.encoding else None
    blobs: dict[str, bytes] = {}
    streams: dict[str, Stream] = {}
    for key, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in _DTYPES:
            raise TypeError(f"stream `{key}` has unsupported dtype {array.dtype}")
        raw, coding = array.astype(array.dtype.newbyteorder("<")).tobytes(), None
        if encoder is not None and raw:
            assert isinstance(encoder, EncodingMethod) and plan.encoding is not None
            coded = encoder.encode(raw, encoder.config(plan.encoding.config))
            if len(coded) < len(raw):
                raw, coding = coded, encoder.name
        blobs[key] = raw
        streams[key] = Stream(dtype=array.dtype.name, shape=list(array.shape), coding=coding)
    header = Header(
        format=FORMAT,
        version=VERSION,
        task=task.name,
        width=width,
        plan=plan,
        versions={"autoshrink": autoshrink.__version__, "torch": torch.__version__},
        layers=layers,
        state=list(state),
        streams=streams,
        sha256=_digest(blobs),
        info=info or {},
    )
    tensors = {k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()}
    data = save(tensors, metadata={"autoshrink": header.model_dump_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path.stat().st_size


def read_header(path: Path) -> tuple[Header, dict[str, bytes]]:
    """The validated header and raw streams of an artifact file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    problem = f"{path} is not a valid autoshrink artifact"
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            blobs = {key: handle.get_tensor(key).tobytes() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{problem} (truncated or corrupt safetensors file: {exc})") from exc
    if "autoshrink" not in metadata:
        raise ArtifactError(f"{problem}: it has no autoshrink header")
    try:
        header = Header.model_validate(json.loads(metadata["autoshrink"]))
    except (ValueError, ValidationError) as exc:
        raise ArtifactError(
            f"{problem}: its header is corrupt ({str(exc).splitlines()[0]})"
        ) from exc
    if header.version != VERSION:
        raise ArtifactError(f"{problem}: format version {header.version}, expected {VERSION}")
    if set(blobs) != set(header.streams) or _digest(blobs) != header.sha256:
        raise ArtifactError(f"{problem}: its data does not match its checksum (corrupt file)")
    return header, blobs


def read_artifact(path: Path, registry: Registry, task: Task | None = None) -> Artifact:
    """Validate an artifact file and rebuild its model. A file from a stranger can at worst
    fail with ArtifactError: nothing in it is executed, and its task must be a registered one
    unless the caller passes ``task`` itself."""
    path = Path(path)
    header, blobs = read_header(path)
    if task is None:
        if header.task not in registry.tasks:
            raise ArtifactError(
                f"{path} was made for task `{header.task}`, which is not registered here; "
                "pass it with `--task` if you trust it"
            )
        task = registry.tasks[header.task]
    elif task.name != header.task:
        raise ArtifactError(f"{path} was made for task `{header.task}`, not `{task.name}`")
    try:
        model = _rebuild(header, blobs, task, registry)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{path} cannot be decoded: {exc}") from exc
    return Artifact(path=path, bytes=path.stat().st_size, header=header, model=model)


def stream_array(
    header: Header, blobs: dict[str, bytes], key: str, registry: Registry
) -> np.ndarray:
    """Stream `key` of an artifact as the array it stores (entropy coding undone)."""
    stream = header.streams.get(key)
    if stream is None:
        raise ValueError(f"stream `{key}` is missing")
    raw = blobs[key]
    if stream.coding is not None:
        encoder = registry.method(stream.coding, Stage.ENCODING)
        assert isinstance(encoder, EncodingMethod)
        config = header.plan.encoding.config if header.plan.encoding else {}
        raw = encoder.decode(raw, encoder.config(config))
    dtype = np.dtype(stream.dtype).newbyteorder("<")
    count = int(np.prod(stream.shape, dtype=np.int64))
    if count < 0 or len(raw) != count * dtype.itemsize:
        raise ValueError(
            f"stream `{key}` holds {len(raw)} bytes, expected {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(stream.shape)


def _rebuild(header: Header, blobs: dict[str, bytes], task: Task, registry: Registry) -> nn.Module:
    if not 0 < header.width <= 16:
        raise ValueError(f"width {header.width} out of range")
    template = task.build_model(header.width)
    model = copy.deepcopy(template)
    layer_names = list(compressible_layers(template, registry))
    if sorted(layer_names) != sorted(header.layers):
        raise ValueError(f"layers {sorted(header.layers)} do not match the task's {layer_names}")
    for name in layer_names:
        info, choice = header.layers[name], header.plan.layer(name)
        structure = registry.method(choice.structure.method, Stage.STRUCTURE)
        value = registry.method(choice.value.method, Stage.VALUE)
        assert isinstance(structure, StructureMethod) and isinstance(value, ValueMethod)
        value_config = value.config(choice.value.config)
        code = LayerCode(meta=info.meta)
        try:
            for payload, p in info.payloads.items():
                stored = {
                    k: stream_array(header, blobs, f"{name}/{payload}/{k}", registry)
                    for k in p.arrays
                }
                code.payloads[payload] = value.decode(stored, p.meta, tuple(p.shape), value_config)
            for key in info.arrays:
                code.arrays[key] = stream_array(header, blobs, f"{name}/{key}", registry)
            module = structure.decode(
                code, template.get_submodule(name), structure.config(choice.structure.config)
            )
        except Exception as exc:
            raise ArtifactError(f"layer `{name}` cannot be decoded: {exc}") from exc
        replace_module(model, name, module)
    expected = {
        key
        for key in template.state_dict()
        if not any(key.startswith(f"{n}.") for n in layer_names)
    }
    if set(header.state) != expected:
        raise ValueError(f"state tensors {sorted(header.state)} do not match {sorted(expected)}")
    state = {
        key: torch.from_numpy(stream_array(header, blobs, f"state/{key}", registry).copy())
        for key in header.state
    }
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes each part of an artifact takes: ``header`` (with the safetensors framing),
    one entry per layer, and ``state`` for the uncompressed rest. Sums to the file size."""
    header, blobs = read_header(path)
    (header_len,) = struct.unpack("<Q", Path(path).read_bytes()[:8])
    parts: dict[str, int] = {"header": 8 + header_len}
    for key, blob in blobs.items():
        section = "state" if key.startswith("state/") else key.split("/", 1)[0]
        parts[section] = parts.get(section, 0) + len(blob)
    return parts


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file (None when it is missing): what caches of a trial are keyed by."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None
