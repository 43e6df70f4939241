"""Artifact files: exact round trips, sizes from disk, and clear errors on bad files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from autoshrink.artifact import read_artifact, size_breakdown, write_artifact
from autoshrink.compress import compress
from autoshrink.errors import ArtifactError
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
    meta = json.loads(header["__metadata__"]["autoshrink"])
    meta["plan"]["layers"] = {"fc1": {"structure": {"method": 7}}}
    header["__metadata__"]["autoshrink"] = json.dumps(meta)
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
