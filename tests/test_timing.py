"""The timing harness, for real: a tiny MLP compiled by TVM, exported for PyTorch and ONNX
Runtime, every engine timed in a child process of its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from autoshrink.compiler.timing import (
    ONNX_MISSING,
    Timings,
    TvmEngine,
    measure,
    prepare_peers,
)

SHAPE = (16,)
BATCHES = [1, 4]


def tiny_model() -> nn.Module:
    """The model every test times: 16 -> 32 -> 4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Timings, bytes]:
    """One measurement of TVM, PyTorch eager, ONNX Runtime and a TVM engine whose library
    does not exist (torch.compile is left out: inductor's C++ build takes a minute), with
    what reached this process's stdout and stderr (file descriptors 1 and 2) meanwhile."""
    import tvm

    from autoshrink.compiler.build import to_relax

    folder = tmp_path_factory.mktemp("timing")
    model = tiny_model()
    library = folder / "model.so"
    built = tvm.compile(to_relax(model, SHAPE, BATCHES), target=tvm.target.Target({"kind": "llvm"}))
    built.export_library(str(library))
    peers, notes = prepare_peers(model, SHAPE, BATCHES, folder / "peers")
    assert notes == []
    assert set(peers) == {"torch_eager", "torch_compile", "onnxruntime"}
    engines = {
        "tvm": TvmEngine(library),
        "broken": TvmEngine(folder / "missing.so"),
        "torch_eager": peers["torch_eager"],
        "onnxruntime": peers["onnxruntime"],
    }
    with tempfile.TemporaryFile() as terminal:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(terminal.fileno(), 1)
        os.dup2(terminal.fileno(), 2)
        try:
            timings = measure(engines, SHAPE, BATCHES, threads=1, rounds=3, min_repeat_s=0.01)
        finally:
            for fd, kept in zip((1, 2), saved, strict=True):
                os.dup2(kept, fd)
                os.close(kept)
        terminal.seek(0)
        return timings, terminal.read()


@pytest.fixture
def timed(measured: tuple[Timings, bytes]) -> Timings:
    """The timings of :func:`measured`."""
    return measured[0]


def test_every_engine_reports_a_median_within_its_quartiles(timed: Timings) -> None:
    assert timed.rounds == 3
    assert set(timed.engines) == {"tvm", "torch_eager", "onnxruntime"}
    for name, times in timed.engines.items():
        assert set(times) == {"1", "4"}, name
        for batch, median in times.items():
            spread = timed.spread[name][batch]
            assert math.isfinite(median) and median > 0, (name, batch, median)
            assert spread["min"] <= spread["q1"] <= median <= spread["q3"] <= spread["max"]


def test_a_broken_engine_is_dropped_with_a_note_naming_it(timed: Timings) -> None:
    assert "broken" not in timed.engines and "broken" not in timed.spread
    (note,) = timed.notes
    assert note.startswith("broken not measured: ")
    assert "missing.so" in note  # TVM's own words: the file it cannot find


def test_no_child_output_reaches_the_terminal(measured: tuple[Timings, bytes]) -> None:
    # The broken child printed a traceback: it went to its log, read back only for the note.
    assert measured[1] == b""


def test_without_onnxruntime_the_note_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "sys.modules['onnxruntime'] = None\n"
        "from pathlib import Path\n"
        "from torch import nn\n"
        "from autoshrink.compiler.timing import prepare_peers\n"
        "model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n"
        f"peers, notes = prepare_peers(model, (16,), [1, 4], Path({str(tmp_path)!r}))\n"
        "print(json.dumps({'peers': sorted(peers), 'notes': notes}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["peers"] == ["torch_compile", "torch_eager"]
    assert found["notes"] == [ONNX_MISSING]
    assert "pip install 'autoshrink[onnx]'" in ONNX_MISSING
