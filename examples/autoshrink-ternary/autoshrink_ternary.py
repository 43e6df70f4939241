"""A value method that stores each weight as one of {-a, 0, +a} in two bits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from autoshrink import MethodConfig, ValueMethod, hookimpl
from autoshrink.methods import LoweredValue


class TernaryConfig(MethodConfig):
    threshold: float = Field(
        default=0.05, ge=0.0, le=0.5,
        description="weights below this fraction of the largest magnitude become zero",
    )


class Ternarize(nn.Module):
    """Forward: sign(w) * a where |w| > t, else 0; gradients pass straight through."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel() == 0:
            return w
        keep = w.abs() > self.threshold * w.abs().max()
        scale = w.abs()[keep].mean() if keep.any() else w.new_zeros(())
        # (w - w.detach()) is exactly zero but carries w's gradient: the result is exactly
        # the ternary value, which `w + (q - w).detach()` is not after float rounding.
        return (w - w.detach()) + (torch.sign(w) * keep * scale).detach()


class Ternary(ValueMethod):
    name = "ternary"
    summary = "ternary weights {-a, 0, +a}, two bits each"
    Config = TernaryConfig

    def parametrization(self, tensor: torch.Tensor, config: TernaryConfig) -> nn.Module:
        return Ternarize(config.threshold)

    def encode(self, tensor: torch.Tensor, config: TernaryConfig) -> tuple[dict, dict]:
        values = tensor.detach().reshape(-1).numpy()
        scale = float(np.abs(values).max()) if values.size else 0.0
        codes = np.where(values > 0, 1, np.where(values < 0, 2, 0)).astype(np.uint8)
        codes = np.pad(codes, (0, -len(codes) % 4)).reshape(-1, 4)
        packed = codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6
        return {"codes": packed.astype(np.uint8)}, {"scale": scale}

    def decode(
        self, arrays: dict[str, np.ndarray], meta: dict[str, Any], shape: tuple, config: Any
    ) -> torch.Tensor:
        codes = unpack(arrays["codes"], int(np.prod(shape)))
        signs = np.where(codes == 1, 1.0, np.where(codes == 2, -1.0, 0.0))
        scale = np.float32(meta["scale"])
        return torch.from_numpy((signs * scale).astype(np.float32).reshape(shape))


    def lower(
        self, arrays: dict[str, np.ndarray], meta: dict[str, Any], shape: tuple, config: Any
    ) -> LoweredValue:
        # The compiled form keeps the 2-bit codes; the kernel decodes each as it multiplies.
        from autoshrink.compiler.kernels import unpack as unpack_in_kernel

        scale = np.float32(meta["scale"])
        levels = np.array([0.0, scale, -scale, 0.0], dtype=np.float32)  # by 2-bit code
        return LoweredValue(
            arrays={"codes": arrays["codes"], "levels": levels},
            element=lambda t, i: t["levels"][unpack_in_kernel(t["codes"], 2, i)],
            # Every weight is levels[code]: the compiler may use its table-lookup kernel.
            table=levels,
            codes=unpack(arrays["codes"], int(np.prod(shape))),
        )


def unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` 2-bit codes of ``packed`` (four a byte, lowest bits first)."""
    if packed.size != -(-count // 4):
        raise ValueError(f"{-(-count // 4)} packed bytes expected, got {packed.size}")
    return np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:count]


@hookimpl
def register_methods(register):
    register(Ternary())
