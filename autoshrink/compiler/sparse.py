"""Sparse table-lookup kernels for CPUs with AVX-512: a Linear or a convolution pruned to rows
of survivors (CSR, one row per output or output channel) whose values are codes into a
table. Only stored survivors are touched; their codes are looked up as
:mod:`autoshrink.compiler.vector` looks them up.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm.script import tirx as T

from autoshrink.compiler.vector import (
    LANES,
    lanes,
    split_tasks,
    table_entries,
    vector_lookup,
)

__all__ = [
    "MAX_UNFOLD", "conv_output", "epilogue_output", "sparse_table_conv2d", "sparse_table_linear",
    "unfolded",
]

#: Vectors of output positions a convolution accumulates in registers at a time.
BLOCK = 16
#: Most floats the convolution's unfolded block of one image may hold (16 MB); larger
#: convolutions keep the generic sparse kernel.
MAX_UNFOLD = 1 << 22


@functools.cache
def sparse_table_linear(
    batch: int, in_features: int, out_features: int, table_size: int, column_dtype: str,
    relu: bool = False,
) -> Any:
    """The kernel ``y = x @ W.T + bias`` for a weight stored as CSR rows whose values are
    codes into a table: a scheduled PrimFunc taking ``(x, bias, codes, columns, starts,
    table, y)``, with ``codes`` (uint8) and ``columns`` one per stored value followed by
    :data:`LANES` entries of padding (zeros), ``starts`` (int32) where each of the
    ``out_features`` rows starts (and where the last ends), ``table`` :func:`kernel_table`.

    Only stored values are touched. For a batch that is a multiple of 16 the input is first
    transposed, so that each stored value multiplies 16 batch rows at once (one vector load
    of the transposed input). Other batches take a row's stored values 16 at a time: their
    codes looked up as :func:`table_linear` looks them up, their inputs loaded lane by lane,
    and the lanes past the row's end masked (the padding keeps their loads in bounds).
    With ``relu``, ``y`` is the ReLU of that."""
    n, k, b = out_features, in_features, batch
    entries = table_entries(table_size)
    vectors = b // LANES if b % LANES == 0 else 0  # batch vectors of 16 rows
    tile = next(t for t in (8, 4, 2, 1) if b % t == 0)
    tiles = 0 if vectors else b // tile  # batch tiles sharing each looked-up vector
    transposed = k * b if vectors else 1
    transpose_columns = k if vectors else 0
    tasks, per_task = split_tasks(n, n * k * b)
    lookup = vector_lookup(table_size)
    zero = T.broadcast(T.float32(0), LANES)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((b, k), "float32"),
        bias: T.Buffer((n,), "float32"),
        codes: T.handle,
        columns: T.handle,
        starts: T.Buffer((n + 1,), "int32"),
        table: T.Buffer((entries,), "float32"),
        y: T.Buffer((b, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        count = T.int32()
        code = T.match_buffer(codes, (count,), "uint8")
        column = T.match_buffer(columns, (count,), column_dtype)
        flat = T.decl_buffer((b * k,), "float32", data=x.data)
        xt = T.alloc_buffer((transposed,), "float32")
        for c in T.parallel(transpose_columns):
            for r in range(b):
                xt[c * b + r] = x[r, c]
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((max(1, vectors) * LANES,), "float32", scope="local")
            sums = T.alloc_buffer((tile * LANES,), "float32", scope="local")
            for member in range(per_task):
                o = T.meta_var(task * per_task + member)
                if o < n:  # the last task may hold fewer
                    for v in T.unroll(vectors):
                        acc[lanes(v * LANES)] = zero
                    for j in T.serial(starts[o], starts[o + 1]):
                        for v in T.unroll(vectors):
                            acc[lanes(v * LANES)] = acc[lanes(v * LANES)] + (
                                T.broadcast(table[T.Cast("int32", code[j])], LANES)
                                * xt[lanes(T.Cast("int32", column[j]) * b + v * LANES)]
                            )
                    for r in range(vectors * LANES):
                        y[r, o] = acc[r] + bias[o]
                        if relu:
                            y[r, o] = T.max(y[r, o], T.float32(0))
                    for outer in range(tiles):
                        for t in T.unroll(tile):
                            sums[lanes(t * LANES)] = zero
                        for v in range((starts[o + 1] - starts[o] + LANES - 1) // LANES):
                            j = T.meta_var(lanes(starts[o] + v * LANES))
                            inside = T.meta_var(j < T.broadcast(starts[o + 1], LANES))
                            w = T.meta_var(lookup(table, T.Cast("int32x16", code[j])))
                            at = T.meta_var(T.Cast("int32x16", column[j]))
                            for t in T.unroll(tile):
                                row = T.meta_var(T.broadcast((outer * tile + t) * k, LANES))
                                sums[lanes(t * LANES)] = sums[lanes(t * LANES)] + T.Select(
                                    inside, w * flat[row + at], zero
                                )
                        for t in T.unroll(tile):
                            y[outer * tile + t, o] = bias[o]
                            for lane in range(LANES):
                                y[outer * tile + t, o] = (
                                    y[outer * tile + t, o] + sums[t * LANES + lane]
                                )
                            if relu:
                                y[outer * tile + t, o] = T.max(y[outer * tile + t, o], T.float32(0))

    return kernel


def _blocks(positions: int) -> tuple[int, int, int]:
    """``(vectors a block, blocks, padded positions)`` of an output plane of ``positions``."""
    vectors = -(-positions // LANES)
    block = min(vectors, BLOCK)
    blocks = -(-vectors // block)
    return block, blocks, blocks * block * LANES


def _layout(
    image: tuple[int, int, int], geometry: tuple[tuple[int, int], ...]
) -> tuple[bool, int, int]:
    """How :func:`sparse_table_conv2d` lays out one image: (framed, the pitch of its output
    rows, floats a framed channel or an unfolded tap takes).

    Framed (stride and dilation 1): each channel framed by its zero padding, and output
    positions counted over the frame's width (a row's last ``kw - 1`` are computed and
    dropped), so that every tap reads the frame at a fixed offset: no unfolding. Otherwise
    one column per tap, its output positions in rows of the output's width."""
    (kh, kw), stride, (_, pw), dilation = geometry
    oh, ow = conv_output(image[1], image[2], geometry)
    if stride == (1, 1) and dilation == (1, 1):
        pitch = image[2] + 2 * pw
        return True, pitch, _blocks(oh * pitch)[2] + (kh - 1) * pitch + kw - 1
    return False, ow, _blocks(oh * ow)[2]


