"""`pruning`: magnitude pruning with sparse storage (Han et al. 2015, "Learning both Weights
and Connections for Efficient Neural Networks"; storage as in Deep Compression).

How many weights go is set by ``target``: ``"threshold"`` prunes ``|w| < threshold * std(w)``
(the std being the population standard deviation of the layer's trained weight), ``"sparsity"``
prunes the ``sparsity`` share of the layer's weights of smallest magnitude. When they go is set
by ``schedule``:

- ``"one-shot"``: all at once in :meth:`Pruning.build`; the fine-tune then retrains the rest.
- ``"iterative"``: Han et al.'s prune-retrain rounds. The fine-tune is cut into three rounds;
  each starts by pruning the smallest weights up to a third, two thirds, all of the target.
- ``"gradual"``: Zhu and Gupta's schedule (2017, "To prune, or not to prune"): the pruned share
  rises as ``s * (1 - (1 - t)^3)`` over the first 3/4 of the fine-tune, recomputed from the
  weights' current magnitudes at least every 1 % of the layer; the last quarter retrains.

With a schedule the built module starts with every weight stored and a mask (a buffer, not
stored in the artifact); :meth:`Pruning.step` tightens it and :meth:`Pruning.settle` keeps the
survivors only. A pruned weight is zeroed and stays pruned.

The built module keeps only the survivors as a trainable 1-D parameter ``survivors`` and their
flat positions in the dense weight as a buffer, so fine-tuning holds the mask by
construction and the value stage quantizes exactly the survivors. Forward scatters them into
a zero weight and calls the original layer's ``F.linear`` / ``F.conv2d`` / ``F.embedding``.
An Embedding's ``padding_idx`` row is held apart, exactly (:mod:`autoshrink.embedding`).

Positions are stored in whichever of two forms is smaller (``meta["positions"]``):

- ``"bitmask"``: one bit per dense weight, packed with :func:`autoshrink.packing.pack_bits`
  (array ``mask``).
- ``"relative"``: one ``uint8`` per survivor (array ``relative``) holding the number of
  pruned weights skipped since the previous survivor (the first counts from the start), so
  position ``i`` is ``sum(relative[:i+1] + 1) - 1``. A run of more than 255 pruned weights
  does not fit; as in Deep Compression, a zero-valued *filler* survivor is inserted every
  256th place of such a run. Fillers are real entries of ``survivors`` (they start at 0.0 and
  may train like any survivor), so decoding needs no special case and stays exact.

The choice is made once the survivors are known (:meth:`Pruning.build`, or
:meth:`Pruning.settle` with a schedule; fillers exist only for the relative form), comparing
``ceil(n/8) + 4k`` with ``5(k + f)`` bytes for ``n`` weights, ``k`` survivors and ``f``
fillers, i.e. with float32 values. :meth:`Pruning.encode` re-derives it from the positions
alone, with the same result. The bias is stored as a float32 array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from autoshrink import hookimpl
from autoshrink.methods import LayerCode, LoweredLayer, Method, MethodConfig, StructureMethod
from autoshrink.structure_kit import (
    PaddingRow,
    bias_arrays,
    check_code_shape,
    conv2d,
    keep_conv_geometry,
    pack_bits,
    packed_size,
    padding_from_code,
    payloads,
    store_bias,
    stored_bias,
    stored_payload,
    unpack_bits,
)

__all__ = ["Pruned", "Pruning", "PruningConfig", "relative_positions", "with_fillers"]

#: The longest run of pruned weights one ``uint8`` relative index can skip.
MAX_SKIP = 255


#: Rounds of prune-and-retrain of the ``iterative`` schedule.
ROUNDS = 3
#: Share of the fine-tune over which the ``gradual`` schedule prunes.
GRADUAL_SPAN = 0.75


class PruningConfig(MethodConfig):
    target: Literal["threshold", "sparsity"] = Field(
        "threshold", description="what sets how many weights go: `threshold` or `sparsity`"
    )
    threshold: float = Field(
        1.0, ge=0.0, le=3.0,
        description="with target=threshold: prune |w| < threshold * std(layer weight)",
    )
    sparsity: float = Field(
        0.9, ge=0.0, le=0.99,
        description="with target=sparsity: the share of the layer's weights pruned",
    )
    schedule: Literal["one-shot", "iterative", "gradual"] = Field(
        "one-shot", description="prune at once, in 3 prune-retrain rounds, or gradually"
    )


def with_fillers(positions: np.ndarray) -> np.ndarray:
    """Sorted ``positions`` plus filler positions so that no gap skips more than 255.

    A run of ``s`` pruned weights before a survivor gets ``s // 256`` fillers, at every 256th
    place of the run; each then skips at most 255 weights.
    """
    positions = np.asarray(positions, dtype=np.int64)
    previous = np.concatenate([[-1], positions[:-1]])
    fills = (positions - previous - 1) // (MAX_SKIP + 1)
    total = int(fills.sum())
    if total == 0:
        return positions
    # The j-th filler (j = 1, 2, ...) of a run sits 256*j places after the run's start.
    starts = np.repeat(previous, fills)
    j = np.arange(total) - np.repeat(np.cumsum(fills) - fills, fills) + 1
    return np.sort(np.concatenate([positions, starts + (MAX_SKIP + 1) * j]))


def relative_positions(positions: np.ndarray) -> np.ndarray | None:
    """The relative (skip-count) form of sorted ``positions`` as ``uint8``, or ``None`` when
    some gap skips more than 255 weights."""
    positions = np.asarray(positions, dtype=np.int64)
    skips = np.diff(positions, prepend=-1) - 1
    if skips.size and int(skips.max()) > MAX_SKIP:
        return None
    return skips.astype(np.uint8)


def _survivors(weight: torch.Tensor, threshold: float) -> np.ndarray:
    """Flat positions of the weights with ``|w| >= threshold * std(w)``."""
    flat = weight.detach().float().reshape(-1)
    std = flat.std(correction=0) if flat.numel() > 1 else flat.new_zeros(())
    keep = flat.abs() >= threshold * std
    return torch.nonzero(keep).reshape(-1).cpu().numpy().astype(np.int64)


def _largest(magnitudes: torch.Tensor, count: int) -> np.ndarray:
    """Sorted flat positions of the ``count`` largest of ``magnitudes``."""
    top = torch.topk(magnitudes.reshape(-1), count, sorted=False).indices
    return np.sort(top.cpu().numpy().astype(np.int64))


def _final_survivors(weight: torch.Tensor, config: PruningConfig) -> np.ndarray:
    """The positions the target keeps, judged on ``weight``."""
    if config.target == "threshold":
        return _survivors(weight, config.threshold)
    numel = weight.numel()
    return _largest(weight.detach().float().abs(), numel - int(config.sparsity * numel))


def pruned_share(schedule: str, final: float, progress: float) -> float:
    """The share of a layer's weights a ``schedule`` has pruned at ``progress`` (0 at build,
    1 at the end of the fine-tune), ``final`` being the target's share."""
    if schedule == "iterative":
        return final * min(ROUNDS, int(progress * ROUNDS) + 1) / ROUNDS
    if schedule == "gradual":
        return final * (1.0 - (1.0 - min(1.0, progress / GRADUAL_SPAN)) ** 3)
    return final


