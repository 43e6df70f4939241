"""Compressed lowering: each layer of an artifact as a kernel that reads its stored form.

For every compressible layer, the structure method's ``lower`` hook gives the layer's compute
and the value method's ``lower`` hook gives how each payload element is rebuilt from its
stored arrays (packed codes and a codebook, say); both inline into one TE kernel. A value
method without the hook hands over its decoded float32 values instead; a structure method
without it (or a layer it cannot lower) keeps the dense form: its decoded weight as float32.

Each layer becomes a :class:`~autoshrink.compiler.layer_kernel.LayerKernel`. How the model
around them is exported: :mod:`autoshrink.compiler.export`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tvm import tirx

from autoshrink.artifact import layer_arrays
from autoshrink.compiler.decoded import decoded_linear, decoded_values, element_columns
from autoshrink.compiler.kernels import conv_geometry, supports
from autoshrink.compiler.layer_kernel import LayerKernel
from autoshrink.compiler.sparse import (
    MAX_UNFOLD,
    conv_output,
    epilogue_output,
    sparse_table_conv2d,
    sparse_table_linear,
    unfolded,
)
from autoshrink.compiler.vector import (
    LANES,
    MAX_TABLE,
    kernel_table,
    pack_codes,
    pack_values,
    table_linear,
    table_values,
    table_values_length,
)
from autoshrink.header import Header
from autoshrink.methods import LayerCode, LoweredLayer, LoweredValue
from autoshrink.pipeline import layer_step

if TYPE_CHECKING:
    from autoshrink.compiler.epilogue import Epilogue
    from autoshrink.registry import Registry

__all__ = ["compressed_kernels"]

#: What the decoding kernel's first step calls the payload values it decodes.
DECODED = "decoded"


def _float_values(tensor: torch.Tensor) -> LoweredValue:
    """A payload as plain float32 values: what a value method without ``lower`` gives."""
    values = tensor.detach().float().reshape(-1).numpy().copy()
    return LoweredValue(arrays={"values": values}, element=lambda t, i: t["values"][i])


def _bind(lowered: LoweredValue, prefix: str, tensors: dict[str, Any]) -> Callable:
    scoped = {key: tensors[f"{prefix}.{key}"] for key in lowered.arrays}
    return lambda i: lowered.element(scoped, i)


def compressed_kernels(
    header: Header,
    blobs: dict[str, bytes],
    registry: Registry,
    templates: dict[str, nn.Module],
    notes: list[str],
    table_lookup: bool = False,
    vbmi: bool = False,
    inputs: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, LayerKernel]:
    """The compressed kernel of each layer whose structure method can lower it; one note
    per layer that cannot. With ``table_lookup`` (a CPU with AVX-512), a Linear whose weights
    are codes into a table (up to 8 bits) gets the written-out table-lookup kernel; with
    ``vbmi`` too (AVX-512 VBMI) its tables of more than 32 entries are looked up in
    registers as byte planes. A pruned convolution of such codes gets the sparse convolution
    when its input shape (``inputs``, without the batch) unfolds into at most
    :data:`~autoshrink.compiler.sparse.MAX_UNFOLD` floats."""
    kernels: dict[str, LayerKernel] = {}
    for name, info in header.layers.items():
        step = layer_step(name, templates[name], header.plan.layer(name), registry)
        stored_payloads, own = layer_arrays(header, blobs, name, registry)
        payloads: dict[str, LoweredValue] = {}
        counts = {payload: math.prod(stored[2]) for payload, stored in stored_payloads.items()}
        for payload, stored in stored_payloads.items():
            lowered = step.value.lower(*stored, step.value_config)
            if lowered is None:
                notes.append(f"{name}: `{step.value.name}` has no lowering; its values are float32")
                lowered = _float_values(step.value.decode(*stored, step.value_config))
            payloads[payload] = lowered
        code = LayerCode(meta=info.meta, arrays=own)
        layer = step.structure.lower(code, step.module, step.structure_config)
        if layer is None:
            notes.append(f"{name}: `{step.structure.name}` has no compressed kernel for it; dense")
            continue
        lookup = None
        if table_lookup:
            lookup = (
                _table_kernel(name, step, layer, payloads, vbmi)
                or _sparse_kernel(name, step, layer, payloads, (inputs or {}).get(name))
                or _decoded_kernel(name, step, layer, payloads, counts, vbmi)
            )
        if lookup is not None:
            kernels[name] = lookup
            continue
        arrays = dict(layer.arrays)
        for payload, lowered in payloads.items():
            arrays.update({f"{payload}.{k}": v for k, v in lowered.arrays.items()})

        def compute(x: Any, tensors: dict[str, Any], layer=layer, payloads=payloads) -> Any:
            own = {k: tensors[k] for k in layer.arrays}
            elements = {p: _bind(lowered, p, tensors) for p, lowered in payloads.items()}
            return layer.compute(x, own, elements)

        kernels[name] = LayerKernel(
            layer=name,
            form="compressed",
            methods=step.methods,
            arrays={k: np.ascontiguousarray(v) for k, v in arrays.items()},
            compute=compute,
        )
    return kernels


def _table_kernel(
    name: str, step: Any, layer: LoweredLayer, payloads: dict[str, LoweredValue], vbmi: bool
) -> LayerKernel | None:
    """The table-lookup kernels of a Linear made of matrix products whose weights are
    payloads of codes into tables of at most :data:`~autoshrink.compiler.vector.MAX_TABLE`
    values, else ``None``."""
    template = step.module
    chain = [payloads.get(weight) for weight in layer.weights]
    if not isinstance(template, nn.Linear) or not chain or not all(map(_tabled, chain)):
        return None
    arrays: dict[str, np.ndarray] = {}
    stages: list[tuple[int, int, int]] = []  # (in, out, table size)
    features = template.in_features
    for index, lowered in enumerate(chain):
        size = int(lowered.table.size)
        outputs, rest = divmod(int(lowered.codes.size), features)
        if rest or not outputs:
            return None
        arrays[f"{index}.table"] = kernel_table(lowered.table, vbmi)
        arrays[f"{index}.words"] = pack_codes(
            lowered.codes.reshape(outputs, features), size, vbmi
        )
        arrays[f"{index}.bias"] = np.zeros(outputs, np.float32)
        stages.append((features, outputs, size))
        features = outputs
    if features != template.out_features:
        return None
    if layer.arrays.get("bias") is not None:
        arrays[f"{len(chain) - 1}.bias"] = layer.arrays["bias"]

    def build(epilogue: Epilogue | None) -> LayerKernel | None:
        if (relu := _linear_relu(epilogue)) is None:
            return None

        def written(shape: tuple[int, ...]) -> list[tuple[Any, tuple[int, ...], list[str]]]:
            return [
                (table_linear(shape[0], *stage, vbmi, relu and i == len(stages) - 1),
                 stage[1:2], [f"{i}.bias", f"{i}.table", f"{i}.words"])
                for i, stage in enumerate(stages)
            ]

        return _written_kernel(name, f"{step.methods}, table lookup", arrays, written)

    return _fusable(build)


def _sparse_kernel(
    name: str,
    step: Any,
    layer: LoweredLayer,
    payloads: dict[str, LoweredValue],
    image: tuple[int, ...] | None,
) -> LayerKernel | None:
    """The sparse table-lookup kernel of a Linear or (ungrouped, zero-padded) Conv2d stored
    as rows of survivors whose values are codes into a table (one byte a survivor in the
    bundle), else ``None``. A dense Conv2d of such codes gets the sparse convolution too,
    every row holding every column (none stored)."""
    template = step.module
    out = int(template.weight.shape[0])
    dense = layer.rows is None and isinstance(template, nn.Conv2d) and layer.weights == ("weight",)
    lowered = payloads.get(layer.rows[2] if layer.rows else "weight" if dense else "")
    if not _tabled(lowered) or not supports(template):
        return None
    geometry = tuple(conv_geometry(template).values()) if isinstance(template, nn.Conv2d) else ()
    if geometry and (image is None or unfolded(image, geometry) > MAX_UNFOLD):
        return None
    if dense:
        taps = int(np.prod(template.weight.shape[1:]))
        columns, starts = np.zeros(1, np.uint8), np.arange(out + 1, dtype=np.int32) * taps
    else:
        columns, starts = (layer.arrays[key] for key in layer.rows[:2])
    size = int(lowered.table.size)
    bias = layer.arrays.get("bias")
    padding = np.zeros(LANES, np.uint8)  # the kernel's last vector of stored values reads on
    arrays = {
        "bias": np.zeros(out, np.float32) if bias is None else bias,
        "codes": np.concatenate([np.asarray(lowered.codes, np.uint8), padding]),
        "columns": np.concatenate([columns, padding.astype(columns.dtype)]),
        "starts": np.asarray(starts, np.int32),
        "table": kernel_table(lowered.table),
    }
    dtype = str(columns.dtype)
    methods = f"{step.methods}, sparse table lookup"
    if isinstance(template, nn.Linear):
        def linear(epilogue: Epilogue | None) -> LayerKernel | None:
            if (relu := _linear_relu(epilogue)) is None:
                return None

            def written(shape: tuple[int, ...]) -> list[tuple[Any, tuple[int, ...], list[str]]]:
                kernel = sparse_table_linear(shape[0], shape[1], out, size, dtype, relu)
                return [(kernel, (out,), sorted(arrays))]

            return _written_kernel(name, methods, arrays, written)

        return _fusable(linear)

    def convolution(epilogue: Epilogue | None) -> LayerKernel:
        # The epilogue: a batch norm's scale and shift fold into the kernel's scale and bias
        # (sums * scale + bias * scale + shift), then pool and ReLU in the kernel.
        own = dict(arrays, scale=np.ones(out, np.float32))
        pool, relu = (epilogue.pool, epilogue.relu) if epilogue else (None, False)
        if epilogue is not None and epilogue.scale is not None:
            own["scale"] = epilogue.scale
            own["bias"] = (arrays["bias"] * epilogue.scale + epilogue.shift).astype(np.float32)

        def written(shape: tuple[int, ...]) -> list[tuple[Any, tuple[int, ...], list[str]]]:
            kernel = sparse_table_conv2d(
                shape[0], shape[1:], out, geometry, size, dtype, dense, relu, pool
            )
            plane = epilogue_output(*conv_output(*shape[2:], geometry), pool)
            return [(kernel, (out, *plane), sorted(own))]

        return _written_kernel(name, methods, own, written)

    return _fusable(convolution)


def _decoded_kernel(
    name: str,
    step: Any,
    layer: LoweredLayer,
    payloads: dict[str, LoweredValue],
    counts: dict[str, int],
    vbmi: bool,
) -> LayerKernel | None:
    """The decoding kernel (:mod:`autoshrink.compiler.decoded`) of a Linear whose method
    gives its weight element by element, else ``None``. A payload of at most a quarter as
    many elements as the weight is decoded once a call, before the rows: as a table lookup
    of 16 values at a time when it is codes into a table (its codes then stored in that
    kernel's layout), else element by element."""
    template = step.module
    if layer.element is None or not isinstance(template, nn.Linear):
        return None
    out, features = template.out_features, template.in_features
    arrays = dict(layer.arrays)
    if arrays.get("bias") is None:
        arrays["bias"] = np.zeros(out, np.float32)
    small = [p for p in payloads if counts[p] * 4 <= out * features]
    first = small[0] if small else None
    tabled = first is not None and _tabled(payloads[first])
    for payload, lowered in payloads.items():
        if tabled and payload == first:  # read only by the decoding step, in its own layout
            arrays[f"{first}.table"] = kernel_table(lowered.table, vbmi)
            arrays[f"{first}.words"] = pack_values(lowered.codes, int(lowered.table.size), vbmi)
        else:
            arrays.update({f"{payload}.{key}": value for key, value in lowered.arrays.items()})

    def build(epilogue: Epilogue | None) -> LayerKernel | None:
        if (relu := _linear_relu(epilogue)) is None:
            return None
        how = "decoded in lanes" + (", a run a vector" if layer.columns is not None else "")
        return _written_kernel(name, f"{step.methods}, {how}", arrays, partial(written, relu=relu))

    def written(shape: tuple[int, ...], relu: bool) -> list[tuple[Any, ...]]:
        names = sorted(arrays)
        buffers = {
            key: tirx.decl_buffer(arrays[key].shape, str(arrays[key].dtype), name=f"a{i}")
            for i, key in enumerate(names)
        }
        own = {key: buffers[key] for key in layer.arrays}
        elements = {
            p: _bind(lowered, p, buffers)
            for p, lowered in payloads.items()
            if not (tabled and p == first)
        }
        steps: list[tuple[Any, ...]] = []
        reads = names
        if first is not None:  # its values decoded by a step of their own, read by the next
            count = counts[first]
            if tabled:
                size = int(payloads[first].table.size)
                values = table_values(count, size, vbmi, shape)
                inputs, length = [f"{first}.table", f"{first}.words"], table_values_length(
                    count, size, vbmi
                )
            else:
                values = decoded_values(
                    count, [buffers[key] for key in names], _bind(payloads[first], first, buffers),
                    shape,
                )
                inputs, length = names, -(-count // LANES) * LANES
            steps.append((values, (length,), inputs, DECODED))
            decoded = tirx.decl_buffer((length,), "float32", name="decoded")
            elements[first] = lambda i: decoded[i]
            reads = [*names, DECODED]
            buffers[DECODED] = decoded
        if layer.columns is not None:
            columns = layer.columns(own, elements)
        else:
            columns = element_columns(layer.element(own, elements), out, features)
        kernel = decoded_linear(
            shape[0], features, out, [buffers[key] for key in reads], buffers["bias"], columns,
            relu,
        )
        return [*steps, (kernel, (out,), reads)]

    return _fusable(build)


def _fusable(build: Callable[[Epilogue | None], LayerKernel | None]) -> LayerKernel:
    """The written-out kernel ``build(None)``, which computes the epilogues ``build`` takes
    (``build(epilogue)``; ``None`` for one it cannot compute)."""
    kernel = build(None)
    kernel.fused = build
    return kernel


def _linear_relu(epilogue: Epilogue | None) -> bool | None:
    """What a Linear's kernel computes of ``epilogue``: whether a ReLU, or ``None`` when it
    asks for more (a batch norm, a pool)."""
    if epilogue is None:
        return False
    return None if epilogue.scale is not None or epilogue.pool is not None else epilogue.relu


def _tabled(lowered: LoweredValue | None) -> bool:
    """Whether a payload is codes into a table the kernels take (at most ``MAX_TABLE``)."""
    return (
        lowered is not None
        and lowered.table is not None
        and lowered.codes is not None
        and 0 < lowered.table.size <= MAX_TABLE
    )


def _written_kernel(
    name: str, methods: str, arrays: dict[str, np.ndarray], written: Callable
) -> LayerKernel:
    return LayerKernel(
        layer=name,
        form="compressed",
        methods=methods,
        arrays={k: np.ascontiguousarray(v) for k, v in arrays.items()},
        compute=None,
        written=written,
    )
