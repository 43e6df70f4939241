"""What the conformance kit (:mod:`autoshrink.testing`) compiles: small TVM kernels built
from a method's lowering (``lower``), run on the CPU, so that the kit can compare what they
compute with what the method's ``decode`` gives. They build on TVM alone: the kit checks the
contract a plugin writes to, not the compiler's own kernels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "column_weights", "evaluate_lowering", "layer_forms", "layer_output", "weight_elements",
]

#: the decoding kernel's vector width (``autoshrink.compiler.decoded``)
LANES = 16


def evaluate_lowering(lowered: Any, count: int, lanes: bool = False) -> np.ndarray:
    """Every element of a lowered payload (a ``LoweredValue``), computed by a compiled TVM
    kernel: one element at a time (a TE kernel), or with ``lanes`` 16 at a time, as the
    compiler's decoding kernel reads them (``autoshrink.compiler.decoded``)."""
    from tvm import te

    if lanes:
        return _run_in_lanes(lowered.arrays, count, lambda tensors, i: lowered.element(
            tensors, i))
    placeholders = _placeholders(lowered.arrays)
    out = te.compute((count,), lambda i: lowered.element(placeholders, i), name="element")
    return _run_te([*placeholders.values(), out], lowered.arrays, count)


def layer_output(
    lowered: Any, x: np.ndarray, payloads: Mapping[str, np.ndarray]
) -> np.ndarray:
    """A lowered layer's (``LoweredLayer``) output for the input ``x``, computed by a TE
    kernel built from its ``compute``, the payloads given as their float32 values."""
    import tvm
    from tvm import te

    arrays = {**lowered.arrays, **{f"payload.{k}": _flat(v) for k, v in payloads.items()}}
    tensors = _placeholders(arrays)
    own = {key: tensors[key] for key in lowered.arrays}
    reads = {key: _reader(tensors[f"payload.{key}"]) for key in payloads}
    x_in = te.placeholder(x.shape, "float32", name="x")
    out = lowered.compute(x_in, own, reads)
    kernel = tvm.compile(te.create_prim_func([x_in, *tensors.values(), out]), target="llvm")
    result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], np.float32))
    kernel["main"](
        tvm.runtime.tensor(np.ascontiguousarray(x, np.float32)),
        *(tvm.runtime.tensor(a) for a in _contiguous(arrays)), result,
    )
    return result.numpy()


def weight_elements(
    lowered: Any, count: int, payloads: Mapping[str, np.ndarray], lanes: bool = False
) -> np.ndarray:
    """Every weight element of a lowered Linear from its ``element``: one at a time (a TE
    kernel), or with ``lanes`` 16 at a time in vector lanes, as the decoding kernel calls
    it."""
    from tvm import te

    arrays = {**lowered.arrays, **{f"payload.{k}": _flat(v) for k, v in payloads.items()}}

    def element(tensors: Mapping[str, Any], i: Any) -> Any:
        own = {key: tensors[key] for key in lowered.arrays}
        reads = {key: _reader(tensors[f"payload.{key}"]) for key in payloads}
        return lowered.element(own, reads)(i)

    if lanes:
        return _run_in_lanes(arrays, count, element)
    tensors = _placeholders(arrays)
    out = te.compute((count,), lambda i: element(tensors, i), name="weight")
    return _run_te([*tensors.values(), out], arrays, count)


