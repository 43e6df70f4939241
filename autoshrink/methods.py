"""The compression-method contract every plugin implements.

A method has a unique ``name``, a ``stage`` and a pydantic ``Config`` whose field bounds
(``ge``/``le``, ``Literal``, ``bool``) are its searchable ranges. The stage decides which
hooks of the contract it fills in:

- ``model``: changes the whole network before the per-layer stages (distillation).
- ``structure``: replaces one layer by a trainable compressed layer and encodes it into a
  :class:`LayerCode` (at most one per layer).
- ``value``: restricts a float tensor of a structure layer to storable values while it trains,
  and stores those values compactly (at most one per layer).
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

__all__ = [
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
    index) of the float32 payload, given ``arrays`` as TE tensors under the same keys.
    """

    arrays: dict[str, np.ndarray]
    element: Callable[[Mapping[str, Any], Any], Any]


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
    def apply(self, module: nn.Module, name: str, config: MethodConfig) -> None:
        """Make the parameter ``name`` of ``module`` take only storable values from now on
        (typically with ``torch.nn.utils.parametrize``), keeping it trainable."""

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
