"""Embedding tables: compressed through the whole pipeline (plan, fine-tune, artifact, load),
the forms that cannot be honoured refused in one line, and the example that users run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autoshrink.api import model_task
from autoshrink.artifact import read_artifact, size_breakdown, write_artifact
from autoshrink.compress import apply_structure, apply_values, compress
from autoshrink.errors import UsageError
from autoshrink.pipeline import resolve_plan
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers
from autoshrink.space import build_space, load_preset
from autoshrink.tasks import Split
from autoshrink.training import fit

ROOT = Path(__file__).resolve().parent.parent
VOCAB, DIM = 300, 16
#: A preset that lets every Embedding use only hashing and quantization.
HASH_AND_QUANTIZE_TABLES = '[layers.Embedding]\nstructure = ["hashing"]\nvalue = ["quantization"]\n'


class Bag(nn.Module):
    """A bag-of-tokens classifier: mean of the non-padding tokens' rows, then a linear head."""

    def __init__(self, **table: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0, **table)  # type: ignore[arg-type]
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).sum(1) / (x != 0).sum(1, keepdim=True).clamp(min=1))


def _tokens(count: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (count,), generator=generator)
    x = torch.randint(1, VOCAB, (count, 12), generator=generator)
    x = torch.where(x % 3 == y[:, None], x, x * (x < 100))  # some padding, some signal
    return Split(x, y)


def _plan(structure: Choice, value: Choice) -> Plan:
    return Plan(layers={"embed": LayerPlan(structure=structure, value=value)})


HASH_4BIT = _plan(
    Choice(method="hashing", config={"ratio": 0.05}),
    Choice(method="quantization", config={"bits": 4, "mode": "kmeans"}),
)


@pytest.mark.parametrize(
    "plan",
    [
        HASH_4BIT,
        _plan(Choice(method="hashing", config={"ratio": 0.1}),
              Choice(method="quantization", config={"bits": 2, "mode": "uniform"})),
        _plan(Choice(method="lowrank", config={"rank": 0.25}),
              Choice(method="quantization", config={"bits": 5, "mode": "kmeans"})),
        _plan(Choice(method="pruning", config={"threshold": 1.0}),
              Choice(method="quantization", config={"bits": 4, "mode": "kmeans"})),
        _plan(Choice(method="dense"), Choice(method="quantization", config={"bits": 3})),
        _plan(Choice(method="dense"), Choice(method="float", config={"bits": 16})),
    ],
    ids=["hashing-kmeans4", "hashing-uniform2", "lowrank-kmeans5", "pruning-kmeans4",
         "dense-kmeans3", "dense-f16"],
)
def test_trained_table_roundtrips_exactly(tmp_path: Path, registry, plan: Plan) -> None:
    """Structure, fine-tune, value stage, fine-tune again (as a trial does), then the artifact:
    loading it gives the trained compressed model's outputs bit for bit, its size on disk is
    the reported byte count, and the padding token still reads the zero row."""
    torch.manual_seed(0)
    model, data = Bag(), _tokens(400, 1)
    task = model_task(model, input_shape=(12,))
    assert set(compressible_layers(model, registry)) == {"embed", "head"}
    pipeline = resolve_plan(plan, model, registry)
    compressed = apply_structure(model, pipeline)
    fit(compressed, data, steps=15, batch_size=64, lr=1e-2, seed=0)
    apply_values(compressed, pipeline)
    fit(compressed, data, steps=15, batch_size=64, lr=1e-2, seed=1)
    path = tmp_path / "bag.safetensors"
    size = write_artifact(path, compressed, plan, task, registry)
    assert size == path.stat().st_size
    loaded = read_artifact(path, registry, task)
    assert loaded.bytes == size
    x = _tokens(200, 2).x
    with torch.no_grad():
        assert torch.equal(loaded.model(x), compressed(x))
        assert not loaded.model.embed(torch.zeros(2, 1, dtype=torch.long)).any()
    table = size_breakdown(path)["embed"]
    assert table <= VOCAB * DIM * 2, f"the table takes {table} bytes"