def column_weights(
    lowered: Any, shape: tuple[int, int], payloads: Mapping[str, np.ndarray]
) -> np.ndarray:
    """A lowered Linear's ``(out, in)`` weight from its ``columns``, as the decoding kernel
    reads it: the keys of 16 columns at once, then each column's 16 weights from its key."""
    import tvm
    from tvm import tirx
    from tvm.script import tirx as T

    n, k = shape
    groups, chunks = -(-n // LANES), -(-k // LANES)
    arrays = {**lowered.arrays, **{f"payload.{k}": _flat(v) for k, v in payloads.items()}}
    buffers = _buffers(arrays)
    own = {key: buffers[key] for key in lowered.arrays}
    reads = {key: _reader(buffers[f"payload.{key}"]) for key in payloads}
    columns = lowered.columns(own, reads)
    probe = columns.key(tirx.Var("g", "int32"), tirx.Var("c", "int32"))
    key_dtype = str(tvm.DataType(str(probe.ty)))

    @T.prim_func(check_well_formed=False)  # the arrays become parameters below
    def main(out: T.Buffer((groups * k * LANES,), "float32")):
        T.func_attr({"tirx.is_scheduled": True})
        keys = T.alloc_buffer((LANES,), key_dtype, scope="local")
        for g in range(groups):
            for c0 in range(chunks):
                ramp = T.meta_var(T.min(T.ramp(c0 * LANES, 1, LANES), T.broadcast(k - 1, LANES)))
                keys[T.ramp(0, 1, LANES)] = columns.key(g, ramp)
                for j in range(LANES):
                    if c0 * LANES + j < k:
                        out[T.ramp((g * k + c0 * LANES + j) * LANES, 1, LANES)] = (
                            columns.weights(g, keys[j])
                        )

    values = _run_module(main, buffers, arrays, groups * k * LANES)
    # Stored column by column, 16 rows each: back to rows; rows past the last may be anything.
    return values.reshape(groups, k, LANES).transpose(0, 2, 1).reshape(groups * LANES, k)[:n]


def layer_forms(
    lowered: Any, template: Any, x: np.ndarray, payloads: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What each form a lowered Linear or Conv2d (``template``) gives computes: the layer's
    outputs for ``x`` (from ``compute``, and from the payloads ``weights`` or ``rows`` name)
    and its ``(out, in)`` weight, for a Linear (from ``element``, one at a time and in
    vector lanes, and from ``columns``), each under the name of its form."""
    outputs = {"compute": layer_output(lowered, x, payloads)}
    bias = lowered.arrays.get("bias")
    shape = tuple(template.weight.shape)
    if lowered.weights:
        if len(shape) == 2:
            y = x
            for name in lowered.weights:
                matrix = np.asarray(payloads[name], np.float32)
                y = y @ matrix.reshape(-1, y.shape[1]).T
            outputs["weights"] = y if bias is None else y + bias
        else:
            outputs["weights"] = _dense_output(template, payloads[lowered.weights[0]], bias, x)
    if lowered.rows is not None:
        column, start, values = lowered.rows
        columns, starts = lowered.arrays[column], lowered.arrays[start]
        dense = np.zeros((shape[0], int(np.prod(shape[1:]))), np.float32)
        survivors = _flat(payloads[values])
        for row in range(shape[0]):
            at = slice(int(starts[row]), int(starts[row + 1]))
            dense[row, columns[at]] = survivors[at]
        outputs["rows"] = _dense_output(template, dense, bias, x)
    weights = {}
    if len(shape) == 2 and lowered.element is not None:
        count = shape[0] * shape[1]
        weights["element"] = weight_elements(lowered, count, payloads).reshape(shape)
        weights["element in lanes"] = weight_elements(
            lowered, count, payloads, lanes=True
        ).reshape(shape)
    if len(shape) == 2 and lowered.columns is not None:
        weights["columns"] = column_weights(lowered, shape, payloads)
    return outputs, weights


def _dense_output(
    template: Any, weight: np.ndarray, bias: np.ndarray | None, x: np.ndarray
) -> np.ndarray:
    """``template``'s layer computed with this weight and bias (PyTorch, float32)."""
    import torch
    from torch.nn import functional

    w = torch.from_numpy(np.asarray(weight, np.float32).reshape(template.weight.shape))
    b = None if bias is None else torch.from_numpy(np.asarray(bias, np.float32))
    inputs = torch.from_numpy(np.asarray(x, np.float32))
    with torch.no_grad():
        if w.dim() == 2:
            return functional.linear(inputs, w, b).numpy()
        return functional.conv2d(
            inputs, w, b, template.stride, template.padding, template.dilation, template.groups
        ).numpy()


def _flat(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, np.float32).reshape(-1))


def _contiguous(arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(a) for a in arrays.values()]


def _reader(tensor: Any) -> Callable[[Any], Any]:
    return lambda i: tensor[i]


def _placeholders(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from tvm import te

    return {
        key: te.placeholder(array.shape, str(array.dtype), name=f"a{i}")
        for i, (key, array) in enumerate(arrays.items())
    }


def _buffers(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from tvm import tirx

    return {
        key: tirx.decl_buffer(array.shape, str(array.dtype), name=f"a{i}")
        for i, (key, array) in enumerate(arrays.items())
    }


def _run_te(params: list[Any], arrays: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    import tvm
    from tvm import te

    kernel = tvm.compile(te.create_prim_func(params), target="llvm")
    result = tvm.runtime.tensor(np.zeros(count, np.float32))
    kernel["main"](*(tvm.runtime.tensor(a) for a in _contiguous(arrays)), result)
    return result.numpy()


def _run_in_lanes(
    arrays: Mapping[str, np.ndarray], count: int,
    element: Callable[[Mapping[str, Any], Any], Any],
) -> np.ndarray:
    """Elements ``0..count-1`` of ``element``, 16 indices at a time (the last vector's past
    ``count`` repeat the last element)."""
    from tvm.script import tirx as T

    buffers = _buffers(arrays)
    vectors = -(-count // LANES)

    @T.prim_func(check_well_formed=False)  # the arrays become parameters below
    def main(out: T.Buffer((vectors * LANES,), "float32")):
        for v in range(vectors):
            index = T.meta_var(T.min(T.ramp(v * LANES, 1, LANES), T.broadcast(count - 1, LANES)))
            out[T.ramp(v * LANES, 1, LANES)] = element(buffers, index)

    return _run_module(main, buffers, arrays, vectors * LANES)[:count]


def _run_module(
    main: Any, buffers: Mapping[str, Any], arrays: Mapping[str, np.ndarray], size: int
) -> np.ndarray:
    """Run a TVMScript ``main(out)`` whose body reads ``buffers``, given ``arrays``."""
    import tvm
    from tvm import tirx

    function = tirx.PrimFunc([*buffers.values(), *main.params], main.body, main.ret_type,
                             main.attrs)
    kernel = tvm.compile(tvm.IRModule({"main": function.with_attr("global_symbol", "main")}))
    result = tvm.runtime.tensor(np.zeros(size, np.float32))
    kernel["main"](*(tvm.runtime.tensor(a) for a in _contiguous(arrays)), result)
    return result.numpy()
