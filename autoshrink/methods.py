"""The compression-method contract every plugin implements.

A method has a unique ``name``, a ``stage`` and a pydantic ``Config`` whose field bounds
(``ge``/``le``, ``Literal``, ``bool``) are its searchable ranges. The stage decides which
hooks of the contract it fills in:

- ``model``: changes the whole network before the per-layer stages (distillation).
- ``structure``: replaces one layer by a trainable compressed layer and encodes it into a
  :class:`LayerCode` (at most one per layer).
- ``value``: restricts a float tensor of a structure layer to storable values while it trains
  (it gives a parametrization; the engine registers it, see :func:`restrict`), and stores
  those values compactly (at most one per layer).
- ``encoding``: losslessly codes the byte streams of the whole artifact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn.utils import parametrize

from autoshrink.errors import PluginError

__all__ = [
    "Columns",
    "EncodingMethod",
    "LayerCode",
    "LoweredLayer",
    "LoweredValue",
    "Method",
    "MethodConfig",
    "ModelMethod",
    "Stage",
    "StructureMethod",
    "ValueMethod",
    "payload_owner",
    "restrict",
]


class Stage(StrEnum):
    """Where in the compression of a model a method acts, in the order they apply."""

    MODEL = "model"
    STRUCTURE = "structure"
    VALUE = "value"
    ENCODING = "encoding"


class MethodConfig(BaseModel):
    """Base class for a method's knobs: every field needs a default and searchable bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerCode:
    """One compressed layer as the structure stage hands it to the value stage.

    ``payloads`` are float tensors the value stage may store in fewer bits (for example the
    K shared weights of a hashed layer). ``arrays`` are stored exactly as they are (indices,
    biases). ``meta`` is small JSON-serialisable information needed to rebuild the layer.
    """

    payloads: dict[str, torch.Tensor] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoweredValue:
    """A payload as a compiled kernel reads it (see :mod:`autoshrink.compiler.kernels`).

    ``arrays`` are stored in the compiled bundle as they are (packed codes, a codebook);
    ``element(tensors, i)`` is the TVM expression of element ``i`` (int32, row-major flat
    index) of the float32 payload, given ``arrays`` as TE tensors under the same keys. The
    index may also be a vector of int32 lanes and the arrays TIR buffers (see
    ``LoweredLayer.element``): write it with elementwise expressions and loads, and cast with
    ``autoshrink.compiler.kernels.typed``, which keeps the lanes.
    """

    arrays: dict[str, np.ndarray]
    element: Callable[[Mapping[str, Any], Any], Any]
    #: Optional: when element ``i`` is ``table[codes[i]]`` (``codes`` one integer per
    #: element, flat and row-major; ``table`` float32), the two as arrays. The compiler may
    #: then compute the layer with a table-lookup kernel (:mod:`autoshrink.compiler.vector`)
    #: that stores the codes in its own layout, instead of ``element``.
    table: np.ndarray | None = None
    codes: np.ndarray | None = None


@dataclass
class LoweredLayer:
    """A layer as one compiled kernel that reads its stored form.

    ``arrays`` are the layer's own arrays for the bundle (bias, sparse positions);
    ``compute(x, tensors, payloads)`` returns the TE tensor of the layer's output for the TE
    input ``x``, given ``arrays`` as TE tensors and, per payload name, a function from a flat
    element index to that payload's float32 element (the value stage's decoding, inlined).
    """

    arrays: dict[str, np.ndarray]
    compute: Callable[[Any, Mapping[str, Any], Mapping[str, Callable[[Any], Any]]], Any]
    #: Optional, for a Linear: the payloads that are, in order, the weights of the matrix
    #: products the layer is (each ``(out, in)``, row-major: ``("weight",)`` for a dense
    #: layer, ``("v", "u")`` for a low-rank one), the bias, if any, being ``arrays["bias"]``
    #: after the last; for a Conv2d: ``("weight",)``, the payload that is its whole weight
    #: (row-major). The compiler may then compute the layer from those payloads' tables and
    #: codes (see ``LoweredValue.table``).
    weights: tuple[str, ...] = ()
    #: Optional, for a Linear or Conv2d whose weight is stored as rows of survivors (CSR), a
    #: row per output (channel) over the flattened rest of the weight (``c * kh * kw + dy *
    #: kw + dx`` for a convolution): the names of the array of each survivor's column, the
    #: array of where each row starts (``out + 1`` entries, int32) and the payload of the
    #: survivors' values, the bias, if any, being ``arrays["bias"]``. The compiler may then
    #: compute the layer from that payload's table and codes with a sparse kernel of its own.
    rows: tuple[str, str, str] | None = None
    #: Optional, for a Linear: ``element(tensors, payloads)`` (the arguments of ``compute``)
    #: returns the function from a weight element's flat index (row-major ``(out, in)``,
    #: int32) to its float32 value, the bias, if any, being ``arrays["bias"]``. The index may
    #: also be a vector of 16 int32 lanes (then so is the value), and the tensors TIR buffers:
    #: the compiler then decodes the weight 16 rows at a time in vector lanes, inside a
    #: kernel of its own. Write it with elementwise expressions and loads only (the helpers
    #: of ``autoshrink.compiler.kernels`` take one lane or many).
    element: Callable[[Mapping[str, Any], Mapping[str, Callable[[Any], Any]]], Callable] | None = (
        None
    )
    #: Optional, beside ``element``: ``columns(tensors, payloads)`` returns the
    #: :class:`Columns` of a method that computes a column's 16 weights together more cheaply
    #: than one by one (hashed runs: one hash, one contiguous read). The decoding kernel then
    #: uses it instead of ``element``.
    columns: Callable[[Mapping[str, Any], Mapping[str, Callable[[Any], Any]]], Columns] | None = (
        None
    )


