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
from autoshrink.methods import EncodingMethod, LayerCode
from autoshrink.pipeline import LayerStep, Pipeline, plan_width, resolve_plan
from autoshrink.plan import Plan
from autoshrink.registry import Origin
from autoshrink.tasks import Task

if TYPE_CHECKING:
    from autoshrink.registry import Registry

#: A payload as stored: its value method's arrays, its meta and its shape.
StoredPayload = tuple[dict[str, np.ndarray], dict[str, Any], tuple[int, ...]]

__all__ = [
    "Artifact", "encode_layer", "layer_arrays", "read_artifact", "size_breakdown",
    "stream_array", "write_artifact",
]

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
    pipeline = resolve_plan(plan, task.build_model(width), registry)
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, LayerInfo] = {}
    for step in pipeline.layers:
        layers[step.name], stored = encode_layer(model.get_submodule(step.name), step)
        arrays.update({f"{step.name}/{key}": array for key, array in stored.items()})
    state = {
        key: tensor
        for key, tensor in model.state_dict().items()
        if not any(key.startswith(f"{name}.") for name in pipeline.names)
    }
    for key, tensor in state.items():
        arrays[f"state/{key}"] = tensor.detach().cpu().numpy()

    encoder = pipeline.encoder
    blobs: dict[str, bytes] = {}
    streams: dict[str, Stream] = {}
    for key, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in DTYPES:
            raise TypeError(f"stream `{key}` has unsupported dtype {array.dtype}")
        raw, coding = array.astype(array.dtype.newbyteorder("<")).tobytes(), None
        if encoder is not None and raw:
            coded = encoder.encode(raw, pipeline.encoder_config)
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
        methods=_origins(plan, pipeline, registry),
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


def encode_layer(
    module: nn.Module, step: LayerStep
) -> tuple[LayerInfo, dict[str, np.ndarray]]:
    """The stored form of one compressed layer: its header entry and its arrays, named
    within the layer (``payload/key`` for a payload's, ``key`` for the structure's own)."""
    code = step.structure.encode(module, step.structure_config)
    arrays: dict[str, np.ndarray] = {}
    payloads: dict[str, PayloadInfo] = {}
    for payload, tensor in code.payloads.items():
        stored, meta = step.value.encode(tensor.detach(), step.value_config)
        arrays.update({f"{payload}/{key}": array for key, array in stored.items()})
        payloads[payload] = PayloadInfo(shape=list(tensor.shape), meta=meta, arrays=list(stored))
    arrays.update(code.arrays)
    return LayerInfo(meta=code.meta, payloads=payloads, arrays=list(code.arrays)), arrays


def _origins(plan: Plan, pipeline: Pipeline, registry: Registry) -> dict[str, str]:
    """Each method the plan uses -> its distribution as a requirement (``name==version``)."""
    names = [plan.model.method] if plan.model is not None else []
    names += [method.name for step in pipeline.layers for method in (step.structure, step.value)]
    names += [pipeline.encoder.name] if pipeline.encoder is not None else []
    return {
        name: str(registry.origins[name]) for name in dict.fromkeys(names)
        if name in registry.origins
    }


def _check_origins(path: Path, header: Header, registry: Registry) -> None:
    """ArtifactError, naming the distribution to install, unless every third-party method
    the file names is here in the same distribution and version (built-ins follow the file
    format's version; files older than the record are not checked)."""
    for name, written in header.methods.items():
        here, then = registry.origins.get(name), Origin.parse(written)
        builtin = then.distribution == "autoshrink" and (
            here is None or here.distribution == "autoshrink"
        )  # a built-in unknown here (blocked) fails the plan's check instead
        if here == then or builtin:
            continue
        provided = f"{_named(here)} provides it here" if here else "it is not installed here"
        raise ArtifactError(
            f"{path} was written with method `{name}` of {_named(then)}, but {provided}; "
            f"install {then} to read it"
        )


def _named(origin: Origin) -> str:
    return f"{origin.distribution} {origin.version or '(version unknown)'}"


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
    _check_origins(path, header, registry)
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
        encoder = registry.encoder(stream.coding)
        config = header.plan.encoding.config if header.plan.encoding else {}
        raw = _decode(encoder, raw, encoder.config(config), count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(
            f"stream `{key}` holds {len(raw)} bytes, expected {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(stream.shape)


def layer_arrays(
    header: Header, blobs: dict[str, bytes], name: str, registry: Registry
) -> tuple[dict[str, StoredPayload], dict[str, np.ndarray]]:
    """The stored form of layer ``name``: each payload as its value method's ``decode`` and
    ``lower`` take it (arrays, meta, shape), and the structure's own arrays."""
    info = header.layers[name]
    payloads = {
        payload: (
            {k: stream_array(header, blobs, f"{name}/{payload}/{k}", registry) for k in p.arrays},
            p.meta,
            tuple(p.shape),
        )
        for payload, p in info.payloads.items()
    }
    own = {k: stream_array(header, blobs, f"{name}/{k}", registry) for k in info.arrays}
    return payloads, own


def _checked_template(
    header: Header, task: Task, registry: Registry
) -> tuple[nn.Module, Pipeline]:
    """The task's model at the header's width and the header's plan resolved against it,
    once the header is shown to be possible: the width is the one its plan's model stage
    gives (at most 1 without one), every method is known with knobs in its schema, and the
    streams declare no more elements than a sane multiple of the model's (so nothing large
    is allocated for a small hostile file)."""
    width = header.width
    if header.plan.model is not None:
        planned = plan_width(header.plan.model, registry)
        if not math.isclose(width, planned, rel_tol=1e-6):
            raise ValueError(f"width {width} is not the width its plan gives ({planned})")
    elif not 0 < width <= 1:  # the search narrows models, it never widens them
        raise ValueError(f"width {width} is outside (0, 1]")
    template = task.build_model(width)
    pipeline = resolve_plan(header.plan, template, registry)
    numel = sum(t.numel() for t in template.state_dict().values())
    declared = sum(math.prod(s.shape) for s in header.streams.values())
    if declared > 4 * numel + (1 << 16):
        raise ValueError(
            f"its streams declare {declared:,} values for a model of {numel:,}"
        )
    return template, pipeline


def _check_finite(model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{name}` holds NaN or infinite values")


def _rebuild(header: Header, blobs: dict[str, bytes], task: Task, registry: Registry) -> nn.Module:
    template, pipeline = _checked_template(header, task, registry)
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
    layer_names = pipeline.names
    if sorted(layer_names) != sorted(header.layers):
        raise ValueError(f"layers {sorted(header.layers)} do not match the task's {layer_names}")
    for step in pipeline.layers:
        info = header.layers[step.name]
        try:
            payloads, own = layer_arrays(header, blobs, step.name, registry)
            code = LayerCode(meta=info.meta, arrays=own)
            for payload, stored in payloads.items():
                code.payloads[payload] = step.value.decode(*stored, step.value_config)
            module = step.structure.decode(code, step.module, step.structure_config)
        except Exception as exc:
            first = first_line(exc)
            raise ArtifactError(f"layer `{step.name}` cannot be decoded: {first}") from exc
        replace_module(model, step.name, module)
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