def test_hashed_table_stores_only_k_codes(tmp_path: Path, registry) -> None:
    """Hashing + 4-bit k-means: K = 5% of the 4,800 entries, so the table is K 4-bit codes
    and a codebook of at most 16 values, far below its 19,200 float32 bytes (the padding row
    is zero, the usual pad, so it is not stored)."""
    torch.manual_seed(0)
    model = Bag()
    compressed = compress(model, HASH_4BIT, registry)
    path = tmp_path / "bag.safetensors"
    write_artifact(path, compressed, HASH_4BIT, model_task(model), registry)
    k, levels = round(0.05 * VOCAB * DIM), compressed.embed.shared.unique().numel()
    assert 8 < levels <= 16
    assert size_breakdown(path)["embed"] == k // 2 + levels * 4


@pytest.mark.parametrize(
    ("table", "named"), [({"max_norm": 1.0}, "max_norm=1"), ({"sparse": True}, "sparse=True")]
)
def test_unhonourable_tables_are_refused(registry, table: dict, named: str) -> None:
    with pytest.raises(UsageError, match=rf"layer `embed`: Embedding with `{named}`") as caught:
        compressible_layers(Bag(**table), registry)
    assert "\n" not in str(caught.value)


def test_compile_refuses_embedding_models(tmp_path: Path, registry) -> None:
    pytest.importorskip("tvm")
    from autoshrink.compiler import compile_artifact
    from autoshrink.compiler.pipeline import CompileError

    model = Bag()
    path = tmp_path / "bag.safetensors"
    write_artifact(path, model, Plan(), model_task(model), registry)
    with pytest.raises(CompileError, match=r"layer `embed` is an Embedding.*autoshrink\.load"):
        compile_artifact(path, registry, task=model_task(model), out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_preset_names_the_embedding_kind(tmp_path: Path, registry) -> None:
    preset = tmp_path / "tables.toml"
    preset.write_text(HASH_AND_QUANTIZE_TABLES)
    space = build_space(Bag(), registry, load_preset(str(preset)), narrows=False)
    layers = {layer.name: layer for layer in space.layers}
    assert layers["embed"].kind == "Embedding"
    assert layers["embed"].structure == ("hashing",)
    assert layers["embed"].value == ("quantization",)
    assert "hashing" in layers["head"].structure and "dense" in layers["head"].structure


def test_embedding_example(tmp_path: Path) -> None:
    """The example on small settings, its table forced to hashing + quantization by a
    preset: every front member hashes and quantizes the table, each front artifact's size is
    its reported bytes, and the loaded best model gives the reported test accuracy."""
    preset = tmp_path / "tables.toml"
    preset.write_text(HASH_AND_QUANTIZE_TABLES)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedding_model.py"), "3", str(tmp_path),
         str(preset)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "AUTOSHRINK_FINETUNE_STEPS": "30", "AUTOSHRINK_RETRAIN_EPOCHS": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(
        r"([\d,]+) bytes, test accuracy ([\d.]+)%, table: hashing \+ quantization", done.stdout
    )
    assert found, done.stdout[-2000:]
    pareto = json.loads((tmp_path / "embedding" / "pareto.json").read_text())
    assert pareto["task"] == "model:BagOfTokens" and pareto["front"]
    for member in pareto["front"]:
        table = member["plan"]["layers"]["embed"]
        assert (table["structure"]["method"], table["value"]["method"]) == (
            "hashing", "quantization"
        )
        artifact = tmp_path / "embedding" / member["artifact"]
        assert artifact.stat().st_size == member["bytes"]
    best = next(m for m in pareto["front"] if m["trial"] == pareto["best"])
    assert int(found.group(1).replace(",", "")) == best["bytes"] <= 6_000
    assert float(found.group(2)) == pytest.approx(100 * best["test_accuracy"], abs=0.006)
