"""A study's folder and its identity: the files of ``<out>/<name>/`` and the study they
belong to (its name in the storage and a random id), wherever the folder goes."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autoshrink.errors import UsageError

__all__ = ["Identity", "StudyFolder", "new_identity", "study_identity"]


@dataclass(frozen=True)
class StudyFolder:
    """The files of one study under ``<out>/<name>/``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def journal(self) -> Path:
        return self.root / "study.journal"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def identity(self) -> Path:
        """``study.json``: the study's name in the journal and its random id, written when
        the study is created, so that the folder may be renamed or copied."""
        return self.root / "study.json"

    @property
    def facts(self) -> Path:
        """``facts.json``: what the outcome needs beyond the trials (the baseline's figures,
        the space's notes), so a report reads nothing outside the folder."""
        return self.root / "facts.json"

    def has_artifacts(self) -> bool:
        return any((self.root / "artifacts").glob("trial-*.safetensors"))

    def artifact(self, number: int) -> Path:
        return self.root / "artifacts" / f"trial-{number:04d}.safetensors"

    def retrained(self, number: int) -> Path:
        """The artifact of a front member retrained after the search."""
        return self.root / "artifacts" / f"trial-{number:04d}-retrained.safetensors"

    def compiled(self, number: int) -> Path:
        """Where ``--compile`` puts a trial's TVM library and its ``latency.json``."""
        return self.root / "compiled" / f"trial-{number:04d}"

    def recorded_storage(self) -> str | None:
        """The storage URL ``settings.json`` records (``None``: the journal in this folder)."""
        try:
            raw = json.loads(self.settings.read_bytes()) if self.settings.is_file() else {}
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            raise UsageError(
                f"{self.settings} is damaged (not a JSON object); restore it from a copy of "
                "the study folder"
            )
        storage = raw.get("storage")
        return storage if isinstance(storage, str) else None


@dataclass(frozen=True)
class Identity:
    """Who a study is, wherever its folder goes: its name in the journal and a random id
    (which keys every cache derived from its trials)."""

    name: str
    id: str


def new_identity(folder: StudyFolder) -> Identity:
    return Identity(name=folder.name, id=uuid.uuid4().hex)


def study_identity(folder: StudyFolder) -> Identity:
    """The identity recorded in ``study.json``; for folders made before it existed, the one
    study in the journal (refused when the journal holds several)."""
    if folder.identity.is_file():
        try:
            raw = json.loads(folder.identity.read_text())
            return Identity(name=str(raw["name"]), id=str(raw["id"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"{folder.identity} is damaged ({type(exc).__name__}); it names the study in "
                "the journal: restore it from a copy of the folder"
            ) from None
    if not folder.journal.is_file():
        return Identity(name=folder.name, id=folder.name)
    names = optuna.get_all_study_names(JournalStorage(JournalFileBackend(str(folder.journal))))
    if len(names) == 1:
        return Identity(name=names[0], id=names[0])
    if folder.name in names:
        return Identity(name=folder.name, id=folder.name)
    raise UsageError(
        f"{folder.journal} holds {len(names)} studies ({', '.join(names) or 'none'}) and "
        f"{folder.identity.name} is missing, so which one is this folder's cannot be told"
    )