class Pruned(nn.Module):
    """A Linear, Conv2d or Embedding layer whose weight is zero except at ``positions``.

    ``survivors`` (trainable) holds the weights at ``positions`` (a buffer of flat indices into
    the dense weight); ``bias`` is the original layer's, trainable too. ``pad_row`` is an
    Embedding's fixed padding row, if it has one.
    """

    def __init__(
        self,
        layer: nn.Module,
        positions: torch.Tensor,
        values: torch.Tensor,
        padding: PaddingRow | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layer, nn.Linear | nn.Conv2d | nn.Embedding):
            raise TypeError(f"cannot prune {type(layer).__name__}")
        self.kind = type(layer).__name__.lower()
        self.pad_row = padding
        self.weight_shape = tuple(layer.weight.shape)
        if isinstance(layer, nn.Conv2d):
            keep_conv_geometry(self, layer)
        # Not called `values`: parametrize keeps its tensors in a ModuleDict, whose `values`
        # method would clash with a value method's parametrization of that name.
        self.survivors = nn.Parameter(values.detach().clone().reshape(-1))
        self.register_buffer("positions", positions.detach().clone().to(torch.int64))
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        # While a schedule prunes: 1.0 for the stored weights still alive, and how many the
        # target keeps in the end (see Pruning.step / Pruning.settle).
        self.register_buffer("alive", None, persistent=False)
        self.goal = positions.numel()

    @property
    def numel(self) -> int:
        """The number of weights of the dense layer."""
        return int(np.prod(self.weight_shape))

    def dense_weight(self) -> torch.Tensor:
        """The dense weight: survivors at their places, zeros elsewhere (differentiable)."""
        values = self.survivors if self.alive is None else self.survivors * self.alive
        flat = values.new_zeros(self.numel).scatter(0, self.positions, values)
        return flat.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dense_weight()
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        if self.kind == "embedding":
            rows = F.embedding(x, weight)
            return rows if self.pad_row is None else self.pad_row(x, rows)
        return conv2d(self, x, weight, self.bias)

    def keep(self, survivors: np.ndarray) -> None:
        """Store only the sorted flat ``survivors`` (a subset of the stored positions), in
        the smaller position form; their values are kept, fillers start at 0.0."""
        stored = _stored_positions(survivors, self.numel)
        dense = self.dense_weight().detach().reshape(-1)
        values = torch.zeros(stored.size, dtype=dense.dtype, device=dense.device)
        kept = torch.from_numpy(np.isin(stored, survivors)).to(dense.device)
        index = torch.from_numpy(stored).to(dense.device)
        values[kept] = dense[index[kept]]
        self.survivors = nn.Parameter(values)
        self.positions = index
        self.alive, self.goal = None, survivors.size

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.weight_shape}, kept={self.positions.numel()}"


