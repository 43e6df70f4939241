"""One search as a user runs it: checks first, progress while it runs, a report at the end.

Bad input (a budget below the smallest model the space can express, an unreachable Ray
address, a study name already taken) is refused before any training. Ctrl-C stops after the
finished trials are saved; ``autoshrink resume`` continues.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import humanize
import optuna
from rich.console import Console

from autoshrink.budget import smallest_artifact, tighten_to_fit
from autoshrink.errors import AutoshrinkError, UsageError
from autoshrink.plan import Plan
from autoshrink.reports import write_report
from autoshrink.settings import Settings
from autoshrink.space import params_of
from autoshrink.studies.folder import Identity, new_identity, study_identity
from autoshrink.studies.journal import heal_for_append
from autoshrink.studies.local import run_trials
from autoshrink.studies.lock import StudyBusyError, StudyLock
from autoshrink.studies.pareto import (
    Facts,
    collect,
    facts_of,
    keep_front_only,
    measure_tests,
    read_facts,
    record_facts,
)
from autoshrink.studies.progress import SearchProgress, TrainingBar
from autoshrink.studies.retrain import retrain_front
from autoshrink.studies.setup import (
    Provided,
    SearchOptions,
    SearchSetup,
    prepare,
    resolve,
    untrained_limit,
)
from autoshrink.studies.storage import address_of, display, open_storage
from autoshrink.studies.study import (
    START,
    StudyFolder,
    check_metric,
    fail_interrupted,
    finished,
    load_study_readonly,
    open_study,
)
from autoshrink.trial import TrialBudget

__all__ = [
    "Interrupted", "regenerate", "run_search", "search_options", "settings_of", "study_folder",
]

DEFAULT_TRIALS = 24


def trials_asked(settings: Settings) -> int | None:
    """Trials the search runs in all: ``--trials``, else the default unless a timeout
    bounds it (``None``: until the timeout)."""
    if settings.trials is None and settings.timeout is None:
        return DEFAULT_TRIALS
    return settings.trials


class Interrupted(AutoshrinkError):
    """The user stopped the search; finished trials are saved."""

    exit_code = 130


@dataclass
class SearchOutcome:
    folder: StudyFolder
    summary: dict[str, Any]
    seconds: float


def study_folder(settings: Settings) -> StudyFolder:
    """The folder of the study the settings name (or a new timestamped name)."""
    name = settings.study or f"{settings.task.replace(':', '-')}-{datetime.now():%Y%m%d-%H%M%S}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"`--study` {name!r}: use letters, digits, '-', '_' or '.' only")
    return StudyFolder(Path(settings.out).resolve() / name)


def search_options(settings: Settings, folder: StudyFolder) -> SearchOptions:
    """The engine's typed options from the settings of the study in ``folder``: the one place
    the budget becomes an ``int`` of bytes."""
    if settings.budget is None:
        raise UsageError("`--budget` is required, e.g. `--budget 5MB`")
    budget = int(settings.budget)
    return SearchOptions(
        budget=budget,
        task=settings.task,
        space=settings.space,
        storage=address_of(settings.storage, folder.journal),
        trial=TrialBudget(
            finetune_steps=settings.finetune_steps,
            distill_steps=3 * settings.finetune_steps,
            seconds=settings.trial_timeout,
            size_limit=untrained_limit(budget),
        ),
        seed=settings.seed,
        sampler=settings.sampler,
        backend=settings.backend,
        workers=settings.workers,
        ray_address=settings.ray_address,
        max_retries=settings.max_retries,
        timeout=settings.timeout,
        trials=trials_asked(settings),
        stop_early=settings.stop_early,
        retrain_epochs=settings.retrain_epochs,
        retrain_top=settings.retrain_top or 0,
        tune_trials=settings.tune_trials,
        data_dir=settings.data_dir,
        strict_plugins=settings.strict_plugins,
        record=json.dumps(
            {**json.loads(settings.model_dump_json()), "storage": display(settings.storage) or None}
        ),
    )


def settings_of(folder: StudyFolder) -> Settings:
    """The settings a study was started with (its ``settings.json``)."""
    if not folder.settings.is_file():
        raise UsageError(
            f"no study in {folder.root} (no settings.json); start one with `autoshrink search`"
        )
    try:
        return Settings.model_validate_json(folder.settings.read_bytes())
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise UsageError(
            f"{folder.settings} is damaged ({str(exc).splitlines()[0]}); restore it from a "
            "copy of the study folder"
        ) from None


def save_settings(folder: StudyFolder, settings: Settings, identity: Identity) -> None:
    """Record the study's identity, settings and command line, so that it can be resumed
    and reproduced (its folder exists already: creating it is how a search claims a name)."""
    folder.identity.write_text(json.dumps({"name": identity.name, "id": identity.id}) + "\n")
    folder.settings.write_text(settings.model_dump_json(indent=2))
    command = ["autoshrink", *(display(word) for word in sys.argv[1:])]
    (folder.root / "command.txt").write_text(shlex.join(command) + "\n")


def fitted_starts(
    setup: SearchSetup, budget: int, console: Console, trials: int | None = None
) -> list[tuple[int, Plan]]:
    """The space's starting plans (the first ``trials`` of them: a search of fewer trials
    than starts leaves none waiting) with their numbers in the preset, each tightened to fit
    ``budget`` where it does not (the methods kept); a start no setting of its methods fits
    is left out. Says which."""
    fitted = []
    with console.status("checking the starting plans against the budget"):
        for number, plan in enumerate(setup.space.starts[:trials], start=1):
            found = tighten_to_fit(plan, setup.task, setup.space, setup.registry, budget,
                                   setup.baseline.model)
            if found is None:
                console.print(f"start {number} left out: none of its settings fits the budget",
                              highlight=False)
            elif found != plan:
                console.print(f"start {number} tightened to fit the budget", highlight=False)
            if found is not None and params_of(setup.space, found) is not None:
                fitted.append((number, found))
    return fitted


def check_budget(options: SearchOptions, console: Console, provided: Provided | None) -> None:
    """Refuse a budget below the smallest artifact the space can express."""
    registry, task, space = resolve(options, provided)
    with console.status("measuring the smallest model the search space can express"):
        smallest, _ = smallest_artifact(task, space, registry)
    if options.budget < smallest:
        raise UsageError(
            f"`--budget` {options.budget:,} bytes is below the smallest model this search "
            f"space can express, {smallest:,} bytes ({humanize.naturalsize(smallest)}); "
            "raise the budget or allow smaller settings in the preset"
        )


def check_ray(settings: Settings) -> None:
    """Start or join the Ray cluster now, so a bad address fails before any training."""
    if settings.backend == "ray":
        from autoshrink.studies.ray_cluster import connect

        connect(settings.ray_address, settings.workers)


def run_search(
    settings: Settings, console: Console, *, resume: bool, provided: Provided | None = None
) -> SearchOutcome:
    """Run (or resume) the search ``settings`` describe and write its report. The study
    folder is locked for the whole run (one writer per study); a new study's folder is
    created first, atomically, and removed again if the search fails before it starts."""
    start = time.monotonic()
    folder = study_folder(settings)
    if resume:
        if not folder.root.is_dir():
            raise UsageError(
                f"no study `{folder.name}` in {folder.root.parent}; `autoshrink search` starts one"
            )
        with StudyLock(folder.root):
            return _run(settings, folder, console, start, resume=True, provided=provided)
    if settings.storage is not None:  # checked, and made absolute, before anything exists
        settings = settings.model_copy(
            update={"storage": address_of(settings.storage, folder.journal)}
        )
    _claim(folder)
    try:
        with StudyLock(folder.root):
            return _run(settings, folder, console, start, resume=False, provided=provided)
    except StudyBusyError:
        raise  # another process took the new folder's lock first: it is theirs now
    except BaseException:
        if not folder.identity.exists():  # no study was written yet: free the name again
            shutil.rmtree(folder.root, ignore_errors=True)
        raise


def _claim(folder: StudyFolder) -> None:
    """Create the study's folder: the one atomic step that claims its name."""
    try:
        folder.root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the study folder {folder.root}: {exc.strerror or exc}; choose "
            "another `--out`"
        ) from None
    if not folder.root.parent.is_dir():
        raise UsageError(
            f"cannot create the study folder {folder.root}: {folder.root.parent} is not a "
            "folder; choose another `--out`"
        )
    try:
        folder.root.mkdir()
    except FileExistsError:
        raise UsageError(
            f"study `{folder.name}` already exists in {folder.root.parent}; continue it with "
            f"`autoshrink resume {folder.name}` or choose another `--study` name"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot create the study folder {folder.root}: {exc.strerror or exc}; choose "
            "another `--out`"
        ) from None


