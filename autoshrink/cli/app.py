"""The command line's app, its shared options and helpers; the commands live in the
modules beside this one, one per group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from autoshrink.registry import Registry, load_registry
from autoshrink.settings import Settings, load_settings
from autoshrink.tasks import Task, resolve_task

__all__ = ["State", "app", "console", "errors", "registry", "settings", "task_of"]

app = typer.Typer(
    help="Find the per-layer mix of compression methods that keeps a model accurate under a "
    "byte budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

TaskOption = Annotated[
    str | None,
    typer.Option("--task", help="Registered task name or `package.module:function`."),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder with the task's data (Fashion-MNIST IDX files)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


class State:
    strict_plugins: bool | None = None
    debug: bool = False


def registry(settings: Settings) -> Registry:
    """The loaded plugins; problems with third-party plugins print as warnings."""
    loaded = load_registry(strict=settings.strict_plugins)
    for problem in loaded.problems:
        errors.print(f"[yellow]warning:[/] {problem}", highlight=False)
    return loaded


def settings(**flags: object) -> Settings:
    return load_settings(strict_plugins=State.strict_plugins, **flags)


def task_of(name: str, plugins: Registry) -> Task:
    return resolve_task(name, plugins.tasks)


@app.callback()
def main_options(
    strict_plugins: Annotated[
        bool | None,
        typer.Option(
            "--strict-plugins/--lenient-plugins",
            help="Fail on a broken third-party plugin instead of skipping it with a warning.",
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show the traceback of an unexpected error (also AUTOSHRINK_DEBUG=1)."
        ),
    ] = False,
) -> None:
    """autoshrink: compress trained networks by searching per-layer method mixes."""
    State.strict_plugins = strict_plugins
    State.debug = debug


