"""Commands that look at what is installed and what a file holds: ``plugins``, ``space``,
``baseline``, ``eval``."""

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
from autoshrink.errors import UsageError
from autoshrink.knobs import config_distributions, describe
from autoshrink.methods import StructureMethod
from autoshrink.space import build_space, load_preset
from autoshrink.studies.progress import TrainingBar


@app.command("plugins")
def plugins_command(json_output: JsonOption = False) -> None:
    """List every registered method and task, with its stage, source and knobs (each knob's
    range and description)."""
    plugins = registry(settings())
    rows = []
    for method in plugins.methods.values():
        knobs = {
            name: describe(dist)
            for name, dist in config_distributions(method.Config, owner=method.name).items()
        }
        fields = method.Config.model_fields
        descriptions = {name: fields[name].description or "" for name in knobs}
        applies = (
            ", ".join(t.__name__ for t in method.applies_to)
            if isinstance(method, StructureMethod)
            else "-"
        )
        rows.append(
            {
                "name": method.name,
                "stage": str(method.stage),
                "source": plugins.sources[method.name],
                "applies_to": applies,
                "knobs": knobs,
                "knob_descriptions": descriptions,
                "summary": method.summary,
            }
        )
    tasks = [
        {"name": t.name, "source": plugins.sources[t.name], "description": t.description}
        for t in plugins.tasks.values()
    ]
    if json_output:
        print(json.dumps({"methods": rows, "tasks": tasks}, indent=2))
        return
    table = Table(title="Methods")
    for column in ("name", "stage", "source", "applies to", "knobs", "summary"):
        table.add_column(column)
    for row in rows:
        knobs = "\n".join(
            f"{k} {v}" + (f": {row['knob_descriptions'][k]}" if row["knob_descriptions"][k] else "")
            for k, v in row["knobs"].items()
        ) or "-"
        table.add_row(
            row["name"], row["stage"], row["source"], row["applies_to"], knobs, row["summary"]
        )
    console.print(table)
    table = Table(title="Tasks")
    for column in ("name", "source", "description"):
        table.add_column(column)
    for task in tasks:
        table.add_row(task["name"], task["source"], task["description"])
    console.print(table)


@app.command("space")
def space_command(
    task: TaskOption = None,
    space: Annotated[
        str | None, typer.Option("--space", help="Preset name in search_spaces/ or a .toml path.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Print the per-layer search space of a task's model."""
    config = settings(task=task, space=space)
    plugins = registry(config)
    chosen = task_of(config.task, plugins)
    preset = load_preset(config.space)
    built = build_space(chosen.build_model(1.0), plugins, preset, narrows=chosen.narrows)
    rows = built.rows()
    if json_output:
        print(json.dumps(dict(rows), indent=2))
        return
    table = Table(title=f"Search space of {chosen.name} ({preset.name})")
    table.add_column("parameter")
    table.add_column("range")
    for name, dist in rows:
        table.add_row(name, dist)
    console.print(table)
    for note in built.notes:
        console.print(f"note: {note}", highlight=False)


@app.command("baseline")
def baseline_command(
    task: TaskOption = None,
    data_dir: DataDirOption = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="Use your trained weights (a safetensors state dict)."),
    ] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Ignore the cache.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Train (once, then cached) or show a task's baseline: bytes, validation and test accuracy."""
    from autoshrink.baseline import load_baseline

    config = settings(task=task, data_dir=data_dir)
    plugins = registry(config)
    chosen = task_of(config.task, plugins)
    data = chosen.load_data(config.data_dir)
    with TrainingBar(errors, f"{chosen.name} baseline") as (progress, bar):
        result = load_baseline(
            chosen,
            data,
            plugins,
            weights=weights,
            retrain=retrain,
            on_step=lambda done, total: progress.update(bar, completed=done, total=total),
        )
    summary, metric = result.summary(), chosen.judged_by
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]{chosen.name}[/] baseline ({'trained now' if result.trained else 'cached'}): "
        f"{result.bytes:,} bytes ({humanize.naturalsize(result.bytes)}), "
        f"validation {chosen.metric_name} {metric.text(result.val_accuracy)}, test "
        f"{'not measured' if result.test_accuracy is None else metric.text(result.test_accuracy)}\n"
        f"artifact: {result.path}",
        highlight=False,
    )


@app.command("eval")
def eval_command(
    file: Annotated[Path, typer.Argument(help="An artifact file written by autoshrink.")],
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="The task, when the file names a `module:function` task (never imported from "
            "a file unless you say so here).",
        ),
    ] = None,
    data_dir: DataDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Reload an artifact and print its size in bytes and its test accuracy."""
    from autoshrink.artifact import read_artifact
    from autoshrink.training import evaluate

    config = settings(task=task, data_dir=data_dir)
    plugins = registry(config)
    explicit = task_of(task, plugins) if task else None
    artifact = read_artifact(file, plugins, explicit)
    chosen = explicit or plugins.tasks[artifact.header.task]
    data = chosen.load_data(config.data_dir)
    if data.test is None:
        raise UsageError(f"task `{chosen.name}` has no test data to evaluate on")
    accuracy = evaluate(artifact.model, data.test, chosen.metric)
    result = {
        "file": str(file),
        "task": chosen.name,
        "bytes": artifact.bytes,
        "test_accuracy": accuracy,
        "plan": artifact.header.plan.model_dump(exclude_defaults=True),
    }
    if json_output:
        print(json.dumps(result, indent=2))
        return
    console.print(
        f"{file}: {artifact.bytes:,} bytes ({humanize.naturalsize(artifact.bytes)}), "
        f"task {chosen.name}, test {chosen.metric_name} "
        f"{f'{accuracy:.4%}' if chosen.judged_by.percent else f'{accuracy:.6g}'}",
        highlight=False,
    )


