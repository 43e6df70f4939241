"""Compressed layers as the plain ``nn.Linear`` / ``nn.Conv2d`` they compute, read off by
probing, and BatchNorm folded into the layer before it: the dense form a compiler without
compressed kernels can take, and the form of the ``tvm_dense`` peer."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from autoshrink.compiler.timing import model_flops
from autoshrink.compress import replace_module
from autoshrink.errors import first_line

__all__ = ["RELATIVE_TOLERANCE", "densify", "fold_batchnorm", "layer_shapes"]

#: Outputs may differ from PyTorch's by this much times max(1, largest |output|).
RELATIVE_TOLERANCE = 1e-4

def _is_compressed_layer(module: nn.Module) -> bool:
    """A layer module some method replaced: a parametrized Linear/Conv2d, or a leaf module
    with parameters whose class is not one of torch's own (plugin modules)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        return parametrize.is_parametrized(module)
    children = {name for name, _ in module.named_children()}
    # A parametrized module's class is made by torch on the fly; its base is the real one.
    kind = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    if children - {"parametrizations"} or kind.__module__.startswith("torch."):
        return False
    return any(True for _ in module.parameters())


def _linear_from_probe(module: nn.Module, features: int, bias: bool | None) -> nn.Linear:
    """The Linear that ``module`` is: bias = module(0), weight = (module(I) - module(0)).T."""
    columns = []
    with torch.no_grad():
        zero = module(torch.zeros(1, features))[0]
        for start in range(0, features, 1024):  # rows of the identity, 1024 at a time
            rows = torch.arange(start, min(start + 1024, features))
            eye = torch.zeros(len(rows), features)
            eye[torch.arange(len(rows)), rows] = 1.0
            columns.append(module(eye) - zero)
        weight = torch.cat(columns).T
    layer = nn.Linear(features, weight.shape[0], bias=bool(zero.any()) if bias is None else bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(zero)
    return layer


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_geometry(module: nn.Module, template: nn.Module | None, in_shape, out_shape) -> dict:
    """Kernel, stride, padding, dilation and groups of a conv-like layer: from the task's
    dense template layer when there is one, else from the module's own attributes (kernel
    size solved from the recorded input and output sizes)."""
    source = template if isinstance(template, nn.Conv2d) else module
    stride = _pair(getattr(source, "stride", 1))
    dilation = _pair(getattr(source, "dilation", 1))
    padding = getattr(source, "padding", 0)
    if isinstance(padding, str):
        if not isinstance(template, nn.Conv2d):
            raise ValueError(f"padding {padding!r} needs the dense template layer")
    else:
        padding = _pair(padding)
    if isinstance(template, nn.Conv2d):
        kernel = _pair(template.kernel_size)
        pads = tuple(template._reversed_padding_repeated_twice)  # left, right, top, bottom
    else:
        kernel = tuple(
            _solve_kernel(in_shape[2 + d], out_shape[2 + d], stride[d], padding[d], dilation[d])
            for d in (0, 1)
        )
        pads = (padding[1], padding[1], padding[0], padding[0])
    return {
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "pads": pads,
        "groups": int(getattr(source, "groups", 1)),
        "padding_mode": getattr(source, "padding_mode", "zeros"),
    }


def _solve_kernel(size: int, out: int, stride: int, pad: int, dilation: int) -> int:
    """The kernel extent k with out = (size + 2 pad - dilation (k - 1) - 1) // stride + 1;
    refuses to guess when the stride makes several extents fit."""
    fits = [
        k
        for k in range(1, size + 2 * pad + 1)
        if (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 == out
    ]
    if len(fits) != 1:
        raise ValueError(f"kernel size is ambiguous ({fits}); pass the dense template layer")
    return fits[0]


def _conv_from_probe(module: nn.Module, in_shape, out_shape, template) -> nn.Conv2d:
    """The Conv2d that ``module`` is, read off its responses to one-hot images.

    An output pixel whose receptive field lies inside the (unpadded) input sees exactly the
    kernel taps; a one-hot input at tap (c, r, t) of that field makes the pixel equal to
    bias + W[o, c, r, t], and a zero input gives the bias alone.
    """
    geo = _conv_geometry(module, template, in_shape, out_shape)
    (kh, kw), (sh, sw), (dh, dw) = geo["kernel"], geo["stride"], geo["dilation"]
    left, right, top, bottom = geo["pads"]
    c_in, c_out, groups = in_shape[1], out_shape[1], geo["groups"]
    i0, j0 = -(-top // sh), -(-left // sw)  # first output pixel clear of the top/left padding
    r0, c0 = i0 * sh - top, j0 * sw - left
    height, width = r0 + dh * (kh - 1) + 1 + bottom, c0 + dw * (kw - 1) + 1 + right
    probes = torch.zeros(c_in * kh * kw, c_in, height, width)
    index = torch.arange(c_in * kh * kw)
    c, rest = index // (kh * kw), index % (kh * kw)
    probes[index, c, r0 + dh * (rest // kw), c0 + dw * (rest % kw)] = 1.0
    with torch.no_grad():
        base = module(torch.zeros(1, c_in, height, width))[0, :, i0, j0]
        response = module(probes)[:, :, i0, j0] - base  # (c_in*kh*kw, c_out)
    full = response.T.reshape(c_out, groups, c_in // groups, kh, kw)
    weight = full[torch.arange(c_out), torch.arange(c_out) // (c_out // groups)]
    bias = template.bias is not None if isinstance(template, nn.Conv2d) else bool(base.any())
    conv = nn.Conv2d(
        c_in,
        c_out,
        (kh, kw),
        stride=geo["stride"],
        padding=geo["padding"],
        dilation=geo["dilation"],
        groups=groups,
        bias=bias,
        padding_mode=geo["padding_mode"],
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.copy_(base)
    return conv


def layer_shapes(
    model: nn.Module, names: list[str], example: torch.Tensor
) -> dict[str, tuple[torch.Size, torch.Size]]:
    """The input and output shapes of the named layers on one forward pass of ``example``
    (layers the pass does not reach are absent)."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            shapes[name] = (args[0].shape, output.shape)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def densify(
    model: nn.Module,
    example: torch.Tensor,
    templates: dict[str, nn.Module] | None = None,
    log: list[str] | None = None,
    *,
    keep_cheaper: bool = True,
) -> nn.Module:
    """A copy of ``model`` in which every compressed layer that costs at least as many FLOPs
    as a dense one (every one, without ``keep_cheaper``) is a plain ``nn.Linear`` /
    ``nn.Conv2d`` computing the same function.

    Works for any structure method's module, by probing: a layer fed 2-D inputs is read as
    W = (layer(I) - layer(0)).T, b = layer(0); one fed images as a convolution whose taps come
    from one-hot images (geometry from ``templates``, the task's dense layers by name, or the
    module's attributes). Every replacement is checked on random inputs; a layer that is not
    the affine map it seemed stays as it is. Layers that compute fewer FLOPs than their dense
    equivalent (low-rank factors below the break-even rank) are kept: that saving is the point
    of compiling them. ``log`` collects one line per decision.
    """
    notes = log if log is not None else []
    model = copy.deepcopy(model).eval()
    candidates = {
        name: module
        for name, module in model.named_modules()
        if name and ".parametrizations." not in f".{name}." and _is_compressed_layer(module)
    }
    shapes = layer_shapes(model, list(candidates), example)
    for name, module in candidates.items():
        if name not in shapes:
            continue  # not reached by the forward pass
        in_shape, out_shape = shapes[name]
        template = (templates or {}).get(name)
        try:
            if len(in_shape) == 4 and len(out_shape) == 4:
                dense: nn.Module = _conv_from_probe(module, in_shape, out_shape, template)
            elif len(in_shape) >= 2 and in_shape[:-1] == out_shape[:-1]:
                bias = template.bias is not None if isinstance(template, nn.Linear) else None
                dense = _linear_from_probe(module, in_shape[-1], bias)
            else:
                notes.append(f"{name}: kept ({type(module).__name__}, not a Linear/Conv2d shape)")
                continue
        except (ValueError, RuntimeError) as exc:
            notes.append(f"{name}: kept ({type(module).__name__}; cannot probe it: {exc})")
            continue
        x = torch.randn(min(int(in_shape[0]), 8), *in_shape[1:])
        with torch.no_grad():
            want, got = module(x), dense(x)
        error = float((want - got).abs().max())
        if error > RELATIVE_TOLERANCE * max(1.0, float(want.abs().max())):
            notes.append(f"{name}: kept ({type(module).__name__} is not affine: error {error:.2g})")
            continue
        saved, full = model_flops(module, x), model_flops(dense, x)
        if keep_cheaper and saved < full:
            share = f"{saved / full:.0%} of dense FLOPs"
            notes.append(f"{name}: kept {type(module).__name__} ({share})")
            continue
        replace_module(model, name, dense)
        notes.append(f"{name}: {type(module).__name__} -> dense {type(dense).__name__}")
    return model


def fold_batchnorm(model: nn.Module, log: list[str] | None = None) -> nn.Module:
    """``model`` with each eval-mode BatchNorm folded into the Conv2d/Linear before it (one
    kernel less each, for TVM and PyTorch alike); unchanged when torch.fx cannot trace it."""
    from torch.fx.experimental.optimization import fuse

    notes = log if log is not None else []
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not before:
        return model
    try:
        folded = fuse(model.eval())
    except Exception as exc:  # untraceable control flow: TVM fuses BatchNorm as an epilogue
        first = first_line(exc)
        notes.append(f"BatchNorm not folded ({first[:120]})")
        return model
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    notes.append(f"folded {before - after} BatchNorm layers")
    return folded

