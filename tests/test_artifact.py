"""Artifact files: exact round trips, sizes from disk, and clear errors on bad files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from autoshrink.artifact import read_artifact, size_breakdown, write_artifact
from autoshrink.compress import compress
from autoshrink.errors import ArtifactError
from autoshrink.header import header_json, header_metadata
from autoshrink.plan import Choice, LayerPlan, Plan


@pytest.fixture
def digits(registry):
    task = registry.tasks["digits-mlp"]
    torch.manual_seed(0)
    return task, task.build_model(1.0)


HALF = Plan(layers={"fc1": LayerPlan(value=Choice(method="float", config={"bits": 16}))})


def test_roundtrip_is_exact_and_size_is_file_bytes(tmp_path: Path, registry, digits) -> None:
    task, model = digits
    compressed = compress(model, HALF, registry)
    path = tmp_path / "m.safetensors"
    size = write_artifact(path, compressed, HALF, task, registry, info={"note": 1})
    assert size == path.stat().st_size
    loaded = read_artifact(path, registry)
    x = torch.rand(50, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), compressed(x))
    assert loaded.header.plan == HALF and loaded.header.task == "digits-mlp"
    assert loaded.bytes == size
    parts = size_breakdown(path)
    assert sum(parts.values()) == size
    assert set(parts) == {"header", "fc1", "fc2", "out"}
    # fc1 in float16 takes half the bytes of its float32 weights (plus float32 bias)
    assert parts["fc1"] == 64 * 128 * 2 + 128 * 4


def test_refuses_to_overwrite(tmp_path: Path, registry, digits) -> None:
    task, model = digits
    path = tmp_path / "m.safetensors"
    write_artifact(path, model, Plan(), task, registry)
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match="exists"):
        write_artifact(path, compress(model, HALF, registry), HALF, task, registry)
    assert path.read_bytes() == before


def _written(tmp_path: Path, registry, digits) -> Path:
    task, model = digits
    path = tmp_path / "m.safetensors"
    write_artifact(path, model, Plan(), task, registry)
    return path


def test_truncated_file_is_a_clear_error(tmp_path: Path, registry, digits) -> None:
    path = _written(tmp_path, registry, digits)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="not a valid autoshrink artifact"):
        read_artifact(path, registry)


def test_corrupted_data_is_a_clear_error(tmp_path: Path, registry, digits) -> None:
    path = _written(tmp_path, registry, digits)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_artifact(path, registry)


def test_corrupted_header_is_a_clear_error(tmp_path: Path, registry, digits) -> None:
    path = _written(tmp_path, registry, digits)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = header_json(header["__metadata__"])
    meta["plan"]["layers"] = {"fc1": {"structure": {"method": 7}}}
    header["__metadata__"] = header_metadata(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + length :])
    with pytest.raises(ArtifactError, match="header is corrupt"):
        read_artifact(path, registry)


def test_pickle_is_never_loaded(tmp_path: Path, registry) -> None:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ArtifactError, match="not a valid autoshrink artifact"):
        read_artifact(path, registry)


def test_unregistered_task_is_not_imported(tmp_path: Path, registry, digits) -> None:
    task, model = digits
    from dataclasses import replace

    path = tmp_path / "m.safetensors"
    write_artifact(path, model, Plan(), replace(task, name="os:system"), registry)
    with pytest.raises(ArtifactError, match="not registered here"):
        read_artifact(path, registry)


def test_missing_file(tmp_path: Path, registry) -> None:
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_artifact(tmp_path / "nope.safetensors", registry)


def test_nan_weights_are_refused_with_the_tensor_named(tmp_path: Path, registry, digits) -> None:
    task, model = digits
    with torch.no_grad():
        model.fc2.weight[3, 4] = float("nan")
    path = tmp_path / "nan.safetensors"
    write_artifact(path, model, Plan(), task, registry)
    with pytest.raises(ArtifactError, match=r"`fc2\.weight` holds NaN"):
        read_artifact(path, registry)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"width": 16}, "outside"),
        ({"width": 0.5, "plan": {"model": {"method": "distillation", "config": {"width": 0.3}}}},
         "not the width its plan gives"),
        ({"plan": {"layers": {"fc1": {"structure": {"method": "ghost"}}}}}, "unknown method"),
        ({"plan": {"layers": {"fc9": {}}}}, "not a compressible layer"),
        ({"streams": "NEGATIVE"}, "header is corrupt"),
        ({"plan": {"model": {"method": "distillation", "config": {"width": 7}}}}, "width"),
    ],
    ids=["width", "width-not-planned", "unknown-method", "unknown-layer", "negative-shape",
         "knob-out-of-range"],
)
def test_impossible_headers_are_refused_before_the_model_is_built(
    tmp_path: Path, registry, digits, edit, needle
) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save

    task, model = digits
    path = tmp_path / "m.safetensors"
    write_artifact(path, model, Plan(), task, registry)
    with safe_open(str(path), framework="numpy") as handle:
        header = header_json(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if edit.get("streams") == "NEGATIVE":  # one stream's count cancels another's
        first, second = list(header["streams"])[:2]
        edit = {"streams": {**header["streams"],
                            first: {**header["streams"][first], "shape": [10**10]},
                            second: {**header["streams"][second], "shape": [-(10**10)]}}}
    header.update(edit)
    path.write_bytes(save(tensors, metadata=header_metadata(header)))
    with pytest.raises(ArtifactError, match=needle):
        read_artifact(path, registry)


def test_header_is_compact_and_format_1_files_still_load(
    tmp_path: Path, registry, digits
) -> None:
    """The header is stored compressed, without defaults, beside one packed tensor; a file
    of the first format (plain JSON, a tensor per stream) reads as before."""
    from safetensors.numpy import save

    from autoshrink.header import digest, read_header

    task, model = digits
    compressed = compress(model, HALF, registry)
    path = tmp_path / "m.safetensors"
    write_artifact(path, compressed, HALF, task, registry)
    header, blobs = read_header(path)
    framing = size_breakdown(path)["header"]
    plain = header.model_dump_json()
    assert framing < len(plain) // 2, (framing, len(plain))
    old = tmp_path / "old.safetensors"
    raw = json.loads(plain)
    raw["version"] = 1
    for stream in raw["streams"].values():
        stream.pop("bytes")
    raw["sha256"] = digest(blobs)
    tensors = {key: np.frombuffer(blob, dtype=np.uint8) for key, blob in blobs.items()}
    old.write_bytes(save(tensors, metadata={"autoshrink": json.dumps(raw)}))
    x = torch.rand(20, 64)
    with torch.no_grad():
        assert torch.equal(read_artifact(old, registry).model(x), compressed(x))
        assert torch.equal(read_artifact(path, registry).model(x), compressed(x))
    assert size_breakdown(old)["header"] > 2 * framing
