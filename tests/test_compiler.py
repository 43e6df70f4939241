"""Compiling artifacts with TVM: densify, real tuned compiles, a library that runs without
torch, tuning reuse, a corrupt tuning database, and `--target cuda` without a GPU.

Every compile here is a real TVM compile (tiny tuning budgets keep the file to a few
minutes on 2 cores); `torch.compile` is left out, its C++ build alone takes a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.compiler import compile_artifact, open_database
from autoshrink.compiler.densify import densify
from autoshrink.compiler.machine import cpu_flags
from autoshrink.compress import compress
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers
from autoshrink.settings import Settings
from autoshrink.studies.pareto import _latency
from autoshrink.studies.study import StudyFolder
from tests.conftest import run_cli

ENGINES = {"tvm_tuned", "tvm_dense", "torch_eager", "onnxruntime"}

MIXED = Plan(
    layers={
        "fc1": LayerPlan(structure=Choice(method="pruning", config={"threshold": 0.8})),
        "fc2": LayerPlan(
            structure=Choice(method="hashing", config={"ratio": 0.25}),
            value=Choice(method="quantization", config={"bits": 4}),
        ),
        "out": LayerPlan(structure=Choice(method="lowrank", config={"rank": 0.3})),
    }
)

CNN = Plan(
    model=Choice(method="distillation", config={"width": 0.25}),
    layers={
        "conv1": LayerPlan(structure=Choice(method="hashing", config={"ratio": 0.5})),
        "conv2": LayerPlan(structure=Choice(method="pruning", config={"threshold": 1.0}),
                           value=Choice(method="quantization", config={"bits": 5})),
        "fc1": LayerPlan(structure=Choice(method="lowrank", config={"rank": 0.1})),
    },
)


def _artifact(folder: Path, registry, task_name: str, plan: Plan, width: float = 1.0) -> Path:
    task = registry.tasks[task_name]
    torch.manual_seed(0)
    model = task.build_model(width)
    for module in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = folder / f"{task_name}.safetensors"
    write_artifact(path, compress(model, plan, registry), plan, task, registry, width=width)
    return path


@pytest.fixture(scope="module")
def registry_once():
    from autoshrink.registry import load_registry

    load_registry.cache_clear()
    return load_registry()


@pytest.fixture(scope="module")
def tuned_mlp(tmp_path_factory, registry_once):
    """The digits MLP compiled with a small real tuning budget (batches 1 and 16)."""
    folder = tmp_path_factory.mktemp("mlp")
    path = _artifact(folder, registry_once, "digits-mlp", Plan())
    task = registry_once.tasks["digits-mlp"]
    result = compile_artifact(
        path,
        registry_once,
        trials=16,
        batch=16,
        out=folder / "compiled",
        test=task.load_data(None).test,
        torch_compile=False,
        rounds=3,
    )
    return path, result


def test_densify_turns_hashed_and_pruned_layers_dense(registry) -> None:
    task = registry.tasks["digits-mlp"]
    torch.manual_seed(0)
    model = compress(task.build_model(1.0), MIXED, registry).eval()
    notes: list[str] = []
    templates = compressible_layers(task.build_model(1.0), registry)
    dense = densify(model, task.example_input(1), templates, notes)
    assert type(dense.fc1) is nn.Linear and type(dense.fc2) is nn.Linear
    # rank 0.3 of a 64 -> 10 layer costs 3 * (64 + 10) < 640 multiply-adds: it stays factored
    assert type(dense.out).__name__ == "LowRankLinear"
    x = torch.randn(32, 64)
    with torch.no_grad():
        assert torch.allclose(dense(x), model(x), atol=1e-5)
    assert any("fc1: Pruned -> dense Linear" in n for n in notes), notes


def test_densify_reads_conv_layers_without_templates(registry) -> None:
    task = registry.tasks["fashion-mnist-cnn"]
    torch.manual_seed(0)
    student = task.build_model(0.25)
    model = compress(student, Plan(layers=CNN.layers), registry).eval()
    dense = densify(model, task.example_input(2))  # geometry from the modules' attributes
    assert type(dense.conv1) is nn.Conv2d and type(dense.conv2) is nn.Conv2d
    assert dense.conv1.padding == (1, 1) and dense.conv1.kernel_size == (3, 3)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(dense(x), model(x), atol=1e-5)


def test_tuned_mlp_matches_torch_and_writes_latency(tuned_mlp) -> None:
    path, result = tuned_mlp
    latency = json.loads((result.folder / "latency.json").read_text())
    assert latency == json.loads(json.dumps(result.latency))
    assert latency["batches"] == [1, 16] and latency["threads"] >= 1
    assert latency["target"].startswith("llvm") and latency["machine"]
    assert set(latency["engines"]) == ENGINES
    for times in latency["engines"].values():
        assert set(times) == {"1", "16"} and all(ms > 0 for ms in times.values())
    assert latency["tuning"]["layers"]["trials"] > 0 and latency["tuning"]["dense"]["trials"] > 0
    assert latency["bundle_bytes"] == (result.folder / "model.so").stat().st_size
    assert latency["max_abs_error"] <= latency["tolerance"]
    accuracy = latency["accuracy"]
    assert accuracy["tvm"] == pytest.approx(accuracy["torch"], abs=1e-9)
    assert accuracy["argmax_agreement"] >= 0.99 and accuracy["examples"] > 300
    manifest = json.loads((result.folder / "compiled.json").read_text())
    assert set(manifest["entries"]) == {"main_b1", "main_b16"}


def test_tuned_workloads_are_not_tuned_again(tuned_mlp, registry_once, tmp_path: Path) -> None:
    path, _ = tuned_mlp
    again = compile_artifact(
        path, registry_once, trials=16, batch=16, out=tmp_path, torch_compile=False, rounds=3
    )
    for part in ("layers", "model", "dense"):
        tuning = again.latency["tuning"][part]
        assert tuning["trials"] == 0 and tuning["reused"] == tuning["tasks"], part


def test_library_runs_without_torch(tuned_mlp, registry_once, tmp_path: Path) -> None:
    path, result = tuned_mlp
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    with torch.no_grad():
        want = read_artifact(path, registry_once).model(torch.from_numpy(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            # As on a machine without torch: tvm_ffi tries `import torch` and goes on.
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError(f"{name} is not installed here")

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        import tvm
        from tvm import relax

        folder, data = sys.argv[1], sys.argv[2]
        vm = relax.VirtualMachine(tvm.runtime.load_module(folder + "/model.so"), tvm.cpu())
        out = vm["main_b16"](tvm.runtime.tensor(np.load(data + "/x.npy")))[0].numpy()
        np.save(data + "/out.npy", out)
        assert "torch" not in sys.modules
        print("no torch")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(result.folder), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no torch" in done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-4)


def test_compressed_mlp_compiles_and_matches(registry_once, tmp_path: Path) -> None:
    path = _artifact(tmp_path, registry_once, "digits-mlp", MIXED)
    result = compile_artifact(
        path, registry_once, trials=0, batch=4, out=tmp_path / "c", torch_compile=False, rounds=3
    )
    latency = result.latency
    assert latency["max_abs_error"] <= latency["tolerance"]
    assert any("Pruned -> dense Linear" in note for note in latency["notes"])
    assert all(latency["tuning"][part]["trials"] == 0 for part in ("layers", "model", "dense"))


def test_distilled_cnn_compiles_and_matches(registry_once, tmp_path: Path) -> None:
    path = _artifact(tmp_path, registry_once, "fashion-mnist-cnn", CNN, width=0.25)
    result = compile_artifact(
        path, registry_once, trials=0, batch=4, out=tmp_path / "c", torch_compile=False, rounds=3
    )
    latency = result.latency
    assert latency["max_abs_error"] <= latency["tolerance"]
    assert latency["batches"] == [1, 4] and set(latency["engines"]) == ENGINES
    assert any("folded 2 BatchNorm" in note for note in latency["notes"]), latency["notes"]
    assert any("conv2: Pruned -> dense Conv2d" in note for note in latency["notes"])
    forms = {row["layer"]: row["form"] for row in latency["layers"]}
    if "avx512f" in cpu_flags() and forms["conv2"] == "compressed":
        # the sparse convolution computes the rest of its block too
        fused = "conv2: `bn2`, `relu2`, `pool2` computed in its kernel's epilogue"
        assert fused in latency["notes"], latency["notes"]


@pytest.mark.parametrize(
    "damage",
    [b"\n", b"garbage{{{\n", b'["abc", {"not": "a workload"}]\n'],
    ids=["blank-line", "not-json", "tvm-rejects"],
)
def test_corrupt_database_is_moved_aside(tmp_path: Path, damage: bytes) -> None:
    folder = tmp_path / "llvm-test"
    folder.mkdir()
    (folder / "database_workload.json").write_bytes(damage)
    (folder / "database_tuning_record.json").write_bytes(b"")
    database = open_database(folder)
    assert len(database) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("llvm-test.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "database_workload.json").read_bytes() == damage


def test_cli_compile_survives_a_corrupt_database(tuned_mlp, tmp_path: Path) -> None:
    path, result = tuned_mlp
    cache = tmp_path / "cache"
    tuning = cache / "tuning" / result.latency["tuning"]["database"]
    tuning.mkdir(parents=True)
    (tuning / "database_workload.json").write_text("\n\n")  # TVM itself would segfault here
    done = run_cli(
        "compile", str(path), "--trials", "0", "--batch", "4", "--no-torch-compile",
        "--out", str(tmp_path / "c"), "--json",
        env={"AUTOSHRINK_CACHE": str(cache)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tuning database" in done.stderr and "corrupt" in done.stderr
    assert json.loads(done.stdout)["max_abs_error"] < 1e-4
    assert (tmp_path / "c" / "model.so").is_file()


def test_cuda_without_a_gpu_is_one_line_and_exit_2(tuned_mlp) -> None:
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    path, _ = tuned_mlp
    done = run_cli("compile", str(path), "--target", "cuda")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device on this machine" in lines[0]


def test_compile_is_off_by_default_and_summaries_pick_up_latency(tmp_path: Path) -> None:
    from autoshrink.files import file_digest

    assert Settings().compile is False
    folder = StudyFolder(tmp_path)
    artifact, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    artifact.write_bytes(b"the compiled file")
    other.write_bytes(b"a later file of the same trial")
    assert _latency(folder, 3, artifact) is None
    latency = {"engines": {"tvm_tuned": {"1": 0.1}}, "batches": [1],
               "artifact_sha256": file_digest(artifact)}
    target = tmp_path / "compiled" / "trial-0003"
    target.mkdir(parents=True)
    (target / "latency.json").write_text(json.dumps(latency))
    assert _latency(folder, 3, artifact) == latency
    assert _latency(folder, 3, other) is None  # timings of another file are never shown
    (target / "latency.json").write_text("{truncated")
    assert _latency(folder, 3, artifact) is None


def test_search_help_says_compile_is_off_by_default() -> None:
    done = run_cli("search", "--help", env={"COLUMNS": "200"})
    assert "--compile" in done.stdout and "--tune-trials" in done.stdout
    assert "--compile-front" in done.stdout and "Off by default" in done.stdout


def test_search_compile_front_times_every_member_in_the_report(tmp_path: Path) -> None:
    done = run_cli(
        "search", "--task", "digits-mlp", "--finetune-steps", "20", "--budget", "40kB",
        "--trials", "2", "--seed", "3", "--out", str(tmp_path), "--study", "c",
        "--compile-front", "--tune-trials", "0", "--retrain-epochs", "0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "c"
    pareto = json.loads((folder / "pareto.json").read_text())
    assert pareto["front"]
    for member in pareto["front"]:
        latency = member["latency"]
        assert set(latency["engines"]) >= ENGINES
        assert latency["max_abs_error"] <= latency["tolerance"]
        assert (folder / "compiled" / f"trial-{member['trial']:04d}" / "model.so").is_file()
    assert "tvm_tuned" in (folder / "report.md").read_text()
    assert "tvm_tuned" in (folder / "index.html").read_text()


def test_records_that_no_longer_replay_are_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    """Two functions equal but for a stage's name are one workload to MetaSchedule; a record
    tuned on the second names a stage the first lacks, and TVM then refuses the whole file."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

    folder = tmp_path / "llvm-test"
    folder.mkdir()
    database = JSONDatabase(work_dir=str(folder))
    x = te.placeholder((4, 8), name="x")
    for stage in ("double", "twice"):
        y = te.compute((4, 8), lambda i, j: x[i, j] * 2.0, name=stage)
        mod = tvm.IRModule({"main": te.create_prim_func([x, y])})
        schedule = Schedule(mod)
        schedule.parallel(schedule.get_loops(schedule.get_sblock(stage))[0])
        workload = database.commit_workload(mod)
        database.commit_tuning_record(TuningRecord(
            schedule.trace, workload, [1e-6], tvm.target.Target("llvm"),
            ArgInfo.from_prim_func(mod["main"]),
        ))
    assert len((folder / "database_tuning_record.json").read_text().splitlines()) == 2
    with pytest.raises(RuntimeError, match="parallel_for"):  # what TVM does with such a file
        JSONDatabase(work_dir=str(folder))
    console = Console(stderr=True, record=True, width=200)
    reopened = open_database(folder, console)
    assert len(reopened) == 1
    assert "dropped 1 tuning record(s)" in console.export_text()
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]


