"""The decoding kernel: a Linear whose method gives its weight element by element
(``LoweredLayer.element``), decoded 16 rows at a time in vector lanes.

The TE form of such a layer rebuilds each weight inside the matrix product's reduction, one
element at a time, and MetaSchedule cannot schedule it when the element is more than a load
(a hash's let-bound stages): it runs as plain scalar loops. Here each parallel task takes
groups of 16 output rows; for every column it computes the 16 rows' weights at once (the
method's element at a vector of 16 flat indices) into a scratch block, then multiplies that
block into every batch row, as :mod:`autoshrink.compiler.vector`'s kernels do with their
looked-up weights. A payload far smaller than the weight (HashedNets' K shared values) is
first decoded to float32 by a kernel of its own (:func:`decoded_values`), once a call, and
the weights read that. (Decoded inside the same kernel, into a buffer of its own, TVM would
shrink that buffer to the region the hashed reads cover: an expression of the hash.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from autoshrink.compiler.vector import LANES, split_tasks

__all__ = ["decoded_linear", "decoded_values"]

Expr = Any  # a tvm PrimExpr


def decoded_values(
    count: int, arrays: list[Any], value: Callable[[Expr], Expr], given: tuple[int, ...] = (1,)
) -> Any:
    """The kernel that decodes a payload's ``count`` values to float32, 16 at a time, as a
    scheduled PrimFunc taking ``(x, *arrays, values)``: ``values`` has ``count`` rounded up
    to 16 entries, ``value(i)`` gives the entries at the int32x16 indices ``i``.

    The layer's input ``x`` (of shape ``given``) is taken, and one element of it read and
    dropped, for Relax's sake: a call on constants alone would be folded at compile time
    (the bundle would then store the values as float32), and a call that reads one array
    only is taken for a reshape."""
    blocks = -(-count // LANES)
    tasks, per_task = split_tasks(blocks, count * LANES)
    origin = (0,) * len(given)

    @T.prim_func(private=True, check_well_formed=False)  # `arrays` become parameters below
    def kernel(x: T.Buffer(given, "float32"), values: T.Buffer((blocks * LANES,), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        T.evaluate(x[origin])
        for task in T.parallel(tasks):
            for member in range(per_task):
                block = T.meta_var(task * per_task + member)
                if block < blocks:
                    values[T.ramp(block * LANES, 1, LANES)] = value(
                        T.min(T.ramp(block * LANES, 1, LANES), T.broadcast(count - 1, LANES))
                    )

    x_param, values_param = kernel.params
    return tirx.PrimFunc(
        [x_param, *arrays, values_param], kernel.body, kernel.ret_type, kernel.attrs
    )


def decoded_linear(
    batch: int,
    in_features: int,
    out_features: int,
    arrays: list[Any],
    bias: Any,
    weight: Callable[[Expr], Expr],
    relu: bool = False,
) -> Any:
    """The kernel ``y = x @ W.T + bias`` for ``x`` of shape (batch, in), as a scheduled
    PrimFunc taking ``(x, *arrays, y)``: ``arrays`` are TIR buffers (``bias`` among them)
    that ``weight(f)`` reads to give the weights at the int32x16 flat indices ``f``. With
    ``relu``, ``y`` is the ReLU of that."""
    n, k, b = out_features, in_features, batch
    groups = -(-n // LANES)
    tile = next(t for t in (8, 4, 2, 1) if b % t == 0)
    tasks, per_task = split_tasks(groups, n * k * b)

    def rows(g: Expr, column: Expr) -> Expr:
        # the flat indices of one column of a row group (rows past the layer repeat the last)
        row = T.min(T.broadcast(g * LANES, LANES) + T.ramp(0, 1, LANES), T.broadcast(n - 1, LANES))
        return row * T.broadcast(k, LANES) + T.broadcast(column, LANES)

    @T.prim_func(private=True, check_well_formed=False)  # `arrays` become parameters below
    def kernel(x: T.Buffer((b, k), "float32"), y: T.Buffer((b, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((tile * LANES,), "float32", scope="local")
            scratch = T.alloc_buffer((k * LANES,), "float32")
            for member in range(per_task):
                g = T.meta_var(task * per_task + member)
                if g < groups:
                    for c in range(k):
                        scratch[T.ramp(c * LANES, 1, LANES)] = weight(rows(g, c))
                    for outer in range(b // tile):
                        for t in T.unroll(tile):
                            acc[T.ramp(t * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                        for c in range(k):
                            for t in T.unroll(tile):
                                acc[T.ramp(t * LANES, 1, LANES)] = acc[
                                    T.ramp(t * LANES, 1, LANES)
                                ] + T.broadcast(x[outer * tile + t, c], LANES) * scratch[
                                    T.ramp(c * LANES, 1, LANES)
                                ]
                        for t in T.unroll(tile):
                            for lane in range(LANES):
                                if g * LANES + lane < n:
                                    y[outer * tile + t, g * LANES + lane] = (
                                        bias[g * LANES + lane] + acc[t * LANES + lane]
                                    )
                                    if relu:
                                        y[outer * tile + t, g * LANES + lane] = T.max(
                                            y[outer * tile + t, g * LANES + lane], T.float32(0)
                                        )

    x_param, y_param = kernel.params
    return tirx.PrimFunc(
        [x_param, *arrays, y_param], kernel.body, kernel.ret_type, kernel.attrs
    )
