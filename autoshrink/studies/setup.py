"""A search's setup: its options, typed and resolved once, and what they load.

The command line and the Python API turn their settings into one frozen
:class:`SearchOptions` (the budget an ``int`` of bytes, here and nowhere else); the engine
reads only that. :func:`prepare` loads what the options name (plugins, task, data, the cached
baseline, the space) into a :class:`SearchSetup`, once per process: the driver, or a Ray
worker through :func:`worker_setup` with what the driver sent it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import optuna
import torch

from autoshrink.baseline import Baseline, load_baseline
from autoshrink.budget import tighten_to_fit
from autoshrink.errors import UsageError, first_line
from autoshrink.plan import Plan
from autoshrink.registry import Registry, load_registry
from autoshrink.space import Preset, Space, build_space, load_preset
from autoshrink.tasks import Task, TaskData, resolve_task
from autoshrink.trial import Checkpoint, TrialBudget, TrialOutcome, run_trial

__all__ = [
    "Provided", "SearchOptions", "SearchSetup", "WorkerInputs", "prepare", "resolve",
    "untrained_limit", "worker_setup",
]


@dataclass(frozen=True)
class SearchOptions:
    """What the engine needs of a search's settings, typed: plain values, so they travel to
    Ray workers as they are."""

    #: the byte budget
    budget: int
    #: the task's registered name, or ``package.module:function``
    task: str
    #: the search-space preset: a built-in name or a TOML file
    space: str
    #: where the trials are recorded: an Optuna storage address (the study's journal file,
    #: or a database URL)
    storage: str
    trial: TrialBudget
    seed: int = 0
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    backend: Literal["local", "ray"] = "local"
    workers: int = 1
    ray_address: str | None = None
    max_retries: int = 1
    #: seconds the whole search may run (``None``: no limit)
    timeout: float | None = None
    #: trials the search is asked for in all (``None``: until the timeout)
    trials: int | None = None
    #: stop hopeless trials at their checkpoint (see :mod:`autoshrink.studies.early_stop`)
    stop_early: bool = False
    retrain_epochs: float = 0.0
    #: front members retrained, spread along it (0: as many as the trials and starts call for)
    retrain_top: int = 0
    tune_trials: int = 0
    data_dir: Path | None = None
    strict_plugins: bool = False
    #: the settings as ``pareto.json`` records them (JSON), to reproduce the run
    record: str = field(default="{}", repr=False)


@dataclass(frozen=True)
class SearchSetup:
    """Everything a trial needs; built once per process (the driver or a Ray worker)."""

    options: SearchOptions
    registry: Registry
    task: Task
    data: TaskData
    baseline: Baseline
    space: Space

    @property
    def trial_budget(self) -> TrialBudget:
        """How much training one trial may spend."""
        return self.options.trial

    def plan_of(self, params: dict) -> Plan:
        """The plan a trial's parameters describe (define-by-run replayed on fixed values)."""
        return self.space.sample(optuna.trial.FixedTrial(params))

    def run(
        self, plan: Plan, artifact: Path, number: int, checkpoint: Checkpoint | None = None
    ) -> TrialOutcome:
        """Trial ``number``: ``plan`` built, trained and measured with this search's task,
        data, baseline and budget, its artifact written to ``artifact`` (every backend);
        ``checkpoint`` as :func:`autoshrink.trial.run_trial` takes it. A plan over the budget
        before training is tightened to fit it (:meth:`fit_to_budget`)."""
        return run_trial(
            plan, task=self.task, data=self.data, baseline=self.baseline,
            registry=self.registry, artifact=artifact, budget=self.trial_budget,
            seed=self.options.seed + number, checkpoint=checkpoint,
            fit_plan=self.fit_to_budget,
        )

    def fit_to_budget(self, plan: Plan, size: int) -> Plan | None:
        """For a sampled plan whose artifact before training has ``size`` bytes: the plan
        itself when it fits the budget, else the plan with its methods kept and its knobs
        tightened until it fits, as the starting plans are
        (:func:`autoshrink.budget.tighten_to_fit`); None when no setting of its methods does.
        The sampler is told the tightened plan's figures under the parameters it asked for: a
        deterministic repair, so a search under a tight budget trains plans at the budget
        instead of spending trials far over it."""
        return tighten_to_fit(plan, self.task, self.space, self.registry,
                              self.options.budget, self.baseline.model, size=size)


@dataclass(frozen=True)
class Provided:
    """What a Python caller hands over instead of naming a registered task: the task
    object, and optionally its data."""

    task: Task
    data: TaskData | None = None


