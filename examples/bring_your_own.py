"""Bring your own model: train a small residual CNN on Fashion-MNIST through a DataLoader,
compress it with autoshrink.search, load the best artifact back and check it.

    python examples/bring_your_own.py [EXAMPLES] [TRIALS] [OUT]
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoshrink
from autoshrink.datasets import fashion_mnist

args = sys.argv[1:]
examples, trials = int((args + ["55000"])[0]), int((args[1:] + ["24"])[0])
out = (args[2:] + ["reports"])[0]


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        return self.head(F.max_pool2d(x + F.relu(self.block(x)), 2).flatten(1))


data = fashion_mnist(None, flatten=False)  # Debian's dataset-fashion-mnist, or AUTOSHRINK_DATA
train = DataLoader(TensorDataset(data.train.x[:examples], data.train.y[:examples]), 128, True)
test = DataLoader(TensorDataset(data.test.x, data.test.y), batch_size=1000)
torch.manual_seed(0)
model = ResidualCNN()
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
for x, y in train:  # one epoch
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()

result = autoshrink.search(model.eval(), train=train, test=test, budget="20KB", trials=trials,
                           out=out, study="bring-your-own")
small = autoshrink.load(result.best.artifact, model=ResidualCNN())
with torch.no_grad():
    right = sum(int((small(x).argmax(1) == y).sum()) for x, y in test)
print(f"{result.best.bytes:,} bytes, test accuracy {right / len(test.dataset):.2%}")
