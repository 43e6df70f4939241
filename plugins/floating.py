"""`float`: store values as float32 or float16 (the value stage's passthrough choice)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import LoweredValue, Method, MethodConfig, ValueMethod


class FloatConfig(MethodConfig):
    bits: Literal[32, 16] = Field(32, description="float32 (exact) or float16 per value")


class RoundToHalf(nn.Module):
    """Rounds to float16 values in the forward pass; gradients pass straight through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exactly the float16 value (what `x + (q - x).detach()` is not, after rounding),
        # with x's gradient.
        return (x - x.detach()) + x.detach().half().float()


class Float(ValueMethod):
    name = "float"
    summary = "store values as float32 (exact) or float16"
    Config = FloatConfig

    def parametrization(self, tensor: torch.Tensor, config: FloatConfig) -> nn.Module | None:
        return RoundToHalf() if config.bits == 16 else None

    def encode(
        self, tensor: torch.Tensor, config: FloatConfig
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        dtype = np.float16 if config.bits == 16 else np.float32
        values = tensor.detach().float().numpy().astype(dtype).reshape(-1)
        return {"values": values}, {}

    def decode(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        shape: tuple[int, ...],
        config: FloatConfig,
    ) -> torch.Tensor:
        values = arrays.get("values")
        expected = np.float16 if config.bits == 16 else np.float32
        if values is None or values.dtype != expected or values.size != int(np.prod(shape)):
            raise ValueError(f"{int(np.prod(shape))} {np.dtype(expected).name} values expected")
        return torch.from_numpy(values.astype(np.float32).reshape(shape))

    def lower(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        shape: tuple[int, ...],
        config: FloatConfig,
    ) -> LoweredValue:
        """The values as stored (float16 widens to float32 as the kernel reads it)."""
        from autoshrink.compiler.kernels import typed

        return LoweredValue(
            arrays={"values": arrays["values"]},
            element=lambda t, i: t["values"][i].astype(typed(i, "float32")),
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Float())