def resolve(
    options: SearchOptions, provided: Provided | None = None, preset: Preset | None = None
) -> tuple[Registry, Task, Space]:
    """Plugins, task and search space (from ``preset``, or the one the options name):
    everything that needs no data or training."""
    registry = load_registry(strict=options.strict_plugins)
    task = provided.task if provided else resolve_task(options.task, registry.tasks)
    preset = preset or load_preset(options.space)
    space = build_space(task.build_model(1.0), registry, preset, narrows=task.narrows)
    return registry, task, space


def prepare(
    options: SearchOptions,
    on_step: Callable[[int, int], None] | None = None,
    provided: Provided | None = None,
) -> SearchSetup:
    """Load plugins, task, data, the (cached) baseline and the search space."""
    registry, task, space = resolve(options, provided)
    data = provided.data if provided and provided.data else task.load_data(options.data_dir)
    pretrained = task.build_model(1.0) if task.trained else None
    baseline = load_baseline(task, data, registry, pretrained=pretrained, on_step=on_step)
    return SearchSetup(options, registry, task, data, baseline, space)


def untrained_limit(budget: int) -> int:
    """Bytes above which a plan, written before training, is not trained. Fine-tuning moves
    an artifact's size only through its entropy-coded streams and its header (the structure
    and bit widths are fixed by the plan), by a few percent, so a plan 10 % over the budget
    stays over it."""
    return budget + budget // 10


@dataclass(frozen=True, eq=False)
class WorkerInputs:
    """What the driver sends each Ray worker through Ray's object store, so that a worker
    reads nothing from the driver's disk: the baseline's weights and measured figures, the
    search-space preset, and the methods the driver's plugins provide (each with its
    distribution and version). The task travels by name, the options as they are."""

    #: the baseline's cache name (task and cache key): which baseline these weights are
    key: str
    bytes: int
    val_accuracy: float
    test_accuracy: float | None
    #: method name -> its distribution, as ``autoshrink-ternary==0.1.0``
    methods: dict[str, str]
    preset: Preset = field(repr=False)
    state: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def of(cls, setup: SearchSetup) -> WorkerInputs:
        baseline, registry = setup.baseline, setup.registry
        return cls(
            key=baseline.path.name, bytes=baseline.bytes, val_accuracy=baseline.val_accuracy,
            test_accuracy=baseline.test_accuracy,
            methods={name: str(registry.origins.get(name)) for name in registry.methods},
            preset=load_preset(setup.options.space),
            state={k: v.detach().cpu() for k, v in baseline.model.state_dict().items()},
        )


_WORKER_SETUPS: dict[tuple[SearchOptions, str], SearchSetup] = {}


def worker_setup(options: SearchOptions, inputs: WorkerInputs) -> SearchSetup:
    """A Ray worker's setup, cached per process: plugins, task and data loaded here, the
    baseline and the preset as the driver sent them (no baseline is read, trained or cached
    on this machine). Raises UsageError naming what this machine could not load."""
    cached = _WORKER_SETUPS.get((options, inputs.key))
    if cached is not None:
        return cached
    here = f"worker on {socket.gethostname()}"
    try:
        registry = load_registry(strict=options.strict_plugins)
    except Exception as exc:
        raise UsageError(f"{here} cannot load its plugins: {first_line(exc)}") from exc
    differ = [
        f"`{name}` (driver: {origin}, here: {registry.origins.get(name, 'none')})"
        for name, origin in inputs.methods.items()
        if str(registry.origins.get(name)) != origin
    ]
    if differ:
        why = f" ({registry.problems[0]})" if registry.problems else ""
        raise UsageError(
            f"{here} does not have the driver's plugins: method {', '.join(differ)}{why}; "
            "install the same plugins on every node"
        )
    try:
        registry, task, space = resolve(options, preset=inputs.preset)
    except Exception as exc:
        raise UsageError(f"{here} cannot load task `{options.task}`: {first_line(exc)}") from exc
    try:
        data = task.load_data(options.data_dir)
    except Exception as exc:
        raise UsageError(
            f"{here} cannot load the data of task `{task.name}`: {first_line(exc)}"
        ) from exc
    model = task.build_model(1.0)
    model.load_state_dict(inputs.state)
    baseline = Baseline(
        task, model.eval(), Path(inputs.key), inputs.bytes, inputs.val_accuracy,
        inputs.test_accuracy, trained=False,
    )
    setup = SearchSetup(options, registry, task, data, baseline, space)
    _WORKER_SETUPS[(options, inputs.key)] = setup
    return setup
