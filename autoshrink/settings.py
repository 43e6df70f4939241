"""Settings, resolved in one place: defaults < ``autoshrink.toml`` or ``[tool.autoshrink]`` in
``pyproject.toml`` < ``AUTOSHRINK_*`` environment variables < flags actually given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from autoshrink.errors import UsageError

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    """Everything a command can be told; flags, environment and config files all land here."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOSHRINK_",
        toml_file="autoshrink.toml",
        pyproject_toml_table_header=("tool", "autoshrink"),
        extra="forbid",
    )

    task: str = "fashion-mnist-mlp"
    data_dir: Path | None = None
    space: str = "default"
    budget: ByteSize | None = None
    trials: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    # TPE by default: at the default 24 trials NSGA-II (population 16) is still in its random
    # first generation, and TPE reached the larger hypervolume (benchmarks/search.py).
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # what NumPy's and Optuna's seeds take
    study: str | None = None
    out: Path = Path("reports")
    backend: Literal["local", "ray"] = "local"
    # An Optuna storage URL (sqlite:///path, postgresql://..., mysql://...) for the trials;
    # None: the journal file in the study folder.
    storage: str | None = None
    workers: int = Field(default=1, ge=1)
    ray_address: str | None = None
    # Ray backend: a trial whose worker process or node dies is run again this many times.
    max_retries: int = Field(default=1, ge=0)
    finetune_steps: int = Field(default=300, ge=0)
    trial_timeout: float = Field(default=300.0, gt=0)
    # Stop a trial at its checkpoint when two no larger trials were ahead of it there (see
    # autoshrink/studies/early_stop.py).
    stop_early: bool = False
    strict_plugins: bool = False
    # Compile the recommended model with TVM after a search. Off by default: tuning takes
    # minutes, and the default search (and CI) must stay fast.
    compile: bool = False
    compile_front: bool = False  # every front member, not only the recommended model
    tune_trials: int = Field(default=256, ge=0)
    # After the search, the trials that ran the preset's starting plans (on the front or
    # not) and `retrain_top` front members spread along it are trained again from the
    # baseline for about `retrain_epochs` epochs (0 = off; each gets between half and four
    # times that, by how far it fell short of the baseline): the search's short fine-tunes
    # measure how fast a plan recovers, retraining how good it gets. The front is then taken
    # again over the retrained figures. Unset: one member per 8 trials in all, at least 4,
    # the starts first (a longer search finds a longer front).
    retrain_epochs: float = Field(default=2.0, ge=0, le=1000)
    retrain_top: int | None = Field(default=None, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls),
            PyprojectTomlConfigSettingsSource(settings_cls),
        )


def load_settings(**flags: Any) -> Settings:
    """Settings with the flags the user actually gave (None means "not given").

    The environment and config files are validated on their own first: a bad value there is
    an error even where a flag overrides it (it would bite the next command)."""
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        Settings()
    except ValidationError as exc:
        raise UsageError(_explain(exc, given_by_flags=False)) from None
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise UsageError(_explain(exc, given_by_flags=True)) from None


def _explain(exc: ValidationError, *, given_by_flags: bool) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        shown = f" (got {error['input']!r})" if not isinstance(error["input"], dict) else ""
        where = ""
        if not given_by_flags:
            variable = f"AUTOSHRINK_{field.upper()}"
            where = (f" in the environment variable {variable}" if variable in os.environ
                     else " in autoshrink.toml or pyproject.toml")
        lines.append(f"• {field.replace('_', '-')}{where}: {error['msg']}{shown}")
    return "\n".join(lines)
