"""The ``compile`` command: an artifact into a TVM bundle, timed beside its peers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import humanize
import typer
from rich.table import Table

from autoshrink.cli.app import (
    DataDirOption,
    JsonOption,
    TaskOption,
    app,
    console,
    errors,
    registry,
    settings,
    task_of,
)


@app.command("compile")
def compile_command(
    file: Annotated[Path, typer.Argument(help="An artifact file written by autoshrink.")],
    target: Annotated[
        str, typer.Option("--target", help="cpu, or cuda (needs a CUDA GPU on this machine).")
    ] = "cpu",
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials",
            help="Tuning measurements in all (default 256); 0 tunes nothing and uses what the "
            "tuning database already holds.",
        ),
    ] = None,
    batch: Annotated[
        int, typer.Option("--batch", help="Batch size compiled and timed, besides 1.")
    ] = 64,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: FILE's name + `-compiled`)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads of every engine (default: all cores).")
    ] = None,
    torch_compile: Annotated[
        bool,
        typer.Option(
            "--torch-compile/--no-torch-compile",
            help="Also time torch.compile (inductor; compiling it takes about a minute).",
        ),
    ] = True,
    task: TaskOption = None,
    data_dir: DataDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Compile an artifact with TVM into a bundle that runs without PyTorch, its weights kept
    in their compressed form and decoded inside the kernels (MetaSchedule tuning, reused
    across runs); check it computes what the artifact does and time it beside a dense TVM
    compile, PyTorch and ONNX Runtime: writes model.so, compiled.json and latency.json."""
    from autoshrink.compiler import compile_artifact, resolve_target
    from autoshrink.errors import DataNotFoundError
    from autoshrink.header import read_header

    config = settings(task=task, data_dir=data_dir, tune_trials=trials)
    plugins = registry(config)
    resolve_target(target, 1)  # a missing GPU fails here, before anything is loaded
    explicit = task_of(task, plugins) if task else None
    name = read_header(file)[0].task
    chosen = explicit or plugins.tasks.get(name)
    test = None
    if chosen is not None:
        try:
            test = chosen.load_data(config.data_dir).test
        except DataNotFoundError as exc:
            errors.print(f"[yellow]warning:[/] accuracy not checked: {exc}", highlight=False)
    result = compile_artifact(
        file,
        plugins,
        target=target,
        trials=config.tune_trials,
        batch=batch,
        out=out,
        threads=threads,
        task=explicit,
        test=test,
        torch_compile=torch_compile,
        console=errors,
    )
    latency = result.latency
    if json_output:
        print(json.dumps({"folder": str(result.folder), **latency}, indent=2))
        return
    _print_latency(latency)
    tuning = latency["tuning"]
    spent = [tuning[part] for part in ("layers", "model", "dense")]
    lines = [
        f"bundle: {result.folder} ({humanize.naturalsize(latency['bundle_bytes'])} to ship: "
        f"{latency['bundle_bytes']:,} B for a {latency['artifact_bytes']:,} B artifact; "
        f"the dense compile takes {latency['dense_bytes']:,} B)",
        *(
            f"  {row['layer']}: {row['form']} kernel ({row['methods']}; {row['why']}; "
            + ", ".join(
                f"{form} b{b} {ms:.4f} ms" for form, times in row["ms"].items()
                for b, ms in times.items()
            )
            + ")"
            for row in latency["layers"]
        ),
        f"tuning: {sum(t['trials'] for t in spent)} trials in "
        f"{sum(t['seconds'] for t in spent):.0f} s, "
        f"{sum(t['reused'] for t in spent)} of {sum(t['tasks'] for t in spent)} kernels "
        f"already tuned (database {tuning['database']})",
        f"max |TVM - PyTorch| {latency['max_abs_error']:.2g} "
        f"(tolerance {latency['tolerance']:.2g})",
    ]
    accuracy = latency.get("accuracy")
    if accuracy:
        lines.append(
            f"test accuracy: TVM {accuracy['tvm']:.4%}, PyTorch {accuracy['torch']:.4%}, same "
            f"prediction on {accuracy['argmax_agreement']:.2%} of {accuracy['examples']} examples"
        )
    lines.extend(f"note: {note}" for note in latency.get("notes", []))
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


def _print_latency(latency: dict) -> None:
    batches = [str(b) for b in latency["batches"]]
    table = Table(
        title=f"Median latency (ms), {latency['threads']} threads, {latency['target']}, "
        f"{latency['machine']}"
    )
    table.add_column("engine")
    for batch in batches:
        table.add_column(f"batch {batch}", justify="right")
    eager = latency["engines"].get("torch_eager", {})
    for engine, times in latency["engines"].items():
        cells = []
        for batch in batches:
            ms, base = times.get(batch), eager.get(batch)
            ratio = f" ({base / ms:.1f}x)" if ms and base and engine != "torch_eager" else ""
            cells.append("-" if ms is None else f"{ms:.4f}{ratio}")
        table.add_row(engine, *cells)
    console.print(table)
    console.print("(x) = speedup over PyTorch eager", highlight=False)


