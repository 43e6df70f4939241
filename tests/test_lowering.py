"""Compressed kernels: every built-in (structure, value) pair and the ternary example plugin
compile into TVM kernels that read the stored form, and compute what PyTorch computes.

Each case is a real (untuned) TVM build of a small model; the bundle-size test runs the
whole compile command on the Fashion-MNIST MLP's shape with no tuning trials.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from autoshrink.artifact import read_artifact, write_artifact
from autoshrink.compiler import compile_artifact
from autoshrink.compiler.build import build_tuned, fuse
from autoshrink.compiler.export import KernelCall, to_relax_lowered
from autoshrink.compiler.fusion import fuse_epilogues
from autoshrink.compiler.lowering import compressed_kernels
from autoshrink.compiler.machine import cpu_flags
from autoshrink.compiler.pipeline import _layer_inputs
from autoshrink.compiler.sparse import sparse_table_conv2d, sparse_table_linear
from autoshrink.compiler.target import cuda_target, load_tensor_intrinsics, resolve_target
from autoshrink.compiler.vector import (
    kernel_table,
    pack_codes,
    pack_values,
    table_entries,
    table_linear,
    table_values,
    table_values_length,
)
from autoshrink.compress import compress, replace_module
from autoshrink.header import read_header
from autoshrink.hookspecs import hookimpl
from autoshrink.plan import Choice, LayerPlan, Plan, compressible_layers
from autoshrink.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = {
    "dense": {},
    "hashing": {"ratio": 0.25},
    "lowrank": {"rank": 0.3},
    "pruning": {"threshold": 1.0},
}
VALUES = {
    "float32": ("float", {"bits": 32}),
    "float16": ("float", {"bits": 16}),
    "kmeans3": ("quantization", {"bits": 3, "mode": "kmeans"}),
    "kmeans8": ("quantization", {"bits": 8, "mode": "kmeans"}),
    "binary": ("quantization", {"bits": 1, "mode": "uniform"}),
    "ternary": ("ternary", {"threshold": 0.05}),
}


@pytest.fixture(scope="module")
def ternary():
    """The example plugin's module, imported from its folder (not installed)."""
    sys.path.insert(0, str(ROOT / "examples" / "autoshrink-ternary"))
    try:
        import autoshrink_ternary
    finally:
        sys.path.pop(0)
    return autoshrink_ternary


@pytest.fixture(scope="module")
def methods(ternary):
    """The registry of built-ins plus the example plugin, registered in-process."""
    return load_registry(extra_plugins=[ternary])


def _lowered(
    tmp_path: Path, registry, task_name: str, plan: Plan, width: float,
    table_lookup: bool = False,
    vbmi: bool = False,
    epilogues: bool = False,
):
    """Write an artifact and lower every layer (with ``epilogues``, let kernels compute what
    follows them); returns the model with each layer calling its kernel, the model read
    back from the artifact, the lowering notes and the kernels' forms."""
    task = registry.tasks[task_name]
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    model = compress(task.build_model(width), plan, registry)
    for module in model.modules():  # batch norms as training leaves them, not at identity
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.uniform_(-1.5, 1.5)
            module.running_var.data.uniform_(0.2, 3.0)
    write_artifact(path, model, plan, task, registry, width=width)
    reference = read_artifact(path, registry).model.eval()
    header, blobs = read_header(path)
    templates = compressible_layers(task.build_model(width), registry)
    notes: list[str] = []
    inputs, _ = _layer_inputs(reference, list(templates), task.example_input(1))
    kernels = compressed_kernels(
        header, blobs, registry, templates, notes, table_lookup, vbmi, inputs
    )
    _, outputs = _layer_inputs(reference, list(kernels), task.example_input(1))
    stubbed = copy.deepcopy(reference)
    for name, kernel in kernels.items():
        replace_module(stubbed, name, KernelCall(kernel, outputs[name]))
    if epilogues:
        fuse_epilogues(stubbed, kernels, outputs, tuple(task.input_shape), notes)
    return stubbed, reference, notes, kernels