def _stored_positions(survivors: np.ndarray, numel: int) -> np.ndarray:
    """The positions to store for ``survivors``: themselves for a bitmask, or with fillers
    for the relative form, whichever costs fewer bytes with float32 values (a bitmask and
    ``k`` values, or one byte and one value per stored position)."""
    padded = with_fillers(survivors)
    mask_bytes = packed_size(numel, 1) + 4 * survivors.size
    return padded if 5 * padded.size < mask_bytes else survivors


def _mask_is_smaller(count: int, numel: int) -> bool:
    """Whether a bitmask beats relative indices for ``count`` stored positions (fillers
    included) that fit the relative form."""
    return packed_size(numel, 1) <= count


class Pruning(StructureMethod):
    name = "pruning"
    summary = "magnitude pruning, survivors stored sparsely (Han et al. 2015)"
    Config = PruningConfig
    applies_to = (nn.Linear, nn.Conv2d, nn.Embedding)

    def build(self, layer: nn.Module, config: PruningConfig) -> nn.Module:
        weight = layer.weight.detach()
        everything = torch.arange(weight.numel(), device=weight.device)
        module = Pruned(layer, everything, weight.reshape(-1), PaddingRow.of(layer))
        survivors = _final_survivors(weight, config)
        if config.schedule == "one-shot":
            module.keep(survivors)
            return module
        module.alive = torch.ones_like(module.survivors.detach())
        module.goal = survivors.size
        self.step(module, config, 0.0)
        return module

    def step(self, module: nn.Module, config: PruningConfig, progress: float) -> None:
        if not isinstance(module, Pruned) or module.alive is None:
            return
        numel = module.numel
        final = 1.0 - module.goal / numel
        share = pruned_share(config.schedule, final, progress)
        count = max(module.goal, numel - int(share * numel))
        alive = int(module.alive.sum().item())
        # Recompute the mask when it moves by 1 % of the layer, and to land on the goal.
        if alive - count < max(1, numel // 100) and not (count == module.goal < alive):
            return
        with torch.no_grad():
            magnitudes = (module.survivors * module.alive).abs()
            module.alive.zero_()
            module.alive[torch.from_numpy(_largest(magnitudes, count)).to(magnitudes.device)] = 1
            module.survivors.mul_(module.alive)

    def settle(self, module: nn.Module, config: PruningConfig) -> None:
        if not isinstance(module, Pruned) or module.alive is None:
            return
        self.step(module, config, 1.0)
        alive = module.alive.bool().cpu().numpy()
        module.keep(module.positions.cpu().numpy()[alive])

    def payload_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("survivors",)

    def encode(self, module: nn.Module, config: PruningConfig) -> LayerCode:
        if not isinstance(module, Pruned):
            raise TypeError(f"`pruning` encodes modules it built, not {type(module).__name__}")
        if module.alive is not None:
            raise ValueError("a scheduled pruning is still running: settle the layer first")
        positions = module.positions.cpu().numpy()
        code = LayerCode(
            payloads=payloads(module, self.payload_names(module)),
            meta={"shape": list(module.weight_shape)},
        )
        relative = relative_positions(positions)
        if relative is not None and not _mask_is_smaller(positions.size, module.numel):
            code.arrays["relative"] = relative
            code.meta["positions"] = "relative"
        else:
            mask = np.zeros(module.numel, dtype=bool)
            mask[positions] = True
            code.arrays["mask"] = pack_bits(mask, 1)
            code.meta["positions"] = "bitmask"
        store_bias(module, code)
        if module.pad_row is not None:
            module.pad_row.store(code)
        return code

    def decode(self, code: LayerCode, template: nn.Module, config: PruningConfig) -> nn.Module:
        if not isinstance(template, nn.Linear | nn.Conv2d | nn.Embedding):
            raise ValueError(f"`pruning` cannot decode into {type(template).__name__}")
        shape = tuple(template.weight.shape)
        numel = int(np.prod(shape))
        check_code_shape(code, shape)
        positions = _decode_positions(code.arrays, code.meta, numel)
        values = stored_payload(code, "survivors", (positions.size,))
        bias = stored_bias(code, template)
        module = Pruned(
            template,
            torch.from_numpy(positions).to(template.weight.device),
            values.to(device=template.weight.device, dtype=template.weight.dtype),
            padding_from_code(code, template),
        )
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module

    def lower(
        self, code: LayerCode, template: nn.Module, config: PruningConfig
    ) -> LoweredLayer | None:
        """Rows in CSR form: each survivor's column (one byte when a row has at most 256
        columns, else two), a start per row, and the survivors in their value format;
        the kernel loops over a row's survivors only."""
        from autoshrink.compiler.kernels import index_dtype, sparse_layer, supports

        numel = int(np.prod(template.weight.shape))
        positions = _decode_positions(code.arrays, code.meta, numel)
        if not supports(template) or positions.size == 0:
            return None
        rows, row_size = template.weight.shape[0], numel // template.weight.shape[0]
        row_of, columns = np.divmod(positions, row_size)
        starts = np.searchsorted(row_of, np.arange(rows + 1)).astype(np.int32)
        width = int(np.diff(starts).max())
        arrays = {
            "columns": columns.astype(index_dtype(row_size)),
            "starts": starts,
            **bias_arrays(code),
        }
        return LoweredLayer(
            arrays=arrays,
            compute=lambda x, t, p: sparse_layer(
                x, template, p["survivors"], t["columns"], t["starts"], width, t.get("bias")
            ),
            rows=("columns", "starts", "survivors"),
        )


def _decode_positions(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], numel: int
) -> np.ndarray:
    """Flat positions from either stored form, checked to be increasing and in range."""
    form = meta.get("positions")
    if form == "bitmask":
        mask = arrays.get("mask")
        if mask is None or mask.dtype != np.uint8 or mask.size != packed_size(numel, 1):
            raise ValueError(f"a bitmask of {packed_size(numel, 1)} bytes expected")
        return np.flatnonzero(unpack_bits(mask, 1, numel)).astype(np.int64)
    if form == "relative":
        relative = arrays.get("relative")
        if relative is None or relative.dtype != np.uint8 or relative.ndim != 1:
            raise ValueError("a 1-D uint8 array of relative indices expected")
        # Each entry skips that many pruned weights, then stores one: strictly increasing.
        positions = np.cumsum(relative.astype(np.int64) + 1) - 1
        if positions.size and int(positions[-1]) >= numel:
            raise ValueError(f"relative indices reach position {positions[-1]} of {numel}")
        return positions
    raise ValueError(f"unknown position encoding {form!r}")


@hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    register(Pruning())
