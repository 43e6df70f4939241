"""Which modules after a compressed layer its kernel's epilogue computes, and the model
rewritten so that it does.

Relax fuses elementwise ops into the kernels it generates itself, but not into an opaque
``call_tir``; so the modules that follow a layer whose kernel takes an epilogue
(:mod:`autoshrink.compiler.epilogue`) are found in the exported graph, computed by that
kernel, and replaced by identities before the model is lowered. Only modules that are whole
steps of a single chain are taken: each the only reader of the value before it, called once
in the model, reading nothing else but its parameters.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoshrink.compiler.epilogue import Epilogue, absorb
from autoshrink.compiler.export import KernelCall
from autoshrink.compiler.sparse import epilogue_output
from autoshrink.compress import replace_module

if TYPE_CHECKING:
    from autoshrink.compiler.layer_kernel import LayerKernel

__all__ = ["find_epilogues", "fuse_epilogues"]


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
        taken = absorb(epilogue, call[1], model.get_submodule(call[1]))
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