@dataclass
class Columns:
    """A Linear's weights a column of 16 rows at a time, in two steps: ``key(g, c)`` gives a
    32-bit integer for row group ``g`` (rows ``16g`` to ``16g + 15``) and column ``c``, int32
    ``c`` of one lane or 16 (then 16 keys: the kernel computes 16 columns' keys at once), and
    ``weights(g, key)`` the column's 16 weights, one float32x16 vector, from its scalar key
    (lanes past the last row may hold anything)."""

    key: Callable[[Any, Any], Any]
    weights: Callable[[Any, Any], Any]


class Method(ABC):
    """A compression method. Subclass one of the stage classes below, not this one."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: One line shown by ``autoshrink plugins``.
    summary: ClassVar[str] = ""

    def config(self, values: dict[str, Any] | None = None) -> MethodConfig:
        """Validate ``values`` against :attr:`Config` (missing knobs take their defaults)."""
        return self.Config(**(values or {}))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.stage})>"


class ModelMethod(Method):
    """Changes the whole network, e.g. distils the baseline into a narrower student."""

    stage = Stage.MODEL

    @abstractmethod
    def width(self, config: MethodConfig) -> float:
        """The width multiplier of the student the task's model factory should build."""

    @abstractmethod
    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        config: MethodConfig,
    ) -> torch.Tensor:
        """The training loss of the student given the baseline's outputs on the same batch."""


class StructureMethod(Method):
    """Replaces a layer by a compressed one that still trains by backprop."""

    stage = Stage.STRUCTURE
    #: Layer types this method can compress.
    applies_to: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)

    def applies(self, layer: nn.Module) -> bool:
        """Whether this method can compress ``layer``."""
        return isinstance(layer, self.applies_to)

    @abstractmethod
    def build(self, layer: nn.Module, config: MethodConfig) -> nn.Module:
        """A trainable compressed layer initialised from the trained ``layer``.

        It must accept the same inputs and give outputs of the same shape as ``layer``.
        """

    @abstractmethod
    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        """Dotted names of the float parameters of ``module`` the value stage may quantize."""

    @abstractmethod
    def encode(self, module: nn.Module, config: MethodConfig) -> LayerCode:
        """The stored form of a module built by :meth:`build` (and possibly fine-tuned)."""

    @abstractmethod
    def decode(self, code: LayerCode, template: nn.Module, config: MethodConfig) -> nn.Module:
        """Rebuild the module from its code; ``template`` is an untrained layer of the
        original type and shape. Must raise ``ValueError`` when the code does not fit it."""

    def step(self, module: nn.Module, config: MethodConfig, progress: float) -> None:
        """Optional: called after each optimizer step of the fine-tune that follows
        :meth:`build`, with the share of it done (``0 < progress <= 1``). A structure that
        tightens while it trains (gradual pruning) updates ``module`` in place here, keeping
        its parameters' shapes. The default does nothing."""

    def settle(self, module: nn.Module, config: MethodConfig) -> None:
        """Optional: called once when the structure's fine-tune is over (or skipped), before
        the value stage: bring ``module`` to its final structure in place (it may replace its
        parameters now). :meth:`encode` sees only settled modules. The default does nothing."""

    def lower(
        self, code: LayerCode, template: nn.Module, config: MethodConfig
    ) -> LoweredLayer | None:
        """Optional: the layer as a kernel that computes from its stored form (``code``
        holds the layer's meta and arrays; its payloads are lowered by the value method).
        ``None`` (the default) compiles the layer as the dense weight it decodes to."""
        return None