def _compile(
    tmp_path: Path, registry, task_name: str, plan: Plan, width: float, batch: int,
    table_lookup: bool = False,
    vbmi: bool = False,
    epilogues: bool = False,
):
    """:func:`_lowered`, built untuned for this CPU; returns outputs of TVM and torch on one
    batch, the lowering notes and the kernels' forms."""
    stubbed, reference, notes, kernels = _lowered(
        tmp_path, registry, task_name, plan, width, table_lookup, vbmi, epilogues
    )
    shape = tuple(registry.tasks[task_name].input_shape)
    target = resolve_target("cpu", 2)
    mod = fuse(to_relax_lowered(stubbed, shape, [batch]), target, False)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target.tvm), target.device)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    got = vm[f"main_b{batch}"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    with torch.no_grad():
        want = reference(x).numpy()
    return got, want, notes, kernels


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_linear_pairs_compile_to_compressed_kernels(methods, tmp_path, structure, value) -> None:
    method, config = VALUES[value]
    layer = LayerPlan(
        structure=Choice(method=structure, config=STRUCTURES[structure]),
        value=Choice(method=method, config=config),
    )
    plan = Plan(layers={name: layer for name in ("fc1", "fc2", "out")})
    got, want, notes, kernels = _compile(tmp_path, methods, "digits-mlp", plan, 1.0, 8)
    assert set(kernels) == {"fc1", "fc2", "out"} and not notes, notes
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    assert (got.argmax(1) == want.argmax(1)).all()
    # Nothing dense is stored: a layer's arrays are smaller than its float32 weight would be,
    # except float32 values themselves (dense) and the low-rank factors of a small layer.
    if value != "float32":
        dense_bytes = 64 * 128 * 4
        assert kernels["fc1"].bytes < dense_bytes


@pytest.mark.parametrize(
    ("structure", "value", "batch"),
    [
        ("dense", "kmeans3", 1), ("dense", "kmeans5", 8), ("dense", "binary", 3),
        ("dense", "ternary", 2), ("dense", "kmeans8", 1), ("dense", "kmeans8", 16),
        ("lowrank", "kmeans3", 2),
        ("lowrank", "float16", 1), ("pruning", "kmeans5", 16), ("pruning", "binary", 1),
    ],
)
def test_codebook_layers_get_the_table_lookup_kernel(
    methods, tmp_path, structure, value, batch
) -> None:
    """On a CPU with AVX-512, a Linear whose weights (both low-rank factors, the survivors
    of a pruned layer) are codes into a table computes with the written-out table-lookup
    kernels (float values keep the TE kernel), and gives what PyTorch gives; elsewhere every
    layer keeps the TE kernel. Tables of 8-bit codes are byte planes where the CPU has VBMI."""
    method, config = {**VALUES, "kmeans5": ("quantization", {"bits": 5})}[value]
    layer = LayerPlan(
        structure=Choice(method=structure, config=STRUCTURES[structure]),
        value=Choice(method=method, config=config),
    )
    plan = Plan(layers={name: layer for name in ("fc1", "fc2", "out")})
    lookup = "avx512f" in cpu_flags()
    vbmi = lookup and "avx512vbmi" in cpu_flags()
    got, want, notes, kernels = _compile(
        tmp_path, methods, "digits-mlp", plan, 1.0, batch, table_lookup=lookup, vbmi=vbmi,
        epilogues=True,
    )
    written = {name for name, kernel in kernels.items() if kernel.written is not None}
    tables = lookup and value != "float16"
    assert written == ({"fc1", "fc2", "out"} if tables else set())
    assert all("table lookup" in kernels[name].methods for name in written)
    fused = {note.split(":")[0] for note in notes if note.endswith("kernel's epilogue")}
    assert fused == ({"fc1", "fc2"} if tables else set()), notes  # each with its ReLU
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the decoding kernel needs AVX-512")
@pytest.mark.parametrize(
    ("value", "batch", "run", "ratio"),
    [("kmeans3", 1, 1, 0.1), ("kmeans8", 16, 1, 0.1), ("float16", 3, 1, 0.1),
     ("float32", 8, 1, 0.5), ("binary", 2, 1, 0.1), ("ternary", 1, 1, 0.1),
     ("kmeans3", 1, 16, 0.1), ("kmeans8", 16, 16, 0.1), ("float32", 8, 16, 0.5),
     ("uniform4", 2, 16, 0.02)],
)
def test_hashed_layers_get_the_decoding_kernel(methods, tmp_path, value, batch, run, ratio) -> None:
    """On a CPU with AVX-512 a hashed Linear is decoded 16 rows at a time in vector lanes
    (its hash computed in the kernel, its K values decoded once a call when they are few),
    and gives what PyTorch gives, for every value method and batch tile. In the run layout
    too: a column's 16 weights read at once, K values read where they are stored when too
    many to decode ahead (ratio 0.5), and runs that wrap around fewer than 16 values (the
    output layer's 13 at ratio 0.02)."""
    method, config = {**VALUES, "uniform4": ("quantization", {"bits": 4, "mode": "uniform"})}[value]
    layer = LayerPlan(
        structure=Choice(method="hashing", config={"ratio": ratio, "run": run}),
        value=Choice(method=method, config=config),
    )
    plan = Plan(layers={name: layer for name in ("fc1", "fc2", "out")})
    got, want, notes, kernels = _compile(
        tmp_path, methods, "digits-mlp", plan, 1.0, batch, table_lookup=True, epilogues=True
    )
    assert notes == [f"fc{n}: `relu{n}` computed in its kernel's epilogue" for n in (1, 2)]
    assert all("decoded in lanes" in kernel.methods for kernel in kernels.values())
    runs = {name for name, kernel in kernels.items() if "a run a vector" in kernel.methods}
    wrapped = {"out"} if ratio < 0.05 else set()  # K below 16: element by element
    assert runs == ({"fc1", "fc2", "out"} - wrapped if run > 1 else set())
    # Only the K values (at most float32 each) and the bias are stored: no index array.
    assert kernels["fc1"].bytes <= 64 * 128 * 4 * ratio + 128 * 4 + 64
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the table-lookup kernel needs AVX-512")
@pytest.mark.parametrize(
    ("batch", "rows", "columns", "size", "vbmi"),
    [
        (1, 40, 37, 16, False), (6, 17, 64, 3, False), (64, 33, 50, 32, False),
        (5, 16, 9, 2, False), (2, 21, 70, 20, False), (1, 18, 30, 256, False),
        (16, 35, 19, 100, False), (1, 18, 30, 256, True), (3, 17, 9, 33, True),
        (16, 35, 19, 100, True), (64, 40, 66, 256, True), (1, 20, 40, 129, True),
    ],
)
def test_the_table_lookup_kernel_computes_the_layer(batch, rows, columns, size, vbmi) -> None:
    """Every tiling the kernel uses (batch tiles of 8, 2 and 1, partial sums), rows and
    columns that do not fill a group or a word, each table width, and tables of more than
    32 entries read from memory and looked up as byte planes (with and without the blend on
    the top bit), directly and through the scratch block, against numpy."""
    if vbmi and "avx512vbmi" not in cpu_flags():
        pytest.skip("byte-plane lookups need AVX-512 VBMI")
    rng = np.random.default_rng(size)
    codes = rng.integers(0, size, (rows, columns))
    table = rng.standard_normal(size).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    x = rng.standard_normal((batch, columns)).astype(np.float32)
    target = resolve_target("cpu", 2)
    kernel = table_linear(batch, columns, rows, size, vbmi).with_attr("global_symbol", "main")
    library = tvm.compile(tvm.IRModule({"main": kernel}), target=target.tvm)
    stored = kernel_table(table, vbmi), pack_codes(codes, size, vbmi)
    arrays = [
        tvm.runtime.tensor(a) for a in (x, bias, *stored, np.zeros((batch, rows), np.float32))
    ]
    library["main"](*arrays)
    np.testing.assert_allclose(arrays[-1].numpy(), x @ table[codes].T + bias, atol=1e-4)


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the table-lookup kernel needs AVX-512")
@pytest.mark.parametrize(
    ("count", "size", "vbmi"),
    [(100, 16, False), (37, 32, False), (1000, 64, True), (77, 64, False), (5000, 256, True),
     (700, 128, True), (16, 3, False), (1, 2, False)],
)
def test_the_value_decoding_kernel_gives_the_values_in_order(count, size, vbmi) -> None:
    """The K values a hashed layer reads are decoded a chunk of codes at a time, as the
    table-lookup kernel looks up its weights: every table width (in registers, as byte
    planes, from memory), counts that do not fill a chunk, against numpy."""
    if vbmi and "avx512vbmi" not in cpu_flags():
        pytest.skip("byte-plane lookups need AVX-512 VBMI")
    rng = np.random.default_rng(count)
    codes = rng.integers(0, size, count)
    table = rng.standard_normal(size).astype(np.float32)
    kernel = table_values(count, size, vbmi).with_attr("global_symbol", "main")
    library = tvm.compile(tvm.IRModule({"main": kernel}), target=resolve_target("cpu", 2).tvm)
    values = tvm.runtime.tensor(np.zeros(table_values_length(count, size, vbmi), np.float32))
    x = np.zeros(1, np.float32)  # read once and dropped
    stored = (x, kernel_table(table, vbmi), pack_values(codes, size, vbmi))
    library["main"](*[tvm.runtime.tensor(a) for a in stored], values)
    assert np.array_equal(values.numpy()[:count], table[codes])


def test_a_convolution_hashed_in_runs_compiles_element_by_element(methods, tmp_path) -> None:
    """A convolution in the run layout has no kernel of its own: its TE form rebuilds each
    weight from its run (row = output channel, column = the flattened rest)."""
    layer = LayerPlan(
        structure=Choice(method="hashing", config={"ratio": 0.25, "run": 16}),
        value=Choice(method="quantization", config={"bits": 4}),
    )
    plan = Plan(layers={"conv2": layer})
    got, want, notes, kernels = _compile(tmp_path, methods, "fashion-mnist-cnn", plan, 0.5, 2)
    assert kernels["conv2"].form == "compressed", notes
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the table-lookup kernel needs AVX-512")
@pytest.mark.parametrize(
    ("batch", "size"), [(1, 32), (32, 5), (16, 200), (3, 2), (1, 200), (8, 16), (6, 30)]
)
def test_the_sparse_table_lookup_kernel_computes_the_layer(batch, size) -> None:
    """Rows of survivors (an empty one among them), one lane per batch row (batches of 16)
    or 16 survivors at a time for batch tiles of 8, 2 and 1 (others), with each table
    width, against numpy."""
    rng = np.random.default_rng(batch)
    rows, columns = 37, 300
    keep = rng.random((rows, columns)) < 0.2
    keep[5] = False
    codes = rng.integers(0, size, (rows, columns))
    table = np.zeros(table_entries(size), np.float32)
    table[:size] = rng.standard_normal(size)
    row_of, column = np.nonzero(keep)
    starts = np.searchsorted(row_of, np.arange(rows + 1)).astype(np.int32)
    bias = rng.standard_normal(rows).astype(np.float32)
    x = rng.standard_normal((batch, columns)).astype(np.float32)
    relu = batch % 2 == 0  # with a ReLU in the epilogue
    kernel = sparse_table_linear(batch, columns, rows, size, "uint16", relu)
    target = resolve_target("cpu", 2)
    library = tvm.compile(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target.tvm
    )
    padding = np.zeros(16, np.uint8)  # what the kernel's last vector of a row reads on
    stored = (
        np.concatenate([codes[row_of, column], padding]).astype(np.uint8),
        np.concatenate([column, padding]).astype(np.uint16),
        starts,
        table,
    )
    arrays = [
        tvm.runtime.tensor(a)
        for a in (x, bias, *stored, np.zeros((batch, rows), np.float32))
    ]
    library["main"](*arrays)
    want = x @ np.where(keep, table[codes], 0).T + bias
    np.testing.assert_allclose(arrays[-1].numpy(), np.maximum(want, 0) if relu else want,
                               atol=1e-4)


def test_conv_layers_compile_to_compressed_kernels(methods, tmp_path) -> None:
    kmeans = Choice(method="quantization", config={"bits": 4})
    plan = Plan(
        layers={
            "conv1": LayerPlan(structure=Choice(method="pruning", config={"threshold": 0.5}),
                               value=kmeans),
            "conv2": LayerPlan(structure=Choice(method="lowrank", config={"rank": 0.5}),
                               value=Choice(method="ternary", config={})),
            "fc1": LayerPlan(value=Choice(method="float", config={"bits": 16})),
        }
    )
    got, want, notes, kernels = _compile(tmp_path, methods, "fashion-mnist-cnn", plan, 0.25, 2)
    assert {"conv1", "conv2", "fc1"} <= set(kernels), notes
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def _modules(module) -> list:
    """A library module and every module it imports, depth first."""
    return [module, *(m for imported in module.imports for m in _modules(imported))]


@pytest.mark.parametrize(
    ("task_name", "layers"),
    [
        ("digits-mlp", {"fc1": ("hashing", "kmeans3"), "fc2": ("pruning", "kmeans8"),
                        "out": ("lowrank", "binary")}),
        ("digits-mlp", {"fc1": ("dense", "ternary"), "fc2": ("hashing", "float16"),
                        "out": ("dense", "kmeans8")}),
        ("fashion-mnist-cnn", {"conv1": ("pruning", "kmeans3"), "conv2": ("lowrank", "ternary"),
                               "fc1": ("hashing", "kmeans8")}),
    ],
)
def test_compressed_kernels_build_for_a_gpu_without_one(methods, tmp_path, task_name, layers):
    """A CUDA target needs no GPU to build for: every compressed kernel (the TE forms; the
    written-out kernels are for CPUs) gets a DLight schedule, and the library holds their
    CUDA source, compiled for sm_90 where nvcc is installed. The GEMV rule's analysis fails
    on the gathers of the codes; it declines them rather than stop the build. A hashed layer
    of 8-bit codes (HashedNets' element form) is among them."""
    plan = Plan(layers={
        name: LayerPlan(structure=Choice(method=structure, config=STRUCTURES[structure]),
                        value=Choice(method=VALUES[value][0], config=VALUES[value][1]))
        for name, (structure, value) in layers.items()
    })
    stubbed, _, notes, kernels = _lowered(tmp_path, methods, task_name, plan, 0.25)
    assert set(layers) <= set(kernels), notes
    target = cuda_target("sm_90")
    shape = tuple(methods.tasks[task_name].input_shape)
    fused = fuse(to_relax_lowered(stubbed, shape, [1, 4]), target, False)
    library = build_tuned(fused, target, ms.database.MemoryDatabase(), False)
    sources = [m.inspect_source() for m in _modules(library.mod) if m.kind == "cuda"]
    assert len(sources) == 1
    kernels_built = set(re.findall(r"\b(\w+?)_kernel\d*\(", sources[0]))
    for layer in layers:  # at both batch sizes
        assert {f"{layer}_compressed_b1", f"{layer}_compressed_b4"} <= kernels_built
    if shutil.which("nvcc"):
        (tmp_path / "model.cu").write_text(sources[0])
        subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "model.cubin"),
                        str(tmp_path / "model.cu")], check=True, capture_output=True)
        assert (tmp_path / "model.cubin").stat().st_size > 0


