"""Building blocks for compressed kernels: what a method's ``lower`` hook composes.

A compressed layer compiles into one TVM tensor expression (TE) whose inner loop reads the
stored form and rebuilds each weight element as it multiplies: the dense weight never exists,
in the file or in memory. A value method says how element ``i`` of a payload is rebuilt from
its arrays (:func:`unpack` helps with bit-packed codes); a structure method says where the
elements go (:func:`linear`, :func:`conv2d` take the weight as a function of its indices).
MetaSchedule then tunes the resulting loops like any other kernel.

Indices are ``int32`` expressions; weights are ``float32`` expressions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tvm import te, tirx

__all__ = [
    "bound",
    "constant",
    "conv2d",
    "conv_geometry",
    "dense_layer",
    "index_dtype",
    "lanes_of",
    "linear",
    "multiply32",
    "padded",
    "sparse_layer",
    "supports",
    "typed",
    "unpack",
]

Expr = Any  # a tvm PrimExpr
WeightFn = Callable[..., Expr]


def unpack(packed: te.Tensor, bits: int, index: Expr) -> Expr:
    """Value ``index`` (int32) of a stream written by :func:`autoshrink.packing.pack_bits`:
    little-endian bits, value ``i`` at bit ``i * bits``. Widths that do not divide 8 may
    straddle two bytes: their stream must carry one extra zero byte at the end (see
    :func:`padded`)."""
    position = index * bits
    byte = packed[position >> 3].astype(typed(index, "int32"))
    if 8 % bits:
        byte = byte | (packed[(position >> 3) + 1].astype(typed(index, "int32")) << 8)
    if bits == 8:
        # masked although a byte: with the bound, a table read at this code has the table as
        # its region, not a point at the code (which names a hash's let-bound variables
        # where the index is hashed, and then no GPU schedule takes the kernel)
        return byte & 255
    return (byte >> (position & 7)) & ((1 << bits) - 1)


def padded(packed: np.ndarray, bits: int) -> np.ndarray:
    """``packed`` with the extra byte :func:`unpack` reads for widths that do not divide 8."""
    return np.concatenate([packed, np.zeros(1, np.uint8)]) if 8 % bits else packed


def index_dtype(limit: int) -> type:
    """The narrowest unsigned dtype that holds indices below ``limit``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if limit <= np.iinfo(dtype).max + 1:
            return dtype
    raise ValueError(f"indices up to {limit} do not fit 32 bits")


# --- Expressions that work in one lane or many ---------------------------------------------
#
# A method's ``element`` (see ``LoweredLayer.element``) is called with a scalar int32 index
# inside a TE kernel and with a vector of 16 indices inside the decoding kernel
# (:mod:`autoshrink.compiler.decoded`); these helpers keep one definition for both.
#
# TVM 0.27 emits integer arithmetic with LLVM's no-wrap flags (`mul nuw` for unsigned, `nsw`
# for signed), so an integer product that wraps is undefined and may come out wrong. A 32-bit
# product modulo 2**32 is therefore taken in 64 bits, where it cannot wrap, and truncated
# (:func:`multiply32`).


def lanes_of(expr: Expr) -> int:
    """How many lanes ``expr`` has (1 for a scalar)."""
    import tvm

    return int(tvm.DataType(str(expr.ty)).lanes)


def typed(like: Expr, dtype: str) -> str:
    """``dtype`` with as many lanes as ``like``: ``"uint32"`` or ``"uint32x16"``."""
    lanes = lanes_of(like)
    return dtype if lanes == 1 else f"{dtype}x{lanes}"


def constant(like: Expr, value: int | float, dtype: str) -> Expr:
    """``value`` as ``dtype``, broadcast to as many lanes as ``like``."""
    scalar = tirx.const(value, dtype)
    lanes = lanes_of(like)
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def bound(value: Expr, then: Callable[[Expr], Expr]) -> Expr:
    """``then(value)`` with ``value`` bound to a variable once: a hash reads each of its
    stages several times, and unbound the expression tree would double at every stage."""
    var = tirx.Var("v", value.ty)
    return tirx.Let(var, value, then(var))


def multiply32(value: Expr, factor: int) -> Expr:
    """``value * factor`` modulo 2**32 for a uint32 ``value`` and ``factor < 2**32``."""
    wide = value.astype(typed(value, "uint64")) * constant(value, factor, "uint64")
    return wide.astype(typed(value, "uint32"))


def _with_bias(y: te.Tensor, bias: te.Tensor | None, name: str) -> te.Tensor:
    """``y`` plus ``bias`` along axis 1 (a stage of its own: TE keeps reductions on top)."""
    if bias is None:
        return y
    return te.compute(y.shape, lambda b, o, *rest: y[(b, o, *rest)] + bias[o], name=name)


def linear(
    x: te.Tensor, weight: WeightFn, out_features: int, bias: te.Tensor | None = None,
    name: str = "linear",
) -> te.Tensor:
    """``y[b, o] = sum_i x[b, i] * weight(o, i) (+ bias[o])`` for ``x`` of shape (B, in)."""
    batch, features = x.shape
    i = te.reduce_axis((0, features), name="i")
    y = te.compute(
        (batch, out_features), lambda b, o: te.sum(x[b, i] * weight(o, i), axis=i), name=name
    )
    return _with_bias(y, bias, f"{name}_bias")


