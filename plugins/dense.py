"""`dense`: the layer kept as it is (the structure stage's "no compression" choice)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import LayerCode, LoweredLayer, Method, MethodConfig, StructureMethod


class Dense(StructureMethod):
    name = "dense"
    summary = "keep the layer's weight matrix as it is"
    Config = MethodConfig

    def build(self, layer: nn.Module, config: MethodConfig) -> nn.Module:
        return copy.deepcopy(layer)

    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("weight",)

    def encode(self, module: nn.Module, config: MethodConfig) -> LayerCode:
        code = LayerCode(payloads={"weight": module.weight.detach().clone()})
        if module.bias is not None:
            code.arrays["bias"] = module.bias.detach().numpy().copy()
        return code

    def decode(self, code: LayerCode, template: nn.Module, config: MethodConfig) -> nn.Module:
        module = copy.deepcopy(template)
        weight = code.payloads.get("weight")
        if weight is None or weight.shape != module.weight.shape:
            raise ValueError(f"weight of shape {tuple(module.weight.shape)} expected")
        with torch.no_grad():
            module.weight.copy_(weight)
            if module.bias is not None:
                bias = code.arrays.get("bias")
                if bias is None or bias.shape != tuple(module.bias.shape):
                    raise ValueError(f"bias of shape {tuple(module.bias.shape)} expected")
                module.bias.copy_(torch.from_numpy(bias.astype("float32")))
        return module

    def lower(
        self, code: LayerCode, template: nn.Module, config: MethodConfig
    ) -> LoweredLayer | None:
        """A Linear / Conv2d whose weight elements come from the value stage as it reads
        them (codes stay codes); grouped or non-zero-padded convolutions stay dense."""
        from autoshrink.compile.kernels import dense_layer, supports

        if not supports(template):
            return None
        arrays = {"bias": code.arrays["bias"]} if "bias" in code.arrays else {}
        return LoweredLayer(
            arrays=arrays,
            compute=lambda x, t, p: dense_layer(x, template, p["weight"], t.get("bias")),
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Dense())
