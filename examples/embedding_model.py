"""An embedding model: a bag-of-tokens classifier trained on synthetic token data, compressed
with autoshrink.search, its best artifact loaded back and checked.

    python examples/embedding_model.py [TRIALS] [OUT] [SPACE]
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoshrink

args = sys.argv[1:] + [None] * 3
trials, out, space = int(args[0] or 16), args[1] or "reports", args[2] or "default"
VOCAB, CLASSES = 600, 4


def tokens(count: int, generator: torch.Generator) -> DataLoader:
    """Texts of 4-20 tokens, half from their class's quarter of the vocabulary; 0 pads."""
    y = torch.randint(0, CLASSES, (count,), generator=generator)
    x = torch.randint(1, VOCAB, (count, 20), generator=generator)
    own = 1 + y[:, None] * (VOCAB // CLASSES) + x % (VOCAB // CLASSES - 1)
    x = torch.where(torch.rand(x.shape, generator=generator) < 0.5, own, x)
    x = x * (torch.arange(20) < torch.randint(4, 21, (count, 1), generator=generator))
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


class BagOfTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 32, padding_idx=0), nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).sum(1) / (x != 0).sum(1, keepdim=True).clamp(min=1))


generator = torch.Generator().manual_seed(0)
train, val, test = (tokens(n, generator) for n in (4000, 500, 1000))
torch.manual_seed(0)
model = BagOfTokens()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for x, y in [*train, *train]:  # two epochs
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()

result = autoshrink.search(model.eval(), train=train, val=val, test=test, budget="6KB",
                           trials=trials, out=out, study="embedding", space=space)
small = autoshrink.load(result.best.artifact, model=BagOfTokens())
with torch.no_grad():
    right = sum(int((small(x).argmax(1) == y).sum()) for x, y in test)
table = result.best.plan.layer("embed")
print(f"{result.best.bytes:,} bytes, test accuracy {right / len(test.dataset):.2%}, "
      f"table: {table.structure.method} + {table.value.method}")