def _run(
    settings: Settings, folder: StudyFolder, console: Console, start: float, *, resume: bool,
    provided: Provided | None,
) -> SearchOutcome:
    if resume:
        settings = settings_of(folder).model_copy(
            update={
                k: v
                for k, v in settings.model_dump(exclude_unset=True).items()
                if k in {"trials", "timeout", "workers", "backend", "ray_address",
                         "retrain_epochs", "retrain_top", "stop_early"}
            }
        )
        if settings.storage is None:
            healed = heal_for_append(
                folder.journal, folder.name, has_artifacts=folder.has_artifacts()
            )
            if healed:
                console.print(f"[yellow]warning:[/] {healed}", highlight=False, soft_wrap=True)
        identity = study_identity(folder)
    else:
        identity = new_identity(folder)
    if not resume and Path(settings.space).suffix == ".toml":
        # settings.json must name the preset so that `report` and `resume` find it from any
        # working directory.
        settings = settings.model_copy(update={"space": str(Path(settings.space).resolve())})
    options = search_options(settings, folder)
    open_storage(options.storage)  # an unreachable database fails first
    if provided is not None and settings.backend == "ray":
        raise UsageError(
            "a model or task handed over in Python runs with the local backend; for Ray, "
            "register the task in a plugin or name it as `package.module:function`"
        )
    if not resume:
        check_budget(options, console, provided)
    check_ray(settings)
    with TrainingBar(console, "baseline") as (progress, bar):
        setup = prepare(
            options,
            on_step=lambda done, total: progress.update(bar, completed=done, total=total),
            provided=provided,
        )
    study = open_study(folder, options, identity, create=not resume, task=setup.task)
    if not resume:
        save_settings(folder, settings, identity)
    facts = facts_of(setup)
    record_facts(folder, facts)
    if not resume:
        for number, plan in fitted_starts(setup, options.budget, console, options.trials):
            study.enqueue_trial(
                params_of(setup.space, plan) or {}, user_attrs={START: number},
                skip_if_exists=True,
            )
    if resume:
        stale = fail_interrupted(study)
        if stale:
            console.print(
                f"marked {stale} interrupted trial(s) as failed; their plans run again",
                highlight=False,
            )
    try:
        with SearchProgress(console, study, options.trials, options.budget) as callback:
            run_trials(setup, folder, study, trials=options.trials, callbacks=[callback])
    except KeyboardInterrupt as exc:
        write_report(folder.root, collect(study, folder, facts, options).as_json())
        raise Interrupted(
            f"interrupted after {finished(study)} trials; they are saved in {folder.root}. "
            f"Continue with `autoshrink resume {folder.name}`"
        ) from exc
    retraining = options.retrain_epochs > 0
    summary = _finish(study, folder, setup, facts, starts=retraining)
    if retraining:
        retrain_front(folder, summary, setup, console)
        summary = _finish(study, folder, setup, facts)
    if (settings.compile or settings.compile_front) and summary["best"] is not None:
        from autoshrink.compiler import compile_winners

        # collect() picks up compiled/trial-NNNN/latency.json for the report.
        compile_winners(folder, summary, setup, console, front=settings.compile_front)
        summary = _finish(study, folder, setup, facts)
    return SearchOutcome(folder, summary, time.monotonic() - start)