def conv2d(
    x: te.Tensor,
    weight: WeightFn,
    out_channels: int,
    kernel: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    bias: te.Tensor | None = None,
    name: str = "conv2d",
) -> te.Tensor:
    """A zero-padded, ungrouped 2-D convolution of ``x`` (B, C, H, W) whose weight element
    ``(o, c, r, t)`` is ``weight(o, c, r, t)``."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    source, (batch, channels, out_h, out_w) = _padded_input(x, kernel, stride, padding, dilation)
    c = te.reduce_axis((0, channels), name="c")
    r = te.reduce_axis((0, kh), name="r")
    t = te.reduce_axis((0, kw), name="t")
    y = te.compute(
        (batch, out_channels, out_h, out_w),
        lambda b, o, h, w: te.sum(
            source[b, c, h * sh + r * dh, w * sw + t * dw] * weight(o, c, r, t),
            axis=[c, r, t],
        ),
        name=name,
    )
    return _with_bias(y, bias, f"{name}_bias")


def _padded_input(x: te.Tensor, kernel, stride, padding, dilation) -> tuple[te.Tensor, tuple]:
    """``x`` zero-padded (a TE stage, inlined by the schedule) and the output's shape."""
    batch, channels, height, width = (int(s) for s in x.shape)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if not (ph or pw):
        return x, (batch, channels, out_h, out_w)
    source = te.compute(
        (batch, channels, height + 2 * ph, width + 2 * pw),
        lambda b, c, h, w: tirx.if_then_else(
            tirx.all(h >= ph, h < height + ph, w >= pw, w < width + pw),
            x[b, c, h - ph, w - pw],
            tirx.const(0.0, "float32"),
        ),
        name="pad",
    )
    return source, (batch, channels, out_h, out_w)


def supports(template: Any) -> bool:
    """Whether :func:`dense_layer` / :func:`sparse_layer` can compute a layer shaped like
    ``template``: a Linear, or an ungrouped zero-padded Conv2d with numeric padding."""
    from torch import nn

    if isinstance(template, nn.Linear):
        return True
    return (
        isinstance(template, nn.Conv2d)
        and template.groups == 1
        and template.padding_mode == "zeros"
        and not isinstance(template.padding, str)
    )


def conv_geometry(conv: Any) -> dict[str, tuple[int, int]]:
    """A Conv2d's kernel size, stride, padding and dilation, in that order."""
    return {
        "kernel": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": tuple(conv.padding),
        "dilation": tuple(conv.dilation),
    }


def dense_layer(
    x: te.Tensor, template: Any, element: Callable[[Expr], Expr], bias: te.Tensor | None,
    name: str = "layer",
) -> te.Tensor:
    """The layer ``template`` (see :func:`supports`) whose weight element at row-major flat
    index ``f`` is ``element(f)``: a Linear or a Conv2d of the template's geometry."""
    from torch import nn

    if isinstance(template, nn.Linear):
        features = template.in_features
        return linear(
            x, lambda o, i: element(o * features + i), template.out_features, bias, name
        )
    _, channels, kh, kw = template.weight.shape
    return conv2d(
        x,
        lambda o, c, r, t: element(((o * channels + c) * kh + r) * kw + t),
        template.out_channels,
        bias=bias,
        name=name,
        **conv_geometry(template),
    )


def sparse_layer(
    x: te.Tensor,
    template: Any,
    value: Callable[[Expr], Expr],
    columns: te.Tensor,
    starts: te.Tensor,
    width: int,
    bias: te.Tensor | None,
    name: str = "sparse",
) -> te.Tensor:
    """A layer shaped like ``template`` whose weight is sparse by rows (CSR): row ``o``
    (an output feature or channel) holds the stored values ``starts[o] .. starts[o+1]-1``,
    value ``j`` being ``value(j)`` at column ``columns[j]`` (for a conv, the flat index
    ``(c * kh + r) * kw + t`` of its tap). ``width`` is the longest row; shorter rows are
    masked, so no position or value is stored for what was pruned."""
    from torch import nn

    last = int(columns.shape[0]) - 1
    s = te.reduce_axis((0, max(1, width)), name="s")

    def entry(o: Expr) -> tuple[Expr, Expr]:
        j = tirx.min(starts[o] + s, last)
        return j, s < starts[o + 1] - starts[o]

    zero = tirx.const(0.0, "float32")
    if isinstance(template, nn.Linear):
        batch = x.shape[0]

        def row(b: Expr, o: Expr) -> Expr:
            j, inside = entry(o)
            term = value(j) * x[b, columns[j].astype("int32")]
            return te.sum(tirx.Select(inside, term, zero), axis=s)

        y = te.compute((batch, template.out_features), row, name=name)
        return _with_bias(y, bias, f"{name}_bias")
    geometry = conv_geometry(template)
    (kh, kw), (sh, sw), (dh, dw) = geometry["kernel"], geometry["stride"], geometry["dilation"]
    source, (batch, _, out_h, out_w) = _padded_input(x, **geometry)

    def pixel(b: Expr, o: Expr, h: Expr, w: Expr) -> Expr:
        j, inside = entry(o)
        column = columns[j].astype("int32")
        tap = column % (kh * kw)
        term = value(j) * source[
            b, column // (kh * kw), h * sh + (tap // kw) * dh, w * sw + (tap % kw) * dw
        ]
        return te.sum(tirx.Select(inside, term, zero), axis=s)

    y = te.compute((batch, template.out_channels, out_h, out_w), pixel, name=name)
    return _with_bias(y, bias, f"{name}_bias")
