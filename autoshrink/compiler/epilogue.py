"""What follows a compressed layer, computed in its kernel's epilogue.

A convolution block (convolution, batch norm, ReLU, max pool) compiled as written-out
kernels would run four kernels, each reading and writing the whole activation. Relax fuses
elementwise ops into the convolutions it generates itself, but not into an opaque kernel;
so the modules that follow a layer whose kernel takes an epilogue are found in the exported
graph, computed by that kernel, and replaced by identities before the model is lowered.

Only modules that are whole steps of a single chain are taken: each the only reader of the
value before it, called once in the model, and of a kind the epilogue computes: an eval-mode
BatchNorm2d with running statistics (folded to a scale and shift per channel, first only), a
ReLU, and a MaxPool2d without padding, dilation, ceiling mode or indices.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from autoshrink.compiler.export import KernelCall
from autoshrink.compiler.sparse import epilogue_output
from autoshrink.compress import replace_module

if TYPE_CHECKING:
    from autoshrink.compiler.lowering import LayerKernel

__all__ = ["Epilogue", "fuse_epilogues"]

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


def _absorb(epilogue: Epilogue, path: str, module: nn.Module) -> Epilogue | None:
    """``epilogue`` with ``module`` computed after it, or None when it cannot be."""
    if not epilogue.absorbed and (folded := _batch_norm(module)) is not None:
        return replace(epilogue, absorbed=(path,), scale=folded[0], shift=folded[1])
    absorbed = (*epilogue.absorbed, path)
    if isinstance(module, nn.ReLU) and not epilogue.relu:
        return replace(epilogue, absorbed=absorbed, relu=True)
    if (pool := _pool(module)) is not None and epilogue.pool is None:  # commutes with ReLU
        return replace(epilogue, absorbed=absorbed, pool=pool)
    return None


def _call(node: Any) -> tuple[str, str] | None:
    """The innermost module call a node of the exported graph belongs to: (the call's key,
    which differs for each call of one module, and the module's path)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((key, value[0]) for key, value in reversed(stack.items())) if stack else None


def _chain(model: nn.Module, start: Any, calls: Counter, groups: dict) -> Epilogue:
    """The epilogue of the modules that follow the graph node ``start`` in a single chain."""
    epilogue, value = Epilogue(), start
    while len(value.users) == 1:
        call = _call(next(iter(value.users)))
        if call is None or calls[call[1]] != 1:  # a module called more than once
            break
        group = groups[call]
        inside = {value, *group}
        reads = {arg for node in group for arg in node.all_input_nodes}
        if any(arg not in inside and arg.op != "placeholder" for arg in reads):
            break
        if any(user not in group for node in group[:-1] for user in node.users):
            break
        taken = _absorb(epilogue, call[1], model.get_submodule(call[1]))
        if taken is None:
            break
        epilogue, value = taken, group[-1]
    return epilogue


def find_epilogues(
    model: nn.Module, input_shape: tuple[int, ...], layers: set[str]
) -> dict[str, Epilogue]:
    """For each of ``layers`` (a :class:`KernelCall` in ``model``), the epilogue of the
    modules that follow it, where there are any."""
    names = {m.index: name for name, m in model.named_modules() if isinstance(m, KernelCall)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model, (torch.zeros(1, *input_shape),)).graph
    groups: dict[tuple[str, str], list[Any]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and (call := _call(node)) is not None:
            groups.setdefault(call, []).append(node)
    calls = Counter(path for _, path in groups)
    found = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.autoshrink.compiled_layer.default:
            continue
        name = names.get(node.args[1])
        if name in layers and (epilogue := _chain(model, node, calls, groups)).absorbed:
            found[name] = epilogue
    return found


def fuse_epilogues(
    model: nn.Module,
    kernels: dict[str, LayerKernel],
    outputs: dict[str, tuple[int, ...]],
    input_shape: tuple[int, ...],
    notes: list[str],
) -> None:
    """In ``model`` (its layers' :class:`KernelCall` s in place), let each kernel that takes
    an epilogue compute the modules that follow its layer, which become identities; one
    note each. (A convolution's kernel takes a whole block; a Linear's, a ReLU.)"""
    fusable = {name for name, kernel in kernels.items() if kernel.fused is not None}
    if not fusable:
        return
    for name, epilogue in find_epilogues(model, input_shape, fusable).items():
        kernel = kernels[name].fused(epilogue)
        if kernel is None:  # more than this kernel's epilogue computes
            continue
        shape = outputs[name]
        if epilogue.pool is not None:
            shape = (shape[0], *epilogue_output(*shape[1:], epilogue.pool))
        model.get_submodule(name).release()
        replace_module(model, name, KernelCall(kernel, shape))
        for path in epilogue.absorbed:
            replace_module(model, path, nn.Identity())
        notes.append(f"{name}: {epilogue.describe()} computed in its kernel's epilogue")
