"""A seeded fuzz test of the artifact reader: byte flips, truncations, edited header fields
(with the checksum recomputed, as an attacker would), deep JSON, decompression bombs and
pickles. Every mutant is read in a forked child under a memory limit and a time limit; each
must load or fail with an ArtifactError, and use at most twice the memory of the clean file
(with a 32 MB floor for the allocator's noise).

``AUTOSHRINK_FUZZ_MUTANTS`` sets the number of mutants (default 260).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import resource
import signal
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.compress import compress
from autoshrink.errors import ArtifactError
from autoshrink.header import PACKED, digest, header_json, header_metadata
from autoshrink.plan import Choice, LayerPlan, Plan

MUTANTS = int(os.environ.get("AUTOSHRINK_FUZZ_MUTANTS", "260"))
SECONDS = 20  # per file
MEMORY_FLOOR = 32 << 20

PLAN = Plan(
    layers={
        "fc1": LayerPlan(
            structure=Choice(method="pruning", config={"threshold": 0.5}),
            value=Choice(method="quantization", config={"bits": 4}),
        ),
        "fc2": LayerPlan(structure=Choice(method="lowrank", config={"rank": 0.5})),
    },
    encoding=Choice(method="entropy", config={"codec": "lzma"}),
)


def _split(data: bytes) -> tuple[dict, dict[str, bytes]]:
    """The header JSON and the streams (by name) of a file."""
    (length,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + length])
    header = header_json(table["__metadata__"])
    start, end = table[PACKED]["data_offsets"]
    packed, blobs, at = data[8 + length + start : 8 + length + end], {}, 0
    for key, stream in header["streams"].items():
        blobs[key], at = packed[at : at + stream["bytes"]], at + stream["bytes"]
    return header, blobs


def _join(header: dict | str, blobs: dict[str, bytes]) -> bytes:
    """A file from a header (JSON, or text stored as it is) and streams, with the lengths
    and checksum recomputed as an attacker would."""
    if isinstance(header, dict):
        streams = {
            key: {**header["streams"].get(key, {"dtype": "uint8", "shape": [len(blob)]}),
                  "bytes": len(blob)}
            for key, blob in blobs.items()
        }
        header = {**header, "streams": streams, "sha256": digest(blobs)}
        metadata = header_metadata(header)
    else:
        metadata = {"autoshrink": header}
    packed = np.frombuffer(b"".join(blobs.values()), dtype=np.uint8)
    return save({PACKED: packed}, metadata=metadata)


def _bomb(registry) -> bytes:
    """64 MiB of zeros, LZMA-coded: a few KB that claim a lot."""
    entropy = registry.methods["entropy"]
    return entropy.encode(bytes(64 << 20), entropy.config({"codec": "lzma"}))


def _mutators(clean: bytes, registry) -> list[Callable[[random.Random], bytes]]:
    header, blobs = _split(clean)
    keys = sorted(blobs)
    bomb = _bomb(registry)

    def flip(rng):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)

    def truncate(rng):
        return clean[: rng.randrange(len(clean))]

    def bad_length(rng):
        return struct.pack("<Q", rng.choice([0, 7, len(clean), 2**40, 2**64 - 1])) + clean[8:]

    def width(rng):
        return _join({**header, "width": rng.choice([0, -1, 16, 1e9, 0.5, float("nan")])}, blobs)

    def shape(rng):
        key = rng.choice(keys)
        streams = {**header["streams"]}
        streams[key] = {**streams[key], "shape": rng.choice(
            [[2**31, 2**31], [-1], [10**12], [0], [3, -4], [1] * 40])}
        return _join({**header, "streams": streams}, blobs)

    def dtype(rng):
        key = rng.choice(keys)
        streams = {**header["streams"]}
        streams[key] = {**streams[key], "dtype": rng.choice(["float64", "F8_E4M3", "object"])}
        return _join({**header, "streams": streams}, blobs)

    def coding(rng):
        key = rng.choice(keys)
        streams = {**header["streams"]}
        streams[key] = {**streams[key], "coding": rng.choice(["entropy", "pickle", None, ""])}
        return _join({**header, "streams": streams}, blobs)

    def method(rng):
        plan = json.loads(json.dumps(header["plan"]))
        layer = plan["layers"][rng.choice(sorted(plan["layers"]))]
        stage = rng.choice(["structure", "value"])
        layer[stage] = rng.choice([
            {"method": "no-such-method", "config": {}},
            {"method": "entropy", "config": {}},
            {"method": layer.get(stage, {"method": "float"})["method"],
             "config": {"bits": 99, "rank": -2}},
        ])
        return _join({**header, "plan": plan}, blobs)

    def model_stage(rng):
        plan = {**header["plan"], "model": {"method": "distillation",
                                            "config": {"width": rng.choice([16, 0, 0.3])}}}
        return _join({**header, "plan": plan, "width": rng.choice([16, 0.3])}, blobs)

    def deep(rng):
        depth = rng.choice([40, 1000, 100_000])
        nested = "[" * depth + "]" * depth
        text = json.dumps({**header, "info": {"x": "NESTED"}}).replace('"NESTED"', nested)
        if rng.random() < 0.5:
            return _join(text, blobs)  # as plain JSON (format 1's key)
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        packed = base64.b85encode(packer.compress(text.encode()) + packer.flush()).decode()
        data = np.frombuffer(b"".join(blobs.values()), dtype=np.uint8)
        return save({PACKED: data}, metadata={"autoshrink.z": packed})

    def header_bomb(rng):
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = packer.compress(b" " * (64 << 20)) + packer.flush()
        data = np.frombuffer(b"".join(blobs.values()), dtype=np.uint8)
        return save({PACKED: data}, metadata={"autoshrink.z": base64.b85encode(bomb).decode()})

    def per_stream_tensors(rng):
        """Format 1's layout under a format-2 header, and the other way round."""
        tensors = {k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()}
        version = rng.choice([1, 2])
        return save(tensors, metadata=header_metadata({**header, "version": version}))

    def huge_header(rng):
        return _join({**header, "info": {"pad": "x" * (5 << 20)}}, blobs)

    def bomb_stream(rng):
        key = rng.choice(keys)
        return _join(header, {**blobs, key: bomb})

    def bomb_declared(rng):
        key = rng.choice(keys)
        streams = {**header["streams"]}
        streams[key] = {**streams[key], "shape": [64 << 20], "dtype": "uint8",
                        "coding": "entropy"}
        return _join({**header, "streams": streams}, {**blobs, key: bomb})

    def pickled(rng):
        payload = pickle.dumps({"autoshrink": header})
        return rng.choice([payload, clean[:8] + payload, _join(payload.hex(), blobs)])

    def garbage_json(rng):
        return _join(rng.choice(["", "{", "null", "[]", '"x"', "1e999", "\x00"]), blobs)

    def extra_stream(rng):
        return _join(header, {**blobs, "evil": b"\x00" * rng.randint(0, 1000)})

    def lengths(rng):
        streams = {k: {**v, "bytes": v["bytes"] + rng.choice([-1, 1, 2**40])}
                   for k, v in header["streams"].items()}
        data = np.frombuffer(b"".join(blobs.values()), dtype=np.uint8)
        return save({PACKED: data}, metadata=header_metadata({**header, "streams": streams}))

    return [flip, flip, truncate, bad_length, width, shape, dtype, coding, method, model_stage,
            deep, huge_header, bomb_stream, bomb_declared, pickled, garbage_json, extra_stream,
            header_bomb, per_stream_tensors, lengths]


