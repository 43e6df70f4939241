"""Trials recorded in a database (an Optuna storage URL) instead of the study folder's
journal: search, resume and report all go to the same URL."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from tests.conftest import run_cli
from tests.postgres import running_postgres

FAST = ["--task", "digits-mlp", "--finetune-steps", "20", "--budget", "40kB", "--seed", "3",
        "--retrain-epochs", "0"]


def test_a_study_in_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trials.sqlite'}"
    # A relative path is made absolute: `resume` may run from another folder.
    done = run_cli("search", *FAST, "--trials", "3", "--storage", "sqlite:///trials.sqlite",
                   "--out", str(tmp_path / "r"), "--study", "db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "r" / "db"
    assert not (folder / "study.journal").exists()
    assert json.loads((folder / "settings.json").read_text())["storage"] == url
    resumed = run_cli("resume", "db", "--trials", "4", "--out", str(tmp_path / "r"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="db", storage=url)
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    reported = run_cli("report", "db", "--out", str(tmp_path / "r"))
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert len(json.loads((folder / "pareto.json").read_text())["trials"]) == 4
    checked = run_cli("doctor", "db", "--out", str(tmp_path / "r"))
    assert checked.returncode == 0 and "database" in checked.stdout
    # The same name again in the same database is refused, and its folder left alone.
    again = run_cli("search", *FAST, "--storage", url, "--out", str(tmp_path / "s"),
                    "--study", "db")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert not (tmp_path / "s" / "db").exists()
    # A database that lost the study is one line, not a fresh study.
    (tmp_path / "trials.sqlite").unlink()
    lost = run_cli("resume", "db", "--trials", "5", "--out", str(tmp_path / "r"))
    assert lost.returncode == 2 and "holds no study" in lost.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("foo://somewhere", "expected sqlite:///path"),
        ("sqlite:///:memory:", "outlives the search"),
        ("postgresql://user:secret@127.0.0.1:9/none", "psycopg2"),
    ],
)
def test_bad_storage_is_one_line_and_leaves_nothing(tmp_path: Path, url: str, needle: str) -> None:
    if "postgresql" in url and importlib.util.find_spec("psycopg2") is not None:
        needle = "cannot open"  # the driver is here: the database is what is missing
    done = run_cli("search", *FAST, "--storage", url, "--out", str(tmp_path), "--study", "x")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert needle in lines[0] and "secret" not in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server's empty database (skipped, with the reason, where the server
    or its driver is missing)."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install "
                        "'autoshrink[postgres]'")
    with running_postgres() as url:
        yield url


def test_a_study_in_postgresql(tmp_path: Path, postgres_url: str) -> None:
    out = str(tmp_path / "r")
    done = run_cli("search", *FAST, "--trials", "3", "--storage", postgres_url, "--out", out,
                   "--study", "pg")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "r" / "pg"
    assert not (folder / "study.journal").exists()
    assert json.loads((folder / "settings.json").read_text())["storage"] == postgres_url
    resumed = run_cli("resume", "pg", "--trials", "4", "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reported = run_cli("report", "pg", "--out", out)
    assert reported.returncode == 0, reported.stderr[-2000:]
    # The trials are in the database, and the report's figures are theirs. (Optuna itself,
    # on SQLAlchemy 2.1, needs the driver named: a bare postgresql:// means psycopg 3.)
    driver = postgres_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    study = optuna.load_study(study_name="pg", storage=driver)
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    pareto = json.loads((folder / "pareto.json").read_text())
    rows = [(t["trial"], t["state"], t["bytes"], t["val_accuracy"]) for t in pareto["trials"]]
    assert rows == [
        (t.number, t.state.name.lower(), *((int(t.values[0]), t.values[1]) if t.values
                                          else (None, None)))
        for t in study.trials
    ]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and f"{len(complete)} complete" in reported.stdout
    assert all(t.user_attrs["plan"] and t.user_attrs["seconds"] > 0 for t in complete)


def test_sqlite_and_the_journal_give_the_same_front(tmp_path: Path) -> None:
    fronts = []
    for storage in ([], ["--storage", f"sqlite:///{tmp_path / 'trials.sqlite'}"]):
        name = "db" if storage else "journal"
        done = run_cli("search", *FAST, "--trials", "3", *storage, "--out", str(tmp_path / "r"),
                       "--study", name)
        assert done.returncode == 0, done.stderr[-3000:]
        pareto = json.loads((tmp_path / "r" / name / "pareto.json").read_text())
        assert len(pareto["trials"]) == 3
        fronts.append([(m["trial"], m["bytes"], m["val_accuracy"], m["test_accuracy"],
                        m["plan"]) for m in pareto["front"]])
    assert (tmp_path / "r" / "journal" / "study.journal").is_file()
    assert not (tmp_path / "r" / "db" / "study.journal").exists()
    assert fronts[0] and fronts[0] == fronts[1]
