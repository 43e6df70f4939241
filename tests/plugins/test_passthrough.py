"""The passthrough built-ins prove the method contract through the conformance kit."""

import torch
from torch import nn

from autoshrink.testing import StructureMethodTests, ValueMethodTests
from autoshrink_plugins.dense import Dense, PaddedTable
from autoshrink_plugins.floating import Float
from autoshrink_plugins.quantization import Quantization


class TestDense(StructureMethodTests):
    method = Dense()


class TestFloat(ValueMethodTests):
    method = Float()
    configs = [{"bits": 32}, {"bits": 16}]


def test_dense_table_keeps_its_pad_through_quantization() -> None:
    """k-means moves a zero row to its nearest centroid; the padding token still reads the
    table's pad, and a table without ``padding_idx`` stays a plain Embedding."""
    torch.manual_seed(0)
    dense, value = Dense(), Quantization()
    assert type(dense.build(nn.Embedding(30, 8), dense.config())) is nn.Embedding
    table = nn.Embedding(30, 8, padding_idx=2)
    module = dense.build(table, dense.config())
    assert isinstance(module, PaddedTable)
    value.apply(module, "weight", value.config({"bits": 2}))
    tokens = torch.tensor([[2, 5, 2, 7]])
    with torch.no_grad():
        assert module.weight[2].abs().min() > 0  # the stored table's pad row moved ...
        out = module(tokens)
        assert not out[0, 0].any() and not out[0, 2].any()  # ... what the pad token reads did not
        assert torch.equal(out[0, 1], module.weight[5])
        code = dense.encode(module, dense.config())
        assert torch.equal(dense.decode(code, nn.Embedding(30, 8, padding_idx=2),
                                        dense.config())(tokens), out)
