"""Commands that run and look after studies: ``search``, ``resume``, ``report``,
``doctor``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import humanize
import typer

from autoshrink.cli.app import (
    DataDirOption,
    TaskOption,
    app,
    console,
    registry,
    settings,
)
from autoshrink.errors import AutoshrinkError
from autoshrink.metric import Metric


def _pct(value: float | None, metric: Metric) -> str:
    return "not measured (no test data)" if value is None else metric.text(value)


def _print_outcome(outcome) -> None:
    summary = outcome.summary
    best = next((m for m in summary["front"] if m["trial"] == summary["best"]), None)
    metric = Metric.of(summary)
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
            f"validation {metric.name} {metric.text(best['val_accuracy'])}, test "
            f"{_pct(best['test_accuracy'], metric)} "
            f"(baseline test {_pct(summary['baseline']['test_accuracy'], metric)})"
            + (f", after retraining {best['retrained']['epochs']:g} epochs (search: "
               f"validation {metric.text(best['search']['val_accuracy'])})" if "search" in best
               else "")
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
    max_retries: Annotated[
        int | None,
        typer.Option(
            "--max-retries",
            help="Ray: run a trial again this many times when its worker dies (default 1).",
        ),
    ] = None,
    finetune_steps: Annotated[
        int | None, typer.Option("--finetune-steps", help="Fine-tune minibatches per trial.")
    ] = None,
    stop_early: Annotated[
        bool | None,
        typer.Option(
            "--stop-early/--no-stop-early",
            help="Stop a trial once its compressed form is complete (60% into its fine-tune) "
            "when two no larger trials were ahead of it at that point.",
        ),
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
            help="After the search, retrain the best front members for about this many "
            "epochs: from half to four times it, by how far each fell short of the "
            "baseline (default 2; 0 = off).",
        ),
    ] = None,
    retrain_top: Annotated[
        int | None,
        typer.Option(
            "--retrain-top",
            help="How many front members to retrain, spread along it by size, besides the "
            "trials that ran the preset's starting plans, which are retrained on the front or "
            "not (default: one member per 8 trials in all, at least 4, the starts first).",
        ),
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
        max_retries=max_retries,
        finetune_steps=finetune_steps,
        stop_early=stop_early,
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

    from autoshrink.session import regenerate, study_folder
    from autoshrink.studies.study import StudyFolder

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
    from autoshrink.session import study_folder
    from autoshrink.studies.journal import check_journal
    from autoshrink.studies.journal import repair as repair_journal
    from autoshrink.studies.lock import StudyLock

    folder = study_folder(settings(study=study, out=out))
    if folder.settings.is_file() and folder.recorded_storage() is not None:
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