def unfolded(image: tuple[int, int, int], geometry: tuple[tuple[int, int], ...]) -> int:
    """Floats of the block :func:`sparse_table_conv2d` lays one image out in."""
    framed, _, per = _layout(image, geometry)
    return (image[0] if framed else image[0] * geometry[0][0] * geometry[0][1]) * per


def conv_output(height: int, width: int, geometry: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The output plane of a convolution of ``geometry`` ((kh, kw), stride, padding,
    dilation) over a ``height`` x ``width`` plane."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (
        width + 2 * pw - dw * (kw - 1) - 1
    ) // sw + 1


def epilogue_output(
    height: int, width: int, pool: tuple[tuple[int, int], tuple[int, int]] | None
) -> tuple[int, int]:
    """The plane a convolution's epilogue writes: its output plane, max-pooled by ``pool``
    ((kh, kw), (sh, sw), no padding) when given."""
    if pool is None:
        return height, width
    (kh, kw), (sh, sw) = pool
    return (height - kh) // sh + 1, (width - kw) // sw + 1


@functools.cache
def sparse_table_conv2d(
    batch: int,
    image: tuple[int, int, int],
    out_channels: int,
    geometry: tuple[tuple[int, int], ...],
    table_size: int,
    column_dtype: str,
    dense: bool = False,
    relu: bool = False,
    pool: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> Any:
    """The kernel of an ungrouped, zero-padded Conv2d whose weight is stored as CSR rows (one
    per output channel, columns ``c * kh * kw + dy * kw + dx``) of codes into a table: a
    scheduled PrimFunc taking ``(x, bias, codes, columns, scale, starts, table, y)`` as
    :func:`sparse_table_linear` does, for ``x`` of shape (batch, *image) (channels, height,
    width) and ``geometry`` ((kh, kw), stride, padding, dilation). With ``dense`` every row
    holds every column in order (a dense convolution's codes, row-major): ``columns`` is
    then never read (one entry will do).

    The epilogue computes what follows the convolution: each output channel's sums times
    ``scale`` plus ``bias`` (a batch norm folded in: ones and the bias without one), then
    ``pool`` ((kh, kw), (sh, sw)) a max pool without padding, then ``relu``. ``y`` has the
    pooled plane (:func:`epilogue_output`).

    Each image is laid out once in a scratch block (:func:`unfolded` floats): for stride and
    dilation 1 its channels framed by their zero padding, each tap then a fixed offset into
    its channel's frame; otherwise one column per kernel tap, copied from the frames (see
    :func:`_layout`). Output positions are padded to a whole number of blocks, so that each
    stored value multiplies 16 output positions at once, into registers that hold up to
    :data:`BLOCK` vectors of a channel's output plane, without bounds checks.
    Batches run images in parallel; one image runs its input channels, then its output
    channels, in parallel.
    """
    channels, height, width = image
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    oh, ow = conv_output(height, width, geometry)
    positions = oh * ow
    (qh, qw), (qsh, qsw) = pool or ((1, 1), (1, 1))
    yh, yw = epilogue_output(oh, ow, pool)
    kept = yh * yw  # outputs a channel writes
    framed, pitch, per = _layout(image, geometry)
    # accumulator vectors in registers at a time, blocks of them, positions they cover
    block, blocks, padded = _blocks(oh * pitch)
    taps, n, b = channels * kh * kw, out_channels, batch
    entries = table_entries(table_size)
    images = b if b > 1 else 0  # a batch: one task per image
    single = 1 if b == 1 else 0  # one image: its taps, then its channels, in parallel
    tasks, per_task = split_tasks(n, n * taps * positions if single else 0)
    laid_out = unfolded(image, geometry)
    shared_size = laid_out if single else 1
    fh, fw = height + 2 * ph, width + 2 * pw  # a channel framed by its zero padding
    held_size = 1 if framed else fh * fw  # framed in place, or framed here to be unfolded
    zero = T.broadcast(T.float32(0), LANES)

    def tap(column: Any, j: Any, o: Any) -> Any:
        # where the taps of stored value ``j`` (of output channel ``o``) start in the block
        t = j - o * taps if dense else T.Cast("int32", column[j])
        if framed:
            return t // (kh * kw) * per + t % (kh * kw) // kw * fw + t % kw
        return t * per

    @T.macro
    def frame(x, held, i, plane, at):
        # channel ``plane`` of image ``i`` framed by its zero padding (then, framed, zeros up
        # to the last tap's reads), from ``held[at]`` on
        for fy in range(fh):
            for fx in range(fw):
                inside = T.meta_var(
                    (fy >= ph) & (fy < ph + height) & (fx >= pw) & (fx < pw + width)
                )
                held[at + fy * fw + fx] = T.if_then_else(
                    inside, x[i, plane, fy - ph, fx - pw], T.float32(0)
                )
        for rest in range(fh * fw, per if framed else fh * fw):
            held[at + rest] = T.float32(0)

    @T.macro
    def unfold_taps(held, cols, plane):
        for ky in range(kh):
            for kx in range(kw):
                tap = T.meta_var((plane * kh + ky) * kw + kx)
                for oy in range(oh):
                    for ox in range(ow):
                        cols[tap * per + oy * ow + ox] = held[
                            (oy * sh + ky * dh) * fw + ox * sw + kx * dw
                        ]
                for p in range(positions, padded):
                    cols[tap * per + p] = T.float32(0)

    @T.macro
    def unfold(x, held, cols, i, plane):
        # channel ``plane`` of image ``i`` framed by its zero padding, then (not framed) its
        # taps' columns copied from the frame without bounds checks
        if framed:
            frame(x, cols, i, plane, plane * per)
        else:
            frame(x, held, i, plane, 0)
            unfold_taps(held, cols, plane)

    @T.macro
    def channel(cols, acc, spill, row, code, column, starts, table, scale, bias, out, i, o):
        # A block of positions at a time: ``acc`` is only read at fixed lanes, so it stays in
        # registers; ``spill`` takes it out to the plane, whose last vector is partly past
        # the positions.
        for start in range(blocks):
            for v in T.unroll(block):
                acc[lanes(v * LANES)] = zero
            for j in T.serial(starts[o], starts[o + 1]):
                weight = T.meta_var(T.broadcast(table[T.Cast("int32", code[j])], LANES))
                for v in T.unroll(block):
                    at = T.meta_var(tap(column, j, o) + (start * block + v) * LANES)
                    acc[lanes(v * LANES)] = acc[lanes(v * LANES)] + weight * cols[lanes(at)]
            for v in T.unroll(block):
                at = T.meta_var(lanes((start * block + v) * LANES))
                spill[at] = acc[lanes(v * LANES)] * T.broadcast(scale[o], LANES) + T.broadcast(
                    bias[o], LANES
                )
                if relu:  # before the pool: the two commute
                    spill[at] = T.max(spill[at], zero)
        base = T.meta_var((i * n + o) * kept)
        if pool is None:
            for oy in range(oh):
                for ox in range(ow):
                    out[base + oy * ow + ox] = spill[oy * pitch + ox]
        else:  # the window's rows first (whole rows: vector lanes), then its columns
            for py in range(yh):
                for x in range(ow):
                    row[x] = spill[py * qsh * pitch + x]
                    for dy in T.unroll(qh - 1):
                        row[x] = T.max(row[x], spill[(py * qsh + dy + 1) * pitch + x])
                for px in range(yw):
                    out[base + py * yw + px] = row[px * qsw]
                    for dx in T.unroll(qw - 1):
                        out[base + py * yw + px] = T.max(
                            out[base + py * yw + px], row[px * qsw + dx + 1]
                        )

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((b, channels, height, width), "float32"),
        bias: T.Buffer((n,), "float32"),
        codes: T.handle,
        columns: T.handle,
        scale: T.Buffer((n,), "float32"),
        starts: T.Buffer((n + 1,), "int32"),
        table: T.Buffer((entries,), "float32"),
        y: T.Buffer((b, n, yh, yw), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        count, stored = T.int32(), T.int32()
        code = T.match_buffer(codes, (count,), "uint8")
        column = T.match_buffer(columns, (stored,), column_dtype)
        out = T.decl_buffer((b * n * kept,), "float32", data=y.data)
        for i in T.parallel(images):
            cols = T.alloc_buffer((laid_out,), "float32")
            acc = T.alloc_buffer((block * LANES,), "float32", scope="local")
            spill = T.alloc_buffer((padded,), "float32")
            row = T.alloc_buffer((ow,), "float32")
            held = T.alloc_buffer((held_size,), "float32")
            for plane in range(channels):
                unfold(x, held, cols, i, plane)
            for o in range(n):
                channel(cols, acc, spill, row, code, column, starts, table, scale, bias, out,
                        i, o)
        shared = T.alloc_buffer((shared_size,), "float32")
        for plane in T.parallel(channels * single):
            held = T.alloc_buffer((held_size,), "float32")
            unfold(x, held, shared, 0, plane)
        for task in T.parallel(tasks * single):
            acc = T.alloc_buffer((block * LANES,), "float32", scope="local")
            spill = T.alloc_buffer((padded,), "float32")
            row = T.alloc_buffer((ow,), "float32")
            for member in range(per_task):
                if task * per_task + member < n:  # the last task may hold fewer
                    channel(shared, acc, spill, row, code, column, starts, table, scale, bias,
                            out, 0, task * per_task + member)

    return kernel