def test_gpu_tuning_skips_kernels_it_cannot_make_a_design_space_for(methods, tmp_path):
    """On a GPU, MetaSchedule makes design spaces for a codebook layer's TE kernel but not
    for a pruned one's (the bounds of its data-dependent reads): that one is left out of
    tuning, to keep the build's default schedule, rather than stop the compile."""
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    from autoshrink.compiler.tuning import _has_space, _quiet_meta_schedule

    kmeans = Choice(method="quantization", config={"bits": 4})
    plan = Plan(layers={
        "fc1": LayerPlan(structure=Choice(method="pruning", config={"threshold": 1.0}),
                         value=kmeans),
        "fc2": LayerPlan(value=kmeans),
    })
    stubbed, _, _, _ = _lowered(tmp_path, methods, "digits-mlp", plan, 0.25)
    target = cuda_target("sm_90")
    # as compiles do (not every architecture's: 35 s), a CPU compile first, as one session
    # compiling for both would: the second kind's intrinsics are added to the first's
    load_tensor_intrinsics("cpu")
    load_tensor_intrinsics("cuda")
    tasks = [t for t in extract_tasks(fuse(to_relax_lowered(stubbed, (64,), [1]), target, False),
                                      target.tvm)
             if t.task_name in ("fc1_compressed_b1", "fc2_compressed_b1")]
    with _quiet_meta_schedule():  # as tuning makes them (pytest's log handlers step aside)
        contexts, _ = extracted_tasks_to_tune_contexts(tasks, str(tmp_path / "logs"), seed=0)
    spaced = {t.task_name: _has_space(c) for t, c in zip(tasks, contexts, strict=True)}
    assert spaced == {"fc1_compressed_b1": False, "fc2_compressed_b1": True}


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the table-lookup kernel needs AVX-512")
@pytest.mark.parametrize(
    ("structure", "batch", "unfold_limit"),
    [("pruning", 1, None), ("pruning", 3, None), ("pruning", 2, 1000), ("dense", 2, None)],
)
def test_pruned_convolutions_get_the_sparse_table_lookup_kernel(
    methods, tmp_path, monkeypatch, structure, batch, unfold_limit
) -> None:
    """Pruned convolutions whose survivors are codes compute with the written-out sparse
    convolution (one image's taps and channels in parallel, or images in parallel) and give
    what PyTorch gives; one whose unfolded image would be over the limit keeps the generic
    sparse kernel. Dense convolutions of codes get it too, every tap a survivor."""
    if unfold_limit is not None:
        monkeypatch.setattr("autoshrink.compiler.lowering.MAX_UNFOLD", unfold_limit)
    config = {"threshold": 0.5} if structure == "pruning" else {}
    layer = LayerPlan(
        structure=Choice(method=structure, config=config),
        value=Choice(method="quantization", config={"bits": 5}),
    )
    plan = Plan(layers={"conv1": layer, "conv2": layer})
    got, want, notes, kernels = _compile(
        tmp_path, methods, "fashion-mnist-cnn", plan, 0.25, batch, table_lookup=True,
        epilogues=True,
    )
    for number, name in enumerate(("conv1", "conv2"), start=1):
        assert (kernels[name].written is not None) == (unfold_limit is None), notes
        assert ("sparse table lookup" in kernels[name].methods) == (unfold_limit is None)
        fused = f"{name}: `bn{number}`, `relu{number}`, `pool{number}` computed in its kernel"
        assert any(note.startswith(fused) for note in notes) == (unfold_limit is None), notes
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the table-lookup kernel needs AVX-512")
@pytest.mark.parametrize(
    ("batch", "image", "out", "geometry", "size", "dense", "pool"),
    [
        (1, (3, 9, 7), 5, ((3, 3), (1, 1), (1, 1), (1, 1)), 32, False, None),
        (2, (4, 8, 10), 6, ((3, 2), (2, 1), (0, 1), (1, 2)), 200, False, None),
        (3, (2, 5, 5), 33, ((1, 1), (1, 1), (0, 0), (1, 1)), 5, False, None),
        (2, (3, 20, 21), 4, ((3, 3), (1, 1), (1, 1), (1, 1)), 32, False, ((2, 2), (2, 2))),
        (2, (4, 8, 10), 6, ((3, 2), (2, 1), (0, 1), (1, 2)), 200, True, ((3, 2), (2, 1))),
        (1, (1, 28, 28), 8, ((3, 3), (1, 1), (1, 1), (1, 1)), 256, True, ((2, 2), (2, 2))),
        (1, (3, 9, 7), 5, ((3, 3), (1, 1), (1, 1), (1, 1)), 32, False, ((1, 1), (1, 1))),
    ],
)
def test_the_sparse_convolution_computes_the_layer(
    batch, image, out, geometry, size, dense, pool
) -> None:
    """Stride, padding and dilation per axis, output planes that do not fill a vector or that
    take several blocks of accumulators, one image and several, every tap kept (a dense
    convolution, no columns stored), against PyTorch's convolution; with an epilogue (a
    folded batch norm's scale, then a max pool and ReLU) against PyTorch's ops too."""
    rng = np.random.default_rng(size)
    (kh, kw), stride, padding, dilation = geometry
    taps = image[0] * kh * kw
    keep = rng.random((out, taps)) < 0.3
    keep[1] = False
    keep |= dense
    codes = rng.integers(0, size, (out, taps))
    table = rng.standard_normal(size).astype(np.float32)
    row_of, column = np.nonzero(keep)
    padding_entries = np.zeros(16, np.uint8)
    stored = (
        np.concatenate([codes[row_of, column], padding_entries]).astype(np.uint8),
        np.zeros(1, np.uint8) if dense else np.concatenate([column, padding_entries]).astype(
            np.uint16
        ),
        np.searchsorted(row_of, np.arange(out + 1)).astype(np.int32),
        kernel_table(table),
    )
    x = rng.standard_normal((batch, *image)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    weight = np.where(keep, table[codes], 0).reshape(out, image[0], kh, kw).astype(np.float32)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias),
        stride, padding, dilation,
    )
    scale = np.ones(out, np.float32)
    if pool is not None:  # a batch norm's scale (signs mixed), folded in; then pool and ReLU
        scale = rng.uniform(-2, 2, out).astype(np.float32)
        want = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(weight * scale[:, None, None, None]),
            torch.from_numpy(bias), stride, padding, dilation,
        )
        want = torch.relu(torch.nn.functional.max_pool2d(want, *pool))
    want = want.numpy()
    kernel = sparse_table_conv2d(
        batch, image, out, geometry, size, "uint8" if dense else "uint16", dense,
        relu=pool is not None, pool=pool,
    )
    library = tvm.compile(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
        target=resolve_target("cpu", 2).tvm,
    )
    codes, columns, starts, table = stored
    arrays = [
        tvm.runtime.tensor(a)
        for a in (x, bias, codes, columns, scale, starts, table, np.zeros_like(want))
    ]
    library["main"](*arrays)
    np.testing.assert_allclose(arrays[-1].numpy(), want, atol=1e-4)


