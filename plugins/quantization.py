"""`quantization`: store each value as a ``bits``-bit index into a small codebook.

Two ways to restrict a tensor while it trains (``mode``):

- ``kmeans``: trained weight sharing as in Deep Compression (Han et al. 2016). ``2**bits``
  centroids start evenly spaced over ``[min, max]`` of the tensor (the paper's linear
  initialisation), a few Lloyd iterations refine them, and each value is assigned to its
  nearest centroid. From then on the assignments are fixed and the codebook is the
  trainable parameter: the weight is ``codebook[assignment]``, so backprop sums the
  gradients of each cluster's weights into its centroid.
- ``uniform``: affine quantization on a grid of ``2**bits`` levels from ``min`` to ``max``
  of the tensor when it is restricted (scale and offset are fixed then,
  not learned; values that drift outside saturate). The latent float tensor keeps training
  through a straight-through estimator. ``bits=1`` is binarization as in BinaryConnect
  (Courbariaux et al. 2015): ``sign(w)`` (zero counts as positive) times a fixed scale,
  the mean ``|w|`` at apply time, as in XNOR-Net.

Either way the tensor holds at most ``2**bits`` distinct values, and :meth:`encode` stores
them exactly: the distinct float32 bit patterns as ``codebook`` and one index per element,
packed in ``bits`` bits (array ``indices``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import LoweredValue, Method, MethodConfig, ValueMethod
from autoshrink.packing import pack_bits, packed_size, unpack_bits

__all__ = ["Quantization", "QuantizationConfig", "SharedWeights", "UniformGrid", "kmeans_1d"]

#: Lloyd iterations at most; 1-D k-means on a linear initialisation settles quickly.
LLOYD_ITERATIONS = 20


class QuantizationConfig(MethodConfig):
    bits: int = Field(4, ge=1, le=8, description="bits per stored value (2**bits levels)")
    mode: Literal["kmeans", "uniform"] = Field(
        "kmeans", description="trained k-means codebook, or a fixed uniform grid (1 bit: binary)"
    )


def kmeans_1d(
    values: torch.Tensor, clusters: int, iterations: int = LLOYD_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids and the nearest-centroid assignment of each value (flattened).

    Centroids start evenly spaced over ``[min, max]``; a cluster that empties keeps its
    centroid. Nearest centroids are found by bisecting the midpoints of the sorted
    centroids, which needs ``O(n log k)`` work and no ``n x k`` distance matrix.
    """
    flat = values.detach().reshape(-1).float()
    if flat.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=flat.device)
        return torch.zeros(clusters, device=flat.device), empty
    centroids = torch.linspace(float(flat.min()), float(flat.max()), clusters, device=flat.device)
    assignment = _nearest(flat, centroids)
    for _ in range(iterations):
        counts = torch.bincount(assignment, minlength=clusters)
        sums = torch.zeros(clusters, dtype=torch.float64, device=flat.device)
        sums.index_add_(0, assignment, flat.double())  # float64: no drift on big layers
        means = (sums / counts.clamp(min=1)).float()
        centroids = torch.where(counts > 0, means, centroids).sort().values
        updated = _nearest(flat, centroids)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return centroids, assignment


