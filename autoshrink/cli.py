"""The ``autoshrink`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import humanize
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autoshrink.errors import AutoshrinkError
from autoshrink.methods import StructureMethod
from autoshrink.plugins import Registry, load_registry
from autoshrink.progress import TrainingBar
from autoshrink.settings import Settings, load_settings
from autoshrink.space import build_space, config_distributions, describe, load_preset
from autoshrink.tasks import Task, resolve_task

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


@app.command("plugins")
def plugins_command(json_output: JsonOption = False) -> None:
    """List every registered method and task, with its stage, source and knobs."""
    plugins = registry(settings())
    rows = []
    for method in plugins.methods.values():
        knobs = {
            name: describe(dist)
            for name, dist in config_distributions(method.Config, owner=method.name).items()
        }
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
        knobs = "\n".join(f"{k} {v}" for k, v in row["knobs"].items()) or "-"
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
    rows = build_space(chosen.build_model(1.0), plugins, preset).rows()
    if json_output:
        print(json.dumps(dict(rows), indent=2))
        return
    table = Table(title=f"Search space of {chosen.name} ({preset.name})")
    table.add_column("parameter")
    table.add_column("range")
    for name, dist in rows:
        table.add_row(name, dist)
    console.print(table)


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
    summary = result.summary()
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]{chosen.name}[/] baseline ({'trained now' if result.trained else 'cached'}): "
        f"{result.bytes:,} bytes ({humanize.naturalsize(result.bytes)}), "
        f"validation {result.val_accuracy:.2%}, test {result.test_accuracy:.2%}\n"
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
        f"task {chosen.name}, test {chosen.metric_name} {accuracy:.4%}",
        highlight=False,
    )


def _pct(value: float | None) -> str:
    return "not measured (no test data)" if value is None else f"{value:.2%}"


def _print_outcome(outcome) -> None:
    summary = outcome.summary
    best = next((m for m in summary["front"] if m["trial"] == summary["best"]), None)
    console.print(
        f"\nstudy [bold]{outcome.folder.name}[/] finished in "
        f"{humanize.naturaldelta(outcome.seconds)}: {outcome.folder.root}"
    )
    if best is None:
        console.print("[yellow]no trial fit the budget[/]: raise `--budget` or search longer")
    else:
        console.print(
            f"recommended: trial {best['trial']}, {best['bytes']:,} bytes "
            f"({best['ratio']:.1f}x smaller than {summary['baseline']['bytes']:,}), "
            f"validation {best['val_accuracy']:.2%}, test {_pct(best['test_accuracy'])} "
            f"(baseline test {_pct(summary['baseline']['test_accuracy'])})"
            + (f", after retraining {best['retrained']['epochs']:g} epochs (search: "
               f"validation {best['search']['val_accuracy']:.2%})" if "search" in best else "")
            + f"\nfile: {outcome.folder.root / 'best.safetensors'}",
            highlight=False,
        )
    console.print(
        f"report: {outcome.folder.root / 'report.md'}\n"
        f"search longer: `autoshrink resume {outcome.folder.name} --trials N` (N in total), or "
        "start with `--trials`/`--timeout`; `--backend ray --workers 2` runs trials in parallel",
        highlight=False,
    )


@app.command("search")
def search_command(
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            help="Hard size limit of the artifact file: 5MB = 5,000,000 bytes, "
            "5MiB = 5,242,880 bytes (SI and binary units both accepted). Required.",
        ),
    ] = None,
    task: TaskOption = None,
    space: Annotated[
        str | None, typer.Option("--space", help="Preset name in search_spaces/ or a .toml path.")
    ] = None,
    trials: Annotated[int | None, typer.Option("--trials", help="Number of trials.")] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Stop starting trials after this many s.")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            "--sampler", help="tpe (default; best at tens of trials), nsga2 (hundreds) or random."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of sampler and training.")
    ] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name (folder).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Reports folder.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="local or ray.")] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Record trials in a database: sqlite:///path, postgresql://..., "
            "mysql+pymysql://... (default: the journal file in the study folder).",
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Parallel trials (ray).")] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Join a Ray cluster (`auto` works).")
    ] = None,
    finetune_steps: Annotated[
        int | None, typer.Option("--finetune-steps", help="Fine-tune minibatches per trial.")
    ] = None,
    compile_best: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="After the search, compile the recommended model with TVM and time it beside "
            "PyTorch (as `autoshrink compile`). Off by default: tuning takes minutes, and the "
            "default search stays fast.",
        ),
    ] = None,
    compile_front: Annotated[
        bool | None,
        typer.Option(
            "--compile-front",
            help="Compile every Pareto front member, not only the recommended model.",
        ),
    ] = None,
    tune_trials: Annotated[
        int | None,
        typer.Option("--tune-trials", help="Tuning measurements for --compile (default 256)."),
    ] = None,
    retrain_epochs: Annotated[
        float | None,
        typer.Option(
            "--retrain-epochs",
            help="After the search, retrain the best front members for this many epochs "
            "(default 2; 0 = off).",
        ),
    ] = None,
    retrain_top: Annotated[
        int | None,
        typer.Option("--retrain-top", help="How many front members to retrain (default 10)."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Search per-layer compression plans for the best accuracy at each size under a budget."""
    from autoshrink.session import run_search

    config = settings(
        budget=budget,
        task=task,
        space=space,
        trials=trials,
        timeout=timeout,
        sampler=sampler,
        seed=seed,
        study=study,
        out=out,
        backend=backend,
        storage=storage,
        workers=workers,
        ray_address=ray_address,
        finetune_steps=finetune_steps,
        compile=compile_best,
        compile_front=compile_front,
        tune_trials=tune_trials,
        retrain_epochs=retrain_epochs,
        retrain_top=retrain_top,
        data_dir=data_dir,
    )
    registry(config)
    _print_outcome(run_search(config, console, resume=False))


