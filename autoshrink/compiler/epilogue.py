"""What a kernel computes after its layer's sums: its epilogue, and the modules it can take.

A convolution block (convolution, batch norm, ReLU, max pool) compiled as written-out
kernels would run four kernels, each reading and writing the whole activation; a kernel
whose epilogue takes the rest of the block writes it once. The kinds it takes: an eval-mode
BatchNorm2d with running statistics (folded to a scale and shift per channel, first only), a
ReLU, and a MaxPool2d without padding, dilation, ceiling mode or indices. Which modules of a
model follow a layer: :mod:`autoshrink.compiler.fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

__all__ = ["Epilogue", "absorb"]

Pool = tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Epilogue:
    """The steps a kernel computes after its layer's sums: ``sums * scale + shift`` per
    output channel (a batch norm; none: the sums), then ``pool``, then ``relu``."""

    absorbed: tuple[str, ...] = ()  # the modules it computes, in the model's order
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    pool: Pool | None = None
    relu: bool = False

    def describe(self) -> str:
        return ", ".join(f"`{name}`" for name in self.absorbed)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _pool(module: nn.Module) -> Pool | None:
    if not isinstance(module, nn.MaxPool2d) or module.return_indices or module.ceil_mode:
        return None
    if _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1):
        return None
    return _pair(module.kernel_size), _pair(module.stride or module.kernel_size)


def _batch_norm(module: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """A BatchNorm2d in eval mode with running statistics as (scale, shift), else None."""
    if not isinstance(module, nn.BatchNorm2d) or module.training:
        return None
    if module.running_mean is None or module.running_var is None:
        return None
    scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double()
    shift = -module.running_mean.double() * scale
    if module.bias is not None:
        shift = shift + module.bias.detach().double()
    return scale.float().numpy(), shift.float().numpy()


def absorb(epilogue: Epilogue, path: str, module: nn.Module) -> Epilogue | None:
    """``epilogue`` with ``module`` computed after it, or None when it cannot be."""
    if not epilogue.absorbed and (folded := _batch_norm(module)) is not None:
        return replace(epilogue, absorbed=(path,), scale=folded[0], shift=folded[1])
    absorbed = (*epilogue.absorbed, path)
    if isinstance(module, nn.ReLU) and not epilogue.relu:
        return replace(epilogue, absorbed=absorbed, relu=True)
    if (pool := _pool(module)) is not None and epilogue.pool is None:  # commutes with ReLU
        return replace(epilogue, absorbed=absorbed, pool=pool)
    return None
