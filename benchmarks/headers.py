"""Header bytes of artifacts in the current format (2: one packed tensor, compressed header)
against format 1 (a tensor per stream, plain JSON header), for the same streams.

    python benchmarks/headers.py

The plans are the shapes of typical front members: a low-rank + uniform MLP, a
Deep-Compression-style MLP, a hashed MLP and a pruned, quantized CNN. Header bytes are the
safetensors framing plus the header (:func:`autoshrink.artifact.size_breakdown`); the
weights are untrained, which does not change the header.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from autoshrink.artifact import size_breakdown, write_artifact
from autoshrink.compress import compress
from autoshrink.header import digest, read_header
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers
from autoshrink.registry import load_registry

REGISTRY = load_registry()


def every_layer(task: str, structure: tuple, value: tuple, codec: str | None = None) -> Plan:
    names = compressible_layers(REGISTRY.tasks[task].build_model(1.0), REGISTRY)
    layer = LayerPlan(structure=Choice(method=structure[0], config=structure[1]),
                      value=Choice(method=value[0], config=value[1]))
    encoding = Choice(method="entropy", config={"codec": codec}) if codec else None
    return Plan(layers={name: layer for name in names}, encoding=encoding)


CASES = [
    ("fashion-mnist-mlp", "low-rank 0.05 + uniform 4-bit",
     every_layer("fashion-mnist-mlp", ("lowrank", {"rank": 0.05}),
                 ("quantization", {"bits": 4, "mode": "uniform"}))),
    ("fashion-mnist-mlp", "pruning + 5-bit k-means + Huffman",
     every_layer("fashion-mnist-mlp", ("pruning", {"threshold": 1.75}),
                 ("quantization", {"bits": 5}), "huffman")),
    ("fashion-mnist-mlp", "hashing 1/64 + 8-bit k-means",
     every_layer("fashion-mnist-mlp", ("hashing", {"ratio": 1 / 64}),
                 ("quantization", {"bits": 8}))),
    ("fashion-mnist-cnn", "pruning + 4-bit k-means + LZMA",
     every_layer("fashion-mnist-cnn", ("pruning", {"threshold": 1.0}),
                 ("quantization", {"bits": 4}), "lzma")),
]


def format_1(path: Path, target: Path) -> None:
    """The same streams written as format 1 did."""
    header, blobs = read_header(path)
    raw = json.loads(header.model_dump_json())
    raw["version"] = 1
    for stream in raw["streams"].values():
        stream.pop("bytes")
    raw["sha256"] = digest(blobs)
    tensors = {key: np.frombuffer(blob, dtype=np.uint8) for key, blob in blobs.items()}
    target.write_bytes(save(tensors, metadata={"autoshrink": json.dumps(raw)}))


def main() -> None:
    print("| artifact | file bytes | header bytes, format 1 | header bytes, format 2 |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        new, old = Path(folder) / "new.safetensors", Path(folder) / "old.safetensors"
        for task_name, label, plan in CASES:
            task = REGISTRY.tasks[task_name]
            model = compress(task.build_model(1.0), plan, REGISTRY)
            size = write_artifact(new, model, plan, task, REGISTRY, overwrite=True)
            format_1(new, old)
            before, after = size_breakdown(old)["header"], size_breakdown(new)["header"]
            print(f"| {task_name}: {label} | {size:,} | {before:,} | {after:,} |")


if __name__ == "__main__":
    main()
