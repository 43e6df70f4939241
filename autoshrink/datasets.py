"""Reading the datasets of the built-in tasks: Fashion-MNIST IDX files and sklearn's digits."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from autoshrink.errors import DataNotFoundError
from autoshrink.tasks import Split, TaskData

__all__ = ["fashion_mnist", "digits", "read_idx", "split_validation"]

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array; raises ValueError when it is malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path} holds {len(raw) - header} data bytes, expected {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_dir(data_dir: Path | None) -> Path:
    """The first folder holding the four Fashion-MNIST files: ``data_dir``,
    ``$AUTOSHRINK_DATA``, then Debian's ``dataset-fashion-mnist`` location."""
    candidates = [data_dir, os.environ.get("AUTOSHRINK_DATA"), DEBIAN_FASHION_MNIST]
    tried = []
    for candidate in candidates:
        if not candidate:
            continue
        folder = Path(candidate).expanduser()
        for sub in (folder, folder / "fashion-mnist"):
            if all((sub / name).is_file() for name in FASHION_MNIST_FILES.values()):
                return sub
        tried.append(str(folder))
    raise DataNotFoundError(
        f"Fashion-MNIST not found in {', '.join(tried)}: install it with "
        "`apt-get install dataset-fashion-mnist`, or pass `--data-dir` (or set AUTOSHRINK_DATA) "
        "to a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
    )


def split_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[Split, Split]:
    """A seeded random split of training data into (train, validation)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    n_val = int(round(len(y) * fraction))
    val, train = order[:n_val], order[n_val:]
    return Split(x[train], y[train]), Split(x[val], y[val])


def fashion_mnist(
    data_dir: Path | None, *, flatten: bool, val_fraction: float = 1 / 12, seed: int = 0
) -> TaskData:
    """Fashion-MNIST scaled to [0, 1]: 55,000 train, 5,000 validation, 10,000 test."""
    folder = fashion_mnist_dir(data_dir)
    arrays = {key: read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}

    def images(raw: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(raw.astype(np.float32) / 255.0)
        return x.reshape(len(x), -1) if flatten else x.unsqueeze(1)

    def labels(raw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(raw.astype(np.int64))

    train, val = split_validation(
        images(arrays["train_images"]), labels(arrays["train_labels"]), val_fraction, seed
    )
    test = Split(images(arrays["test_images"]), labels(arrays["test_labels"]))
    return TaskData(train=train, val=val, test=test)


def digits(*, seed: int = 0) -> TaskData:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled to [0, 1]:
    a seeded 60/20/20 split into train, validation and test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    rest, test = split_validation(x, y, 0.2, seed)
    train, val = split_validation(rest.x, rest.y, 0.25, seed + 1)
    return TaskData(train=train, val=val, test=test)