@app.command("resume")
def resume_command(
    study: Annotated[str, typer.Argument(help="Name of the study folder under --out.")],
    trials: Annotated[
        int | None, typer.Option("--trials", help="Total trials to reach (default: as started).")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to run.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Reports folder.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Parallel trials (ray).")] = None,
) -> None:
    """Continue an interrupted or finished study, keeping its trials."""
    from autoshrink.session import run_search

    config = settings(study=study, trials=trials, timeout=timeout, out=out, workers=workers)
    registry(config)
    _print_outcome(run_search(config, console, resume=True))


@app.command("report")
def report_command(
    study: Annotated[
        str, typer.Argument(help="Name of the study folder under --out, or the folder's path.")
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Reports folder.")] = None,
    open_page: Annotated[
        bool, typer.Option("--open", help="Open index.html in a web browser.")
    ] = False,
) -> None:
    """Rebuild a study's index.html, report.md and pareto.json from its journal, also while
    its search is still running."""
    import webbrowser

    from autoshrink.report import regenerate
    from autoshrink.session import study_folder
    from autoshrink.study import StudyFolder

    config = settings(study=study, out=out)
    registry(config)
    given = Path(study)
    # A path (reports/NAME) works as well as a bare name, which is looked up under --out.
    is_path = len(given.parts) > 1 and (given / "settings.json").is_file()
    folder = StudyFolder(given.resolve()) if is_path else study_folder(config)
    summary = regenerate(folder)
    counts = summary["counts"]
    page = folder.root / "index.html"
    console.print(
        f"study {folder.name}: {counts['complete']} complete ({counts['over_budget']} over "
        f"budget), {counts['failed']} failed, {counts['running']} running\n"
        f"report: {page}\nalso: {folder.root / 'report.md'}, {folder.root / 'pareto.json'}",
        highlight=False,
        soft_wrap=True,
    )
    if open_page and not webbrowser.open(page.as_uri()):
        console.print(f"no web browser found here; open {page} in one", soft_wrap=True)


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
    from autoshrink.artifact import read_header
    from autoshrink.compile import compile_artifact, resolve_target
    from autoshrink.errors import DataNotFoundError

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


@app.command("doctor")
def doctor_command(
    study: Annotated[str, typer.Argument(help="Name of the study folder under --out.")],
    out: Annotated[Path | None, typer.Option("--out", help="Reports folder.")] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Rewrite a damaged journal with the records that can be kept (after a backup).",
        ),
    ] = False,
) -> None:
    """Check a study's journal and files; with --repair, fix a damaged journal."""
    from autoshrink.journal import check_journal
    from autoshrink.journal import repair as repair_journal
    from autoshrink.lock import StudyLock
    from autoshrink.session import study_folder

    folder = study_folder(settings(study=study, out=out))
    if folder.settings.is_file() and folder.load_settings().storage is not None:
        console.print(
            f"study `{folder.name}` records its trials in a database, not a journal file: "
            "nothing to check here", highlight=False,
        )
        return
    if not folder.journal.is_file():
        raise AutoshrinkError(f"no study journal in {folder.root}")
    found = check_journal(folder.journal)
    console.print(f"journal {folder.journal}: {found.records} complete records", highlight=False)
    if found.tail:
        console.print(
            f"- the last record is cut off ({len(found.tail)} bytes); `resume` moves it "
            "aside by itself", highlight=False,
        )
    for number, why in found.bad:
        console.print(f"- line {number} {why}", highlight=False)
    if found.records == 0 and folder.has_artifacts():
        console.print("- the journal holds no records, but trial artifacts exist", highlight=False)
    if not found.bad:
        if not found.tail:
            console.print("nothing to repair", highlight=False)
        return
    if not repair:
        raise AutoshrinkError(
            f"the journal of `{folder.name}` is damaged; `autoshrink doctor {folder.name} "
            "--repair` keeps what can be kept, after a backup"
        )
    with StudyLock(folder.root):
        backup, what = repair_journal(folder.journal)
    console.print(f"repaired: {what}; the original is in {backup.name}", highlight=False)


def _debugging() -> bool:
    return State.debug or os.environ.get("AUTOSHRINK_DEBUG", "") not in ("", "0")


def main() -> None:
    """Console entry point: one line per error, exit 2 for usage errors and 1 for failures;
    a traceback only with ``--debug`` or ``AUTOSHRINK_DEBUG=1``."""
    try:
        app()
    except AutoshrinkError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            errors.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        if _debugging():
            raise
        errors.print(f"[red]error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _one_line(exc: BaseException) -> str:
    """An unexpected error as one line: what failed, where to look next."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{text[:300]} (`--debug` shows where)"
