"""The decoding kernel: a Linear whose method gives its weight element by element
(``LoweredLayer.element``), decoded 16 rows at a time in vector lanes.

The TE form of such a layer rebuilds each weight inside the matrix product's reduction, one
element at a time, and MetaSchedule cannot schedule it when the element is more than a load
(a hash's let-bound stages): it runs as plain scalar loops. Here each parallel task takes
groups of 16 output rows; for every column it computes the 16 rows' weights at once (the
method's element at a vector of 16 flat indices) and multiplies them into every batch row,
as :mod:`autoshrink.compiler.vector`'s kernels do with their looked-up weights: at once for
a batch of one tile, else through a scratch block decoded once for all tiles. A method that
computes a column's 16 weights together (``LoweredLayer.columns``: hashed runs, one hash and
one contiguous read) gives them in place of the 16 elements, from a key per column. The keys
of a row group are computed 16 columns at once and stored before its columns are multiplied,
so each column loads its key as one scalar (taken from a vector register, each cost an
extract and a shift).

A payload far smaller than the weight (HashedNets' K shared values) is first decoded to
float32 by a kernel of its own (:func:`decoded_values`), once a call, and the weights read
that. (Decoded inside the same kernel, into a buffer of its own, TVM would shrink that
buffer to the region the hashed reads cover: an expression of the hash.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from autoshrink.compiler.vector import LANES, split_tasks
from autoshrink.methods import Columns

__all__ = ["decoded_linear", "decoded_values", "element_columns"]

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
    columns: Columns,
    relu: bool = False,
) -> Any:
    """The kernel ``y = x @ W.T + bias`` for ``x`` of shape (batch, in), as a scheduled
    PrimFunc taking ``(x, *arrays, y)``: ``arrays`` are TIR buffers (``bias`` among them)
    that ``columns`` reads to give the weights of rows ``16g`` to ``16g + 15`` a column at a
    time (``LoweredLayer.columns``; :func:`element_columns` for a method's ``element``), the
    keys of 16 columns computed at once. With ``relu``, ``y`` is the ReLU of that."""
    n, k, b = out_features, in_features, batch
    groups, chunks = -(-n // LANES), -(-k // LANES)
    tile = next(t for t in (8, 4, 2, 1) if b % t == 0)
    tasks, per_task = split_tasks(groups, n * k * b)
    # A batch of more than one tile decodes its row group's weights once into a block that
    # every tile reads; a batch of one tile multiplies each column as it is decoded.
    staged = b > tile
    # Independent sums a batch row, so that at least 4 multiply-adds are in flight (their
    # latency, not their throughput, would bound a batch of one).
    splits = max(1, 4 // tile)
    probe = columns.key(tirx.Var("g", "int32"), tirx.Var("c", "int32"))
    key_dtype = str(tvm.DataType(str(probe.ty)))
    if key_dtype not in ("int32", "uint32"):
        raise ValueError(f"a column's key must be a 32-bit integer, not {key_dtype}")

    def sum_at(t: Expr, j: Expr) -> Expr:
        return T.ramp((t * splits + j % splits) * LANES, 1, LANES)

    def at(c: Expr) -> Expr:
        return T.ramp(c * LANES if staged else 0, 1, LANES)

    def chunk(g: Expr, c0: Expr) -> Expr:
        # the keys of 16 columns (columns past the layer's last repeat it)
        ramp = T.ramp(c0 * LANES, 1, LANES)
        return columns.key(g, ramp if k % LANES == 0 else T.min(ramp, T.broadcast(k - 1, LANES)))

    @T.prim_func(private=True, check_well_formed=False)  # `arrays` become parameters below
    def kernel(x: T.Buffer((b, k), "float32"), y: T.Buffer((b, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((tile * splits * LANES,), "float32", scope="local")
            keys = T.alloc_buffer((chunks * LANES,), key_dtype)
            scratch = T.alloc_buffer(((k if staged else 1) * LANES,), "float32")
            for member in range(per_task):
                g = T.meta_var(task * per_task + member)
                if g < groups:
                    for c0 in range(chunks):
                        keys[T.ramp(c0 * LANES, 1, LANES)] = chunk(g, c0)
                    if staged:
                        for c in range(k):
                            scratch[at(c)] = columns.weights(g, keys[c])
                    for outer in range(b // tile):
                        for t in T.unroll(tile * splits):
                            acc[T.ramp(t * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                        for c0 in range(chunks):
                            for j in range(LANES):
                                if c0 * LANES + j < k:
                                    if not staged:
                                        scratch[at(0)] = columns.weights(g, keys[c0 * LANES + j])
                                    for t in T.unroll(tile):
                                        acc[sum_at(t, j)] = acc[sum_at(t, j)] + T.broadcast(
                                            x[outer * tile + t, c0 * LANES + j], LANES
                                        ) * scratch[at(c0 * LANES + j)]
                        for t in T.unroll(tile):
                            for part in T.unroll(1, splits):
                                acc[T.ramp(t * splits * LANES, 1, LANES)] = (
                                    acc[T.ramp(t * splits * LANES, 1, LANES)]
                                    + acc[T.ramp((t * splits + part) * LANES, 1, LANES)]
                                )
                            for lane in range(LANES):
                                if g * LANES + lane < n:
                                    y[outer * tile + t, g * LANES + lane] = (
                                        bias[g * LANES + lane] + acc[t * splits * LANES + lane]
                                    )
                                    if relu:
                                        y[outer * tile + t, g * LANES + lane] = T.max(
                                            y[outer * tile + t, g * LANES + lane], T.float32(0)
                                        )

    x_param, y_param = kernel.params
    return tirx.PrimFunc(
        [x_param, *arrays, y_param], kernel.body, kernel.ret_type, kernel.attrs
    )


def element_columns(
    element: Callable[[Expr], Expr], out_features: int, in_features: int
) -> Columns:
    """The :class:`Columns` of a method's ``element``: a column's key is its index, and its
    weights those at the flat indices of that column in rows ``16g`` to ``16g + 15`` (rows
    past the layer's last repeat it)."""
    n, k = out_features, in_features

    def weights(g: Expr, c: Expr) -> Expr:
        row = T.min(T.broadcast(g * LANES, LANES) + T.ramp(0, 1, LANES), T.broadcast(n - 1, LANES))
        return element(row * T.broadcast(k, LANES) + T.broadcast(c, LANES))

    return Columns(key=lambda g, c: c, weights=weights)
