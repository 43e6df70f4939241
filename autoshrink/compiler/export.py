"""The model exported to Relax with kernels in place of its compressed layers.

The model goes through ``torch.export`` with each such layer replaced by a
:class:`KernelCall`, a call of the custom operator ``autoshrink::compiled_layer``, which the
Relax importer turns into the layer's ``call_tir`` (:meth:`LayerKernel.emit
<autoshrink.compiler.layer_kernel.LayerKernel.emit>`).
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any

import torch
import tvm
from torch import nn

from autoshrink.compiler.build import entry

if TYPE_CHECKING:
    from autoshrink.compiler.layer_kernel import LayerKernel

__all__ = ["KernelCall", "to_relax_lowered"]

_KERNELS: dict[int, tuple[LayerKernel, tuple[int, ...]]] = {}
_COUNTER = itertools.count()


@torch.library.custom_op("autoshrink::compiled_layer", mutates_args=())
def _compiled_layer(x: torch.Tensor, index: int) -> torch.Tensor:
    raise RuntimeError("a compiled layer runs only inside TVM")


@_compiled_layer.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], *_KERNELS[index][1]))


class KernelCall(nn.Module):
    """Stands in for a layer during export: a call of its kernel (by a process-wide index)."""

    def __init__(self, kernel: LayerKernel, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.index = next(_COUNTER)
        _KERNELS[self.index] = (kernel, tuple(out_shape))

    def release(self) -> None:
        """Forget the kernel (when another call replaces this one)."""
        _KERNELS.pop(self.index, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.autoshrink.compiled_layer(x, self.index)


def _convert(node: Any, importer: Any) -> Any:
    kernel, _ = _KERNELS[node.args[1]]
    batch = int(node.args[0].meta["val"].shape[0])
    return kernel.emit(importer.block_builder, importer.env[node.args[0]], batch)


def to_relax_lowered(model: nn.Module, input_shape: tuple[int, ...], batches: list[int]) -> Any:
    """One IRModule with ``main_b<batch>`` per batch size for a model whose layers are
    :class:`KernelCall` s (the rest exports as usual, its small tensors as constants)."""
    functions: dict[Any, Any] = {}
    calls = [m.index for m in model.modules() if isinstance(m, KernelCall)]
    try:
        for batch in batches:
            functions.update(_export(model, input_shape, batch))
    finally:
        for index in calls:  # the kernels' arrays are not needed once they are constants
            _KERNELS.pop(index, None)
    return tvm.IRModule(functions)


def _export(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> dict[Any, Any]:
    from tvm.relax.frontend.torch import from_exported_program

    with warnings.catch_warnings():  # torch.export's deprecation chatter
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.zeros(batch, *input_shape),))
        converted = from_exported_program(
            program, custom_convert_map={"compiled_layer.default": _convert}
        )
    functions = {}
    for var, function in converted.functions.items():
        if var.name_hint == "main":
            name = entry(batch)
            functions[tvm.ir.GlobalVar(name)] = function.with_attr("global_symbol", name)
        else:  # the kernels, named per layer, form and batch: no clashes across batches
            functions[var] = function
    return functions