def _finish(
    study: optuna.Study, folder: StudyFolder, setup: SearchSetup, facts: Facts,
    *, starts: bool = False,
) -> dict[str, Any]:
    """A finished search's outcome: test figures measured, the folder cleaned (artifacts
    off the front deleted, but for the starting plans' with ``starts``; the recommended one
    copied) and the report written."""
    measure_tests(study, folder, setup)
    keep_front_only(folder, study, collect(study, folder, facts, setup.options), starts=starts)
    # Collected again: the artifacts off the front are gone and the copy of the best is made.
    summary = collect(study, folder, facts, setup.options).as_json()
    write_report(folder.root, summary)
    return summary


def regenerate(folder: StudyFolder, provided: Provided | None = None) -> dict[str, Any]:
    """Rebuild ``pareto.json``, ``report.md`` and ``index.html`` from the study's folder,
    also while its search is still running; returns the summary. Nothing but the folder is
    read: no data, no baseline (a study made before ``facts.json`` existed reads its baseline
    from the cache, and one of a model handed over in Python then needs it: ``provided``)."""
    settings = settings_of(folder)
    options = search_options(settings, folder)
    study = load_study_readonly(folder)
    facts = read_facts(folder)
    if provided is not None:  # what a caller hands over must be what the study searched
        check_metric(study, provided.task)
    if facts is None:
        if provided is None and settings.task.startswith("model:"):
            raise UsageError(
                f"study `{folder.name}` searched a model handed over in Python "
                f"({settings.task}); rebuild its report with `autoshrink.report("
                f"\"{folder.name}\", model=..., train=..., test=...)`"
            )
        setup = prepare(options, provided=provided)  # the baseline is cached: no training
        check_metric(study, setup.task)
        measure_tests(study, folder, setup)
        facts = facts_of(setup)
    summary = collect(study, folder, facts, options).as_json()
    write_report(folder.root, summary)
    return summary