def test_a_value_method_without_lowering_gives_float32_values(ternary, tmp_path) -> None:
    from autoshrink.methods import ValueMethod

    class PlainTernary(ternary.Ternary):
        name = "plain-ternary"
        lower = ValueMethod.lower  # the contract's default: no compiled form

    class Plain:  # a plugin object: its hooks are methods
        @hookimpl
        def register_methods(self, register) -> None:
            register(PlainTernary())

    registry = load_registry(extra_plugins=[ternary, Plain()])
    assert registry.problems == [] and "plain-ternary" in registry.methods
    plan = Plan(layers={"fc1": LayerPlan(
        structure=Choice(method="hashing", config={"ratio": 0.5}),
        value=Choice(method="plain-ternary", config={}),
    )})
    got, want, notes, kernels = _compile(tmp_path, registry, "digits-mlp", plan, 1.0, 4)
    assert {"fc1", "fc2", "out"} <= set(kernels)
    assert any("fc1: `plain-ternary` has no lowering" in note for note in notes), notes
    assert kernels["fc1"].arrays["shared.values"].dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_bundle_of_a_compressed_model_is_smaller_than_its_dense_compile(
    methods, tmp_path
) -> None:
    """The Fashion-MNIST MLP (2.4 M weights) at 4-bit k-means: the bundle holds the codes
    once; the dense compile holds float32 weights (per batch entry)."""
    task = methods.tasks["fashion-mnist-mlp"]
    plan = Plan(layers={
        name: LayerPlan(value=Choice(method="quantization", config={"bits": 4}))
        for name in ("fc1", "fc2", "out")
    })
    torch.manual_seed(0)
    path = tmp_path / "mlp.safetensors"
    model = compress(task.build_model(1.0), plan, methods)
    artifact_bytes = write_artifact(path, model, plan, task, methods)
    result = compile_artifact(
        path, methods, trials=0, batch=4, out=tmp_path / "bundle", torch_compile=False,
        rounds=1, task=task,
    )
    latency = result.latency
    assert latency["max_abs_error"] <= latency["tolerance"]
    assert latency["bundle_bytes"] == (tmp_path / "bundle" / "model.so").stat().st_size
    assert latency["bundle_bytes"] <= artifact_bytes + 512_000
    assert latency["bundle_bytes"] * 4 < latency["dense_bytes"]
    assert {row["form"] for row in latency["layers"]} <= {"compressed", "dense"}
    assert set(latency["engines"]) >= {"tvm_tuned", "tvm_dense", "torch_eager"}


