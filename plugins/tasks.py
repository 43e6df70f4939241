"""Built-in tasks: Fashion-MNIST MLP (the default) and CNN, and sklearn's digits MLP."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

from torch import nn

from autoshrink import hookimpl
from autoshrink.datasets import digits, fashion_mnist
from autoshrink.tasks import Task, TrainingSettings


def scaled(width: float, channels: int) -> int:
    """A hidden width scaled by the multiplier, never below one unit."""
    return max(1, round(channels * width))


def mlp(inputs: int, hidden: tuple[int, ...], classes: int, width: float) -> nn.Module:
    """A ReLU multilayer perceptron with hidden widths scaled by ``width``."""
    layers: dict[str, nn.Module] = {}
    previous = inputs
    for number, units in enumerate(hidden, start=1):
        layers[f"fc{number}"] = nn.Linear(previous, scaled(width, units))
        layers[f"relu{number}"] = nn.ReLU()
        previous = scaled(width, units)
    layers["out"] = nn.Linear(previous, classes)
    return nn.Sequential(OrderedDict(layers))


def fashion_cnn(width: float) -> nn.Module:
    """Two 3x3 convolution blocks (BatchNorm, ReLU, max-pool) and a fully connected head."""
    c1, c2, fc = scaled(width, 32), scaled(width, 64), scaled(width, 512)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, c1, 3, padding=1),
            bn1=nn.BatchNorm2d(c1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, 3, padding=1),
            bn2=nn.BatchNorm2d(c2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(c2 * 7 * 7, fc),
            relu3=nn.ReLU(),
            out=nn.Linear(fc, 10),
        )
    )


@hookimpl
def register_tasks(register: Callable[[Task], None]) -> None:
    register(
        Task(
            name="fashion-mnist-mlp",
            description="Fashion-MNIST, MLP 784-1200-1200-10 (the default task)",
            build_model=partial(mlp, 784, (1200, 1200), 10),
            load_data=partial(fashion_mnist, flatten=True),
            input_shape=(784,),
            training=TrainingSettings(epochs=6, batch_size=128, lr=1e-3),
        )
    )
    register(
        Task(
            name="fashion-mnist-cnn",
            description="Fashion-MNIST, CNN 2x(conv3x3 BN ReLU pool) 32/64 + FC 512",
            build_model=fashion_cnn,
            load_data=partial(fashion_mnist, flatten=False),
            input_shape=(1, 28, 28),
            training=TrainingSettings(epochs=2, batch_size=128, lr=1e-3),
        )
    )
    register(
        Task(
            name="digits-mlp",
            description="scikit-learn's 8x8 digits, MLP 64-128-64-10 (fast tests and demos)",
            build_model=partial(mlp, 64, (128, 64), 10),
            load_data=lambda data_dir: digits(),
            input_shape=(64,),
            training=TrainingSettings(epochs=40, batch_size=64, lr=2e-3),
        )
    )
