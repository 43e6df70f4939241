"""One layer as a kernel: the arrays it reads and how it computes, emitted into Relax.

A layer's arrays become Relax constants made once and shared by every batch entry, so the
library stores them once. Kernels are marked opaque, so fusion leaves them as they were
tuned (:mod:`autoshrink.compiler.choice` tunes them one by one). The compressed forms come
from :mod:`autoshrink.compiler.lowering`; the dense form, :func:`dense_kernel`, is built
here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from tvm import relax

from autoshrink.compiler.kernels import dense_layer, supports

if TYPE_CHECKING:
    from autoshrink.compiler.epilogue import Epilogue

__all__ = ["LayerKernel", "dense_kernel"]

#: TVM's op pattern "opaque": fusion leaves the kernel alone.
_OPAQUE = 8


@dataclass
class LayerKernel:
    """One layer as a kernel: the arrays it reads and its TE compute."""

    layer: str
    form: str  # "compressed" or "dense"
    methods: str  # "pruning + quantization", for the notes
    arrays: dict[str, np.ndarray]
    compute: Callable[[Any, dict[str, Any]], Any] | None  # (x, tensors by array name) -> y
    constants: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Written-out kernels instead of ``compute``, applied in turn: the layer's input shape
    #: (batch first) -> a list of (PrimFunc taking its input, the arrays named and its
    #: output; the output's shape past the batch; names). A step with a fourth entry, a
    #: name, gives a value (of exactly that shape) that later steps read under that name,
    #: instead of the layer's output.
    written: Callable[[tuple[int, ...]], list[tuple[Any, ...]]] | None = None
    #: For a kernel that can compute what follows its layer too: the kernel with that
    #: :class:`~autoshrink.compiler.epilogue.Epilogue`.
    fused: Callable[[Epilogue], LayerKernel | None] | None = None

    @property
    def bytes(self) -> int:
        """Bytes of the arrays the compiled library stores for this layer."""
        return sum(int(a.nbytes) for a in self.arrays.values())

    def relax_constants(self) -> list[Any]:
        """The arrays as Relax constants, in name order: made once, shared by every use."""
        if not self.constants:
            self.constants = {k: relax.const(self.arrays[k]) for k in sorted(self.arrays)}
        return list(self.constants.values())

    def emit(self, builder: Any, x: Any, batch: int) -> Any:
        """Emit ``call_tir`` of this kernel on ``x`` (a Relax expression) into ``builder``."""
        names = sorted(self.arrays)
        label = re.sub(r"\W", "_", self.layer)
        if self.written is not None:
            values = dict(zip(names, self.relax_constants(), strict=True))
            given = tuple(int(size) for size in x.ty.shape.values)
            for step, (kernel, shape, reads, *named) in enumerate(self.written(given)):
                function = builder.add_func(
                    kernel.with_attr("op_pattern", _OPAQUE),
                    f"{label}_{self.form}{step}_b{batch}",
                )
                args = [values[name] for name in reads]
                if named:  # a value the later steps read, not the layer's output
                    values[named[0]] = builder.emit(
                        relax.call_tir(function, [x, *args], relax.TensorType(shape, "float32"))
                    )
                    continue
                x = builder.emit(relax.call_tir(
                    function, [x, *args], relax.TensorType((batch, *shape), "float32")
                ))
            return x

        def compute(x: Any, *tensors: Any) -> Any:
            return self.compute(x, dict(zip(names, tensors, strict=True)))

        return builder.emit_te(
            compute,
            x,
            *self.relax_constants(),
            primfunc_name_hint=f"{label}_{self.form}_b{batch}",
            primfunc_attrs={"op_pattern": _OPAQUE},
        )


def dense_kernel(name: str, layer: nn.Module) -> LayerKernel | None:
    """A plain Linear / Conv2d as a kernel over its float32 weight (the dense form), or
    ``None`` when :func:`autoshrink.compiler.kernels.supports` does not cover it."""
    if not isinstance(layer, nn.Linear | nn.Conv2d) or not supports(layer):
        return None
    arrays = {"weight": layer.weight.detach().float().reshape(-1).numpy().copy()}
    if layer.bias is not None:
        arrays["bias"] = layer.bias.detach().float().numpy().copy()
    return LayerKernel(
        layer=name,
        form="dense",
        methods="dense float32",
        arrays=arrays,
        # The stage names are dense_layer's defaults, as in the built-in dense lowering: the
        # two kernels of a float32 layer are then the same workload with the same names
        # (MetaSchedule matches workloads ignoring names, and its traces name stages).
        compute=lambda x, t: dense_layer(x, layer, lambda f: t["weight"][f], t.get("bias")),
    )