def _prim_func(kernel, batch: int, features: int):
    """The kernel's TIR function for inputs of ``batch`` x ``features``."""
    from tvm import te

    x = te.placeholder((batch, features), name="x")
    tensors = {
        k: te.placeholder(kernel.arrays[k].shape, str(kernel.arrays[k].dtype), name=k)
        for k in sorted(kernel.arrays)  # the order of the kernel's call
    }
    y = kernel.compute(x, tensors)
    return te.create_prim_func([x, *tensors.values(), y])


def test_both_forms_of_a_float32_layer_name_their_stages_alike(methods, tmp_path) -> None:
    """MetaSchedule takes structurally equal functions for one workload whatever their
    stage names, and replays its schedules by stage name: equal kernels need equal names."""
    import re

    import tvm_ffi

    from autoshrink.compiler.layer_kernel import dense_kernel

    plan = Plan(layers={"fc1": LayerPlan(value=Choice(method="float", config={"bits": 32}))})
    _, _, _, kernels = _compile(tmp_path, methods, "digits-mlp", plan, 1.0, 2)
    layer = read_artifact(tmp_path / "model.safetensors", methods).model.fc1
    compressed = _prim_func(kernels["fc1"], 2, layer.in_features)
    dense = _prim_func(dense_kernel("fc1", layer), 2, layer.in_features)
    assert tvm_ffi.structural_equal(compressed, dense)
    stages = [re.findall(r'T\.sblock\("(\w+)"\)', f.script()) for f in (compressed, dense)]
    assert stages[0] == stages[1] and stages[0]


@pytest.mark.parametrize("shape", [(4, 8, 6, 6), (2, 3, 28, 28)])
def test_kernels_between_the_layers_run_in_parallel_and_in_vector_lanes(shape) -> None:
    """Batch norm and activations after an opaque compressed kernel are no schedule's
    business: the build runs their outer loops in parallel and their inner ones in vector
    lanes, and they compute the same."""
    from tvm import tirx

    from autoshrink.compiler.build import parallel_loops

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            shifted = builder.emit(relax.op.multiply(relax.op.subtract(x, relax.const(0.5)), x))
            out = builder.emit_output(relax.op.nn.relu(shifted))
        builder.emit_func_output(out)
    target = resolve_target("cpu", 2)
    mod = parallel_loops(fuse(builder.get(), target, False), 2)
    kernels = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert kernels and all(f.attrs["tirx.is_scheduled"] for f in kernels)
    assert all("T.parallel" in f.script() and "T.vectorized" in f.script() for f in kernels)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target.tvm), target.device)
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(got, np.maximum((data - 0.5) * data, 0), rtol=1e-6)