def _read_in_child(path: Path, registry) -> dict:
    """Read ``path`` in a forked child (address space limited, time limited): its outcome
    and how much memory it took beyond the parent's at the fork."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.close(reader)
        signal.alarm(SECONDS)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), hard))
        try:
            read_artifact(path, registry)
            outcome = {"result": "loaded"}
        except ArtifactError as exc:
            outcome = {"result": "refused", "line": str(exc).splitlines()[0][:300],
                       "lines": len(str(exc).splitlines())}
        except BaseException as exc:  # what the reader let escape: a defect
            outcome = {"result": "escaped", "line": f"{type(exc).__name__}: {exc}"[:300]}
        outcome["kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        os.write(writer, json.dumps(outcome).encode())
        os._exit(0)
    os.close(writer)
    chunks = []
    while chunk := os.read(reader, 65536):
        chunks.append(chunk)
    os.close(reader)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"result": "died", "line": f"child status {status}", "kb": 0}
    return json.loads(b"".join(chunks))


def test_no_mutant_escapes_hangs_or_balloons(registry, tmp_path: Path) -> None:
    torch.set_num_threads(1)  # no thread pools across fork
    task = registry.tasks["digits-mlp"]
    torch.manual_seed(0)
    clean_path = tmp_path / "clean.safetensors"
    write_artifact(clean_path, compress(task.build_model(1.0), PLAN, registry), PLAN, task,
                   registry)
    clean = clean_path.read_bytes()
    assert any(s.get("coding") == "entropy" for s in _split(clean)[0]["streams"].values())
    baseline = _read_in_child(clean_path, registry)
    assert baseline["result"] == "loaded", baseline
    allowed_kb = max(2 * baseline["kb"], MEMORY_FLOOR // 1024)
    rng = random.Random(20261129)
    mutators = _mutators(clean, registry)
    bad = []
    kinds: dict[str, int] = {}
    loaded: list[str] = []
    for number in range(MUTANTS):
        mutate = mutators[number % len(mutators)]
        path = tmp_path / f"mutant-{number:03d}.safetensors"
        path.write_bytes(mutate(rng))
        outcome = _read_in_child(path, registry)
        kinds[outcome["result"]] = kinds.get(outcome["result"], 0) + 1
        if outcome["result"] == "loaded":
            loaded.append(mutate.__name__)
        if outcome["result"] in ("escaped", "died") or outcome["kb"] > allowed_kb or (
            outcome["result"] == "refused" and outcome["lines"] != 1
        ):
            bad.append((mutate.__name__, number, outcome))
        path.unlink()
    print(f"{MUTANTS} mutants: {kinds} (loaded: {sorted(set(loaded))}); clean file "
          f"{baseline['kb']} KB, limit {allowed_kb} KB")
    assert not bad, bad[:5]
    assert kinds.get("refused", 0) >= MUTANTS // 2


@pytest.fixture
def registry():
    from autoshrink.registry import load_registry

    return load_registry()
