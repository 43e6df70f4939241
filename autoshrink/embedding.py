"""What compressed embedding tables share: the refusal of forms no compressed table can
honour, and the fixed padding row.

``nn.Embedding(padding_idx=p)`` never trains row ``p``: it stays the fixed "pad" vector (zeros
unless set). A table whose rows are drawn from shared values (hashing) or factored (low rank)
cannot keep one row fixed, so such layers hold the row apart, exactly, and give it for every
token ``p``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from autoshrink.errors import UsageError
from autoshrink.methods import LayerCode

__all__ = ["PaddingRow", "check_embedding", "padding_from_code"]


def check_embedding(name: str, layer: nn.Module) -> None:
    """Raise UsageError, naming layer ``name``, for an Embedding no compressed table can
    stand in for: ``max_norm`` rescales the table in place on each call, and ``sparse``
    gradients are not supported by the fine-tuning optimizer (Adam)."""
    if not isinstance(layer, nn.Embedding):
        return
    if layer.max_norm is not None:
        raise UsageError(
            f"layer `{name}`: Embedding with `max_norm={layer.max_norm:g}` renormalises its "
            "table in place on every call, which a compressed table cannot do; build it "
            "with max_norm=None (renormalise the rows once before searching)"
        )
    if layer.sparse:
        raise UsageError(
            f"layer `{name}`: Embedding with `sparse=True` gives sparse gradients, which "
            "fine-tuning (Adam) does not take; build it with sparse=False"
        )


class PaddingRow(nn.Module):
    """The fixed row of token ``index``, given for that token in place of the computed row
    (and passing no gradient to what computed it)."""

    def __init__(self, index: int, row: torch.Tensor) -> None:
        super().__init__()
        self.index = index
        self.register_buffer("row", row.detach().clone().float())

    @classmethod
    def of(cls, layer: nn.Module) -> PaddingRow | None:
        """The padding row of ``layer`` (None unless an Embedding with ``padding_idx``)."""
        if not isinstance(layer, nn.Embedding) or layer.padding_idx is None:
            return None
        return cls(layer.padding_idx, layer.weight[layer.padding_idx])

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens == self.index).unsqueeze(-1), self.row, rows)

    def store(self, code: LayerCode) -> None:
        """Put the index and, unless it is all +0.0 (the usual pad, which then costs
        nothing), the row (float32, exact) into ``code``."""
        code.meta["padding_idx"] = self.index
        row = self.row.detach().cpu().numpy().astype(np.float32)
        if row.view(np.uint32).any():
            code.arrays["padding"] = row


def padding_from_code(code: LayerCode, template: nn.Module) -> PaddingRow | None:
    """The padding row stored by :meth:`PaddingRow.store`, checked against ``template``
    (ValueError when the code's padding does not match it; None for other layer types)."""
    if not isinstance(template, nn.Embedding):
        return None
    index, row = code.meta.get("padding_idx"), code.arrays.get("padding")
    if index != template.padding_idx or (row is not None and index is None):
        raise ValueError(f"code has padding_idx {index!r}, the layer {template.padding_idx!r}")
    if index is None:
        return None
    if row is None:
        row = np.zeros(template.embedding_dim, np.float32)
    if row.dtype != np.float32 or row.shape != (template.embedding_dim,):
        raise ValueError(f"a float32 padding row of {template.embedding_dim} values expected")
    return PaddingRow(index, torch.from_numpy(np.array(row)))