def test_a_record_that_no_longer_replays_leaves_its_kernel_unscheduled() -> None:
    """A tuning database keys workloads by structure, so kernels alike but for their blocks'
    names share one entry: a record tuned on one names blocks the stored workload may not
    have. Its kernel keeps its plain loops and the compile goes on (TVM's own pass fails the
    whole build there); a record that replays schedules its kernel."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import MemoryDatabase, TuningRecord

    from autoshrink.compiler.build import apply_database, is_scheduled
    from autoshrink.compiler.target import resolve_target

    def kernel(block: str) -> tvm.IRModule:
        a = te.placeholder((64, 64), name="a")
        out = te.compute((64, 64), lambda i, j: a[i, j] * 2, name=block)
        return tvm.IRModule({"main": te.create_prim_func([a, out]).with_attr(
            "global_symbol", "main"
        )})

    target = resolve_target("cpu", 2)
    schedule = Schedule(kernel("layer"))
    schedule.parallel(schedule.get_loops(schedule.get_sblock("layer"))[0])
    found = {}
    for stored in ("layer", "other"):  # the workload the database holds for the structure
        database = MemoryDatabase()
        workload = database.commit_workload(kernel(stored))
        database.commit_tuning_record(TuningRecord(
            schedule.trace, workload, [0.001], target.tvm,
            ArgInfo.from_prim_func(kernel(stored)["main"]),
        ))
        mod = tvm.IRModule({"layer_b1": kernel("layer")["main"].without_attr("global_symbol")})
        notes: list[str] = []
        found[stored] = apply_database(mod, database, target, notes)["layer_b1"]
        assert len(notes) == (stored == "other"), notes
    assert "layer_b1: its tuning record no longer applies" in notes[0]
    assert is_scheduled(found["layer"]) and "T.parallel" in found["layer"].script()
    assert "global_symbol" not in found["layer"].attrs  # the kernel's own attributes
    assert not is_scheduled(found["other"]) and "T.parallel" not in found["other"].script()
