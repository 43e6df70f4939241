"""The baseline: a task's trained reference model, trained once and cached.

The cache lives in the user's cache directory (``AUTOSHRINK_CACHE`` overrides it), keyed by a
hash of the task, its training settings, its data, and its metric and loss where they are not
the defaults (accuracy, cross-entropy): the cached figures are that metric's. The cached model
is stored as a dense float32 artifact, so the baseline's size is measured exactly as every
compressed model's is.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.errors import ArtifactError, UsageError
from autoshrink.plan import Plan
from autoshrink.tasks import Task, TaskData
from autoshrink.training import evaluate, fit, steps_for, task_loss

if TYPE_CHECKING:
    from autoshrink.registry import Registry

__all__ = ["Baseline", "cache_dir", "load_baseline"]


def cache_dir() -> Path:
    """Where autoshrink caches baselines and tuning databases."""
    return Path(os.environ.get("AUTOSHRINK_CACHE") or platformdirs.user_cache_dir("autoshrink"))


@dataclass
class Baseline:
    """A trained reference model and its measured size and task metric (``val_accuracy``
    and ``test_accuracy`` by their historic names, whatever the metric)."""

    task: Task
    model: nn.Module
    path: Path
    bytes: int
    val_accuracy: float
    test_accuracy: float | None  # None: no test data
    trained: bool  # False when it came from the cache or from the user's weights

    def summary(self) -> dict[str, object]:
        return {
            "task": self.task.name,
            "artifact": str(self.path),
            "bytes": self.bytes,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
        }


def _weights_key(weights: Path, task: Task) -> str:
    digest = hashlib.sha256(weights.read_bytes())
    for part, value in sorted(task.judging_key().items()):
        digest.update(f"{part}={value}".encode())
    return "weights-" + digest.hexdigest()[:16]


def _model_key(model: nn.Module, data: TaskData, task: Task) -> str:
    """The cache key of a user's trained model: its weights, the data's fingerprints and
    the task's metric (when not accuracy)."""
    digest = hashlib.sha256()
    for part, value in sorted(task.judging_key().items()):
        digest.update(f"{part}={value}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for split in (data.train, data.val, data.test):
        digest.update(split.fingerprint().encode() if split is not None else b"no test")
    return "model-" + digest.hexdigest()[:16]


def _load_weights(task: Task, weights: Path) -> nn.Module:
    model = task.build_model(1.0)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"`--weights` {weights}: not a readable safetensors file ({exc})") from exc
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"`--weights` {weights} do not fit task `{task.name}`: {first}") from exc
    return model


def load_baseline(
    task: Task,
    data: TaskData,
    registry: Registry,
    *,
    weights: Path | None = None,
    pretrained: nn.Module | None = None,
    retrain: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> Baseline:
    """The cached baseline of ``task``, training it first if needed (``on_step(done, total)``
    reports progress). ``weights`` is a safetensors state dict of the user's own trained
    model; ``pretrained`` is such a model itself (measured, never trained again)."""
    if pretrained is not None:
        key = _model_key(pretrained, data, task)
    else:
        key = _weights_key(weights, task) if weights else task.key(data)
    folder = cache_dir() / "baselines"
    path = folder / f"{task.name.replace(':', '_').replace('/', '_')}-{key}.safetensors"
    if path.exists() and not retrain:
        try:
            artifact = read_artifact(path, registry, task)
            info = artifact.header.info
            return Baseline(
                task=task,
                model=artifact.model,
                path=path,
                bytes=artifact.bytes,
                val_accuracy=float(info["val_accuracy"]),
                test_accuracy=(
                    None if info["test_accuracy"] is None else float(info["test_accuracy"])
                ),
                trained=False,
            )
        except (ArtifactError, KeyError):
            pass  # a damaged cache entry is simply rebuilt
    if pretrained is not None:
        model = copy.deepcopy(pretrained).float()
    elif weights is not None:
        model = _load_weights(task, weights)
    else:
        torch.manual_seed(task.training.seed)
        model = task.build_model(1.0)
        settings = task.training
        total = steps_for(settings.epochs, len(data.train), settings.batch_size)
        fit(
            model,
            data.train,
            steps=total,
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            seed=settings.seed,
            loss_fn=task_loss(task.loss),
            on_step=(lambda step, loss: on_step(step + 1, total)) if on_step else None,
        )
    model.eval()
    val = evaluate(model, data.val, task.metric)
    test = evaluate(model, data.test, task.metric) if data.test is not None else None
    info = {"val_accuracy": val, "test_accuracy": test, "key": key}
    size = write_artifact(path, model, Plan(), task, registry, info=info, overwrite=True)
    trained = weights is None and pretrained is None
    return Baseline(task, model, path, size, val, test, trained=trained)