class ValueMethod(Method):
    """Stores float tensors in fewer bits (quantization) and trains under that restriction."""

    stage = Stage.VALUE

    @abstractmethod
    def parametrization(self, tensor: torch.Tensor, config: MethodConfig) -> nn.Module | None:
        """The module that keeps ``tensor`` (a payload, detached) to storable values while it
        trains: its ``forward`` maps the trained tensor to values :meth:`encode` stores
        exactly, and either lets gradients through to the tensor (straight-through) or
        ignores it and trains parameters of its own (a codebook; the engine then freezes the
        tensor). ``None`` leaves the tensor as it is. The engine registers it (:meth:`apply`)."""

    def apply(self, module: nn.Module, name: str, config: MethodConfig) -> None:
        """The engine's side: restrict the parameter ``name`` (dotted) of ``module`` with
        :meth:`parametrization` from now on (see :func:`restrict`). Not for plugins to
        override."""
        owner, attr = payload_owner(module, name)
        restrict(module, name, self.parametrization(getattr(owner, attr).detach(), config))

    @abstractmethod
    def encode(
        self, tensor: torch.Tensor, config: MethodConfig
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON metadata that store ``tensor`` exactly as it is now."""

    @abstractmethod
    def decode(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        shape: tuple[int, ...],
        config: MethodConfig,
    ) -> torch.Tensor:
        """The float32 tensor of ``shape`` stored by :meth:`encode`. Raise ``ValueError`` on
        inconsistent input."""

    def lower(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        shape: tuple[int, ...],
        config: MethodConfig,
    ) -> LoweredValue | None:
        """Optional: the stored form as a kernel reads it. ``None`` (the default) gives the
        kernel the decoded float32 values instead."""
        return None


class EncodingMethod(Method):
    """Losslessly codes each byte stream of an artifact (entropy coding)."""

    stage = Stage.ENCODING

    @abstractmethod
    def encode(self, data: bytes, config: MethodConfig) -> bytes:
        """The coded form of ``data``."""

    @abstractmethod
    def decode(self, data: bytes, config: MethodConfig, limit: int | None = None) -> bytes:
        """The original bytes; raise ``ValueError`` on corrupt input, and on output that
        would exceed ``limit`` bytes (the stream's dtype x shape), before allocating it: a
        file of a few KB must not be able to claim gigabytes."""



def _clashes(attr: str) -> bool:
    """Whether a tensor called ``attr`` cannot be parametrized: torch keeps a module's
    parametrizations in an ``nn.ModuleDict`` under ``parametrizations``, whose attributes
    (``values``, ``keys``, ``items``, ...) a tensor's name must not repeat."""
    return attr == "parametrizations" or hasattr(nn.ModuleDict(), attr)


def payload_owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule of ``module`` holding the float parameter ``name`` (dotted, as a
    structure's :meth:`~StructureMethod.payload_names` gives it) and its attribute name.

    Raises PluginError when there is no such parameter, or when its name cannot carry a
    value method's parametrization (``values``, ``keys``, ``items`` and the other attributes
    of ``nn.ModuleDict``): a structure method's conformance kit checks its names with this.
    """
    owner_name, _, attr = name.rpartition(".")
    try:
        owner: nn.Module | None = module.get_submodule(owner_name)
    except AttributeError:
        owner = None
    if owner is None or not (
        attr in owner._parameters or parametrize.is_parametrized(owner, attr)
    ):
        raise PluginError(f"payload `{name}` is not a parameter of {type(module).__name__}")
    if _clashes(attr):
        raise PluginError(
            f"payload `{name}` of {type(module).__name__} cannot take a value method: torch "
            f"keeps parametrizations in an nn.ModuleDict, which has an attribute `{attr}`; "
            "give the parameter another name"
        )
    return owner, attr


def restrict(module: nn.Module, name: str, parametrization: nn.Module | None) -> None:
    """Register ``parametrization`` on the parameter ``name`` (dotted) of ``module``, on the
    parameter's device (nothing when it is None). When no gradient reaches the parameter
    through it (its own parameters replace the tensor, as a k-means codebook does), the
    parameter is frozen, so that no optimizer keeps decaying a tensor that no longer counts.
    Raises PluginError as :func:`payload_owner` does."""
    owner, attr = payload_owner(module, name)
    if parametrization is None:
        return
    tensor = getattr(owner, attr)
    parametrization = parametrization.to(tensor.device)
    reads = _passes_gradient(parametrization, tensor)
    parametrize.register_parametrization(owner, attr, parametrization)
    if not reads:
        owner.parametrizations[attr].original.requires_grad_(False)


def _passes_gradient(parametrization: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether a gradient reaches ``tensor`` through ``parametrization`` (tried on a copy)."""
    probe = tensor.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = parametrization(probe)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return False
    (grad,) = torch.autograd.grad(out, probe, torch.ones_like(out), allow_unused=True)
    return grad is not None
