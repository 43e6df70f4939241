"""Artifact: a compressed model as one safetensors file, with no pickle anywhere.

Every stored array is a stream of raw little-endian bytes, entropy coded when the plan's
encoding stage makes it smaller; the file's layout and its header are in
:mod:`autoshrink.header`. The artifact's size is the byte count of the file, header
included.
"""

from __future__ import annotations

import copy
import inspect
import math
import struct
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.numpy import save
from torch import nn

from autoshrink.compress import replace_module
from autoshrink.errors import ArtifactError, first_line
from autoshrink.files import write_atomic
from autoshrink.header import (
    DTYPES,
    FORMAT,
    PACKED,
    VERSION,
    Header,
    LayerInfo,
    PayloadInfo,
    Stream,
    digest,
    header_metadata,
    read_header,
)
from autoshrink.methods import (
    EncodingMethod,
    LayerCode,
    ModelMethod,
    Stage,
    StructureMethod,
    ValueMethod,
)
from autoshrink.plan import Plan, compressible_layers, resolve_choice
from autoshrink.tasks import Task

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = ["Artifact", "read_artifact", "size_breakdown", "stream_array", "write_artifact"]

class Artifact(BaseModel):
    """A loaded artifact: its header, the file's byte count and the rebuilt model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path
    bytes: int
    header: Header
    model: nn.Module


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
        if array.dtype.name not in DTYPES:
            raise TypeError(f"stream `{key}` has unsupported dtype {array.dtype}")
        raw, coding = array.astype(array.dtype.newbyteorder("<")).tobytes(), None
        if encoder is not None and raw:
            assert isinstance(encoder, EncodingMethod) and plan.encoding is not None
            coded = encoder.encode(raw, encoder.config(plan.encoding.config))
            if len(coded) < len(raw):
                raw, coding = coded, encoder.name
        blobs[key] = raw
        streams[key] = Stream(
            dtype=array.dtype.name, shape=list(array.shape), coding=coding, bytes=len(raw)
        )
    header = Header(
        format=FORMAT,
        version=VERSION,
        task=task.name,
        width=width,
        plan=plan,
        versions={"autoshrink": version("autoshrink"), "torch": torch.__version__},
        layers=layers,
        state=list(state),
        streams=streams,
        sha256=digest(blobs),
        info=info or {},
    )
    packed = np.frombuffer(b"".join(blobs[key] for key in streams), dtype=np.uint8)
    data = save({PACKED: packed}, metadata=header_metadata(header.model_dump(
        mode="json", exclude_defaults=True
    )))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path.stat().st_size


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
        first = first_line(exc)
        raise ArtifactError(f"{path} cannot be decoded: {first}") from exc
    return Artifact(path=path, bytes=path.stat().st_size, header=header, model=model)


def _decode(encoder: EncodingMethod, raw: bytes, config: Any, limit: int) -> bytes:
    """``encoder.decode`` with the output limit; encoders written before ``limit`` existed
    are called without it (the length is still checked afterwards, memory is on them)."""
    if "limit" in inspect.signature(encoder.decode).parameters:
        return encoder.decode(raw, config, limit=limit)
    return encoder.decode(raw, config)


def stream_array(
    header: Header, blobs: dict[str, bytes], key: str, registry: Registry
) -> np.ndarray:
    """Stream `key` of an artifact as the array it stores (entropy coding undone)."""
    stream = header.streams.get(key)
    if stream is None:
        raise ValueError(f"stream `{key}` is missing")
    raw = blobs[key]
    dtype = np.dtype(stream.dtype).newbyteorder("<")
    count = math.prod(stream.shape)
    if min(stream.shape, default=0) < 0:
        raise ValueError(f"stream `{key}` has a negative dimension {stream.shape}")
    if stream.coding is not None:
        encoder = registry.method(stream.coding, Stage.ENCODING)
        assert isinstance(encoder, EncodingMethod)
        config = header.plan.encoding.config if header.plan.encoding else {}
        raw = _decode(encoder, raw, encoder.config(config), count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(
            f"stream `{key}` holds {len(raw)} bytes, expected {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(stream.shape)


def _plan_width(plan: Plan, registry: Registry) -> float:
    """The width the plan's model stage gives (1.0 without one)."""
    if plan.model is None:
        return 1.0
    method = resolve_choice(registry, plan.model, Stage.MODEL, "model stage")
    assert isinstance(method, ModelMethod)
    return method.width(method.config(plan.model.config))


def _checked_template(header: Header, task: Task, registry: Registry) -> nn.Module:
    """The task's model at the header's width, once the header is shown to be possible:
    the width is the one its plan's model stage gives (at most 1 without one), every method
    is known with knobs in its schema, and the streams declare no more elements than a sane
    multiple of the model's (so nothing large is allocated for a small hostile file)."""
    width = header.width
    if header.plan.model is not None:
        planned = _plan_width(header.plan, registry)
        if not math.isclose(width, planned, rel_tol=1e-6):
            raise ValueError(f"width {width} is not the width its plan gives ({planned})")
    elif not 0 < width <= 1:  # the search narrows models, it never widens them
        raise ValueError(f"width {width} is outside (0, 1]")
    template = task.build_model(width)
    header.plan.check(registry, template)
    numel = sum(t.numel() for t in template.state_dict().values())
    declared = sum(math.prod(s.shape) for s in header.streams.values())
    if declared > 4 * numel + (1 << 16):
        raise ValueError(
            f"its streams declare {declared:,} values for a model of {numel:,}"
        )
    return template


def _check_finite(model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{name}` holds NaN or infinite values")


def _rebuild(header: Header, blobs: dict[str, bytes], task: Task, registry: Registry) -> nn.Module:
    template = _checked_template(header, task, registry)
    used = {f"state/{key}" for key in header.state} | {
        f"{name}/{key}" for name, info in header.layers.items() for key in info.arrays
    } | {
        f"{name}/{payload}/{key}"
        for name, info in header.layers.items()
        for payload, p in info.payloads.items()
        for key in p.arrays
    }
    if set(header.streams) - used:
        unused = ", ".join(sorted(set(header.streams) - used)[:3])
        raise ValueError(f"it holds streams no layer reads ({unused})")
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
            first = first_line(exc)
            raise ArtifactError(f"layer `{name}` cannot be decoded: {first}") from exc
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
    _check_finite(model)
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