def _nearest(flat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value (ties go lower)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(flat, midpoints)


class SharedWeights(nn.Module):
    """Parametrization for ``kmeans``: the tensor is ``codebook[assignment]``.

    The original tensor is ignored: ``codebook`` is the trainable parameter and
    ``assignment`` (a buffer) stays as k-means left it.
    """

    def __init__(self, codebook: torch.Tensor, assignment: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("assignment", assignment)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.assignment]


class UniformGrid(nn.Module):
    """Parametrization for ``uniform``: rounds to a fixed grid with a straight-through
    gradient. ``levels == 2`` is binarization: ``+scale`` for ``w >= 0``, else ``-scale``."""

    def __init__(self, low: float, scale: float, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.register_buffer("low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The grid value of each element of ``x`` (no gradient)."""
        x = x.detach()
        if self.levels == 2:
            return torch.where(x >= 0, self.scale, -self.scale).to(x.dtype)
        step = (x - self.low) / self.scale
        level = torch.nan_to_num(step).round().clamp(0, self.levels - 1)
        return (self.low + self.scale * level).to(x.dtype)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        # (x - x.detach()) is exactly zero, so the value is exactly the grid value; the
        # usual x + (q - x).detach() can miss q by a rounding error and so leave the grid.
        return (original - original.detach()) + self.quantize(original)


def _uniform(tensor: torch.Tensor, bits: int) -> UniformGrid:
    flat = tensor.detach().reshape(-1).double()
    levels = 1 << bits
    if flat.numel() == 0:
        return UniformGrid(0.0, 1.0, levels)
    if levels == 2:
        return UniformGrid(0.0, float(flat.abs().mean()), levels)
    low, high = float(flat.min()), float(flat.max())
    scale = (high - low) / (levels - 1)
    # A constant tensor has no range: any positive scale keeps every value at `low`.
    scale = scale if np.isfinite(np.float32(scale)) and np.float32(scale) > 0 else 1.0
    return UniformGrid(low, scale, levels)


class Quantization(ValueMethod):
    name = "quantization"
    summary = "k-means weight sharing (Deep Compression) or uniform/binary quantization"
    Config = QuantizationConfig

    def parametrization(self, tensor: torch.Tensor, config: QuantizationConfig) -> nn.Module:
        if config.mode == "uniform":
            return _uniform(tensor, config.bits)
        # The codebook replaces the tensor (SharedWeights ignores it; the engine freezes it).
        codebook, assignment = kmeans_1d(tensor, 1 << config.bits)
        return SharedWeights(codebook.to(tensor.dtype), assignment.reshape(tensor.shape))

    def encode(
        self, tensor: torch.Tensor, config: QuantizationConfig
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        flat = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
        # Distinct bit patterns rather than float values: -0.0 and 0.0 stay apart, so the
        # stored tensor is bit-identical, not merely equal.
        patterns, indices = np.unique(flat.view(np.uint32), return_inverse=True)
        if patterns.size > 1 << config.bits:
            raise ValueError(
                f"tensor holds {patterns.size} distinct values, more than {1 << config.bits} "
                f"({config.bits} bits); was `quantization` applied to it?"
            )
        codebook = patterns.view(np.float32).copy()
        return {"codebook": codebook, "indices": pack_bits(indices, config.bits)}, {}

    def decode(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        shape: tuple[int, ...],
        config: QuantizationConfig,
    ) -> torch.Tensor:
        codebook, packed = arrays.get("codebook"), arrays.get("indices")
        if codebook is None or codebook.dtype != np.float32 or codebook.ndim != 1:
            raise ValueError("a 1-D float32 codebook expected")
        if codebook.size > 1 << config.bits:
            raise ValueError(f"codebook of {codebook.size} values for {config.bits}-bit indices")
        count = int(np.prod(shape, dtype=np.int64))
        need = packed_size(count, config.bits)
        if packed is None or packed.dtype != np.uint8 or packed.size != need:
            got = None if packed is None else packed.size
            raise ValueError(f"{need} bytes of {config.bits}-bit indices expected, got {got}")
        indices = unpack_bits(packed, config.bits, count)
        if count and int(indices.max()) >= codebook.size:
            raise ValueError(f"index {int(indices.max())} outside a codebook of {codebook.size}")
        return torch.from_numpy(codebook[indices].reshape(shape))

    def lower(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        shape: tuple[int, ...],
        config: QuantizationConfig,
    ) -> LoweredValue:
        """The packed indices and the codebook as stored; each element is a table lookup of
        its ``bits``-bit index, decoded inside the kernel's loop."""
        from autoshrink.compiler.kernels import padded, unpack

        bits = config.bits
        count = int(np.prod(shape, dtype=np.int64))
        return LoweredValue(
            arrays={"codebook": arrays["codebook"], "indices": padded(arrays["indices"], bits)},
            element=lambda t, i: t["codebook"][unpack(t["indices"], bits, i)],
            table=arrays["codebook"],
            codes=unpack_bits(arrays["indices"], bits, count),
        )


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Quantization())
