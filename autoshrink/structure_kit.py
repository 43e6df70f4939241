"""What every structure method repeats, in one place for plugin authors.

A structure method's module and hooks use these as the built-ins in ``plugins/`` do::

    __init__  self.bias = zero_bias(out_features if bias else None)
              keep_conv_geometry(self, conv)            # a conv-like module
    forward   conv2d(self, x, weight, self.bias)        # pads as the original conv did
    build     copy_bias(layer, module)
    encode    LayerCode(payloads=payloads(module, self.payload_names(module)), ...)
              store_bias(module, code)
    decode    check_code_shape(code, shape); bias = stored_bias(code, template)
              stored_payload(code, "shared", (k,))
    lower     LoweredLayer(arrays=bias_arrays(code), ...)

Also re-exported: bit packing (:func:`pack_bits`, :func:`unpack_bits`, :func:`packed_size`)
for index arrays, and an Embedding's fixed padding row (:class:`PaddingRow`,
:func:`padding_from_code`). Every check raises ``ValueError``, as ``decode`` must.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.embedding import PaddingRow, padding_from_code
from autoshrink.methods import LayerCode, payload_owner
from autoshrink.packing import pack_bits, packed_size, unpack_bits

__all__ = [
    "PaddingRow",
    "bias_arrays",
    "check_code_shape",
    "conv2d",
    "copy_bias",
    "keep_conv_geometry",
    "pack_bits",
    "packed_size",
    "padding_from_code",
    "payloads",
    "store_bias",
    "stored_bias",
    "stored_payload",
    "unpack_bits",
    "zero_bias",
]


def zero_bias(size: int | None) -> nn.Parameter | None:
    """A trainable zero bias of ``size`` values, or None for a layer without one."""
    return None if size is None else nn.Parameter(torch.zeros(size))


def copy_bias(layer: nn.Module, module: nn.Module) -> None:
    """Copy the trained ``layer``'s bias, if it has one, into ``module.bias``."""
    bias = getattr(layer, "bias", None)
    if bias is not None:
        with torch.no_grad():
            module.bias.copy_(bias)


def store_bias(module: nn.Module, code: LayerCode) -> None:
    """Put ``module``'s bias, if any, into ``code.arrays["bias"]`` (float32, exact)."""
    bias = getattr(module, "bias", None)
    if bias is not None:
        code.arrays["bias"] = bias.detach().cpu().numpy().astype(np.float32)


def stored_bias(code: LayerCode, template: nn.Module) -> torch.Tensor | None:
    """The bias :func:`store_bias` put into ``code``, checked against ``template``: both
    have one of the same shape, or neither has one (else ValueError)."""
    bias, expected = code.arrays.get("bias"), getattr(template, "bias", None)
    if expected is None:
        if bias is not None:
            raise ValueError(f"no bias expected for {type(template).__name__}, got one")
        return None
    if bias is None or bias.shape != tuple(expected.shape):
        got = None if bias is None else bias.shape
        raise ValueError(f"bias of shape {tuple(expected.shape)} expected, got {got}")
    return torch.from_numpy(np.asarray(bias, dtype=np.float32))


def bias_arrays(code: LayerCode) -> dict[str, np.ndarray]:
    """The stored bias as a lowered layer's arrays: ``{"bias": ...}``, or ``{}``."""
    return {"bias": code.arrays["bias"]} if "bias" in code.arrays else {}


def payloads(module: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Each payload (dotted parameter name) as the value stage leaves it (read as an
    attribute, so a value method's parametrization applies), detached, on the CPU."""
    found = {}
    for name in names:
        owner, attr = payload_owner(module, name)
        found[name] = getattr(owner, attr).detach().cpu().clone()
    return found


def stored_payload(code: LayerCode, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The payload ``name`` of ``code``, which must have ``shape`` (else ValueError)."""
    tensor = code.payloads.get(name)
    if tensor is None or tuple(tensor.shape) != tuple(shape):
        got = None if tensor is None else tuple(tensor.shape)
        raise ValueError(f"payload `{name}` of shape {tuple(shape)} expected, got {got}")
    return tensor


def check_code_shape(code: LayerCode, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``code.meta["shape"]`` is ``shape`` (the weight's shape, as
    an encoder that records it writes it)."""
    if code.meta.get("shape") != list(shape):
        raise ValueError(f"code is for a weight of shape {code.meta.get('shape')}, not {shape}")


def keep_conv_geometry(module: nn.Module, conv: nn.Conv2d) -> None:
    """Give ``module`` the stride, padding, dilation, groups and padding mode of ``conv``
    (as attributes of those names, which the compiler also reads), for :func:`conv2d`."""
    module.stride, module.padding, module.dilation = conv.stride, conv.padding, conv.dilation
    module.groups, module.padding_mode = conv.groups, conv.padding_mode
    # The explicit padding nn.Conv2d applies itself for non-"zeros" padding modes.
    module._pad = tuple(conv._reversed_padding_repeated_twice)


def conv2d(
    module: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d`` of ``x`` with the geometry :func:`keep_conv_geometry` gave ``module``,
    padding as the original conv did (explicitly for ``reflect``/``replicate``/``circular``)."""
    padding = module.padding
    if module.padding_mode != "zeros":
        x, padding = F.pad(x, module._pad, mode=module.padding_mode), 0
    return F.conv2d(x, weight, bias, module.stride, padding, module.dilation, module.groups)
