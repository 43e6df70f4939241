"""Nothing lost: the journal fault matrix, one writer per study, a study that keeps its
identity when its folder moves, and a matrix of bad command lines that each end in one line
with nothing written.

The journal cases run the real command line on copies of one real (small) digits study.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from autoshrink.studies.journal import check_journal, heal_for_append
from autoshrink.studies.lock import StudyBusyError, StudyLock
from tests.conftest import run_cli

FAST = ["--task", "digits-mlp", "--finetune-steps", "20", "--budget", "40kB", "--seed", "3"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its hash: what "unchanged" means (the lock file's
    note of its last holder aside)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def one_line(result, code: int) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-trial study (never modified: cases work on copies)."""
    out = tmp_path_factory.mktemp("studies")
    done = run_cli("search", *FAST, "--trials", "3", "--out", str(out), "--study", "s")
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "s"


def copy_of(study: Path, tmp_path: Path, name: str = "s") -> Path:
    target = tmp_path / name
    shutil.copytree(study, target)
    return target


def trials_of(folder: Path) -> list[dict]:
    return json.loads((folder / "pareto.json").read_text())["trials"]


def test_a_cut_tail_is_moved_aside_and_the_study_continues(study, tmp_path) -> None:
    folder = copy_of(study, tmp_path)
    journal = folder / "study.journal"
    os.truncate(journal, journal.stat().st_size - 25)  # the last record loses its end
    done = run_cli("resume", "s", "--out", str(tmp_path), "--trials", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "last record was cut off" in done.stdout
    assert len(list(folder.glob("study.journal.tail-*"))) == 1
    assert check_journal(journal).problem is None and not check_journal(journal).tail
    trials = trials_of(folder)
    finished = [t for t in trials if not (t["failure"] or "").startswith("interrupted")]
    assert len(finished) == 4 and [t["trial"] for t in trials][:3] == [0, 1, 2]


@pytest.mark.parametrize(
    "damage",
    ["garbage-middle", "unknown-op", "missing-keys", "not-utf8", "garbage-tail-line", "empty",
     "only-a-cut-record"],
)
def test_a_damaged_journal_is_refused_in_one_line_and_left_alone(
    study, tmp_path, damage
) -> None:
    folder = copy_of(study, tmp_path)
    journal = folder / "study.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    if damage == "garbage-middle":
        lines[4] = b"{{{ not json\n"
    elif damage == "unknown-op":
        lines[4] = json.dumps({"op_code": 99, "worker_id": "x"}).encode() + b"\n"
    elif damage == "missing-keys":
        lines[4] = b'{"op_code": 4}\n'
    elif damage == "not-utf8":
        lines[4] = b"\xff\xfe\n"
    elif damage == "only-a-cut-record":
        lines = [lines[0][:20]]  # healing would leave an empty journal beside the artifacts
    elif damage == "garbage-tail-line":
        lines.append(b"garbage\n")
    else:
        lines = []
    journal.write_bytes(b"".join(lines))
    before = snapshot(folder)
    line = one_line(run_cli("resume", "s", "--out", str(tmp_path), "--trials", "4"), 1)
    assert "autoshrink doctor s" in line and "nothing was written" in line
    if damage not in ("empty", "only-a-cut-record"):  # no study to report on
        line = one_line(run_cli("report", "s", "--out", str(tmp_path)), 1)
        assert "autoshrink doctor s" in line
    assert snapshot(folder) == before


def test_doctor_repairs_after_a_backup_and_the_study_continues(study, tmp_path) -> None:
    folder = copy_of(study, tmp_path)
    journal = folder / "study.journal"
    original = journal.read_bytes()
    lines = original.splitlines(keepends=True)
    lines.insert(len(lines) // 2, b"\x00garbage\n")
    journal.write_bytes(b"".join(lines))
    checked = run_cli("doctor", "s", "--out", str(tmp_path))
    assert checked.returncode == 1 and "is not a JSON record" in checked.stdout
    repaired = run_cli("doctor", "s", "--out", str(tmp_path), "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert journal.read_bytes() == original  # only the damaged line went
    backups = list(folder.glob("study.journal.bak-*"))
    assert len(backups) == 1 and b"\x00garbage" in backups[0].read_bytes()
    done = run_cli("resume", "s", "--out", str(tmp_path), "--trials", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(trials_of(folder)) == 4


def test_repair_never_moves_records_onto_another_trial(study, tmp_path) -> None:
    """Trials are numbered by the order they were created: when the damaged line created a
    trial, dropping it alone would shift every later record, so the journal is cut there."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder = copy_of(study, tmp_path)
    journal = folder / "study.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    creates = [i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4]
    lines[creates[-2]] = b"{{{ a damaged create-trial record\n"
    journal.write_bytes(b"".join(lines))
    repaired = run_cli("doctor", "s", "--out", str(tmp_path), "--repair")
    assert repaired.returncode == 0 and "cut it at the first damaged line" in repaired.stdout
    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.number for t in trials] == list(range(len(creates) - 2))
    for trial in trials:  # every record is still on its own trial
        if "artifact" in trial.user_attrs:
            assert trial.user_attrs["artifact"].endswith(f"trial-{trial.number:04d}.safetensors")


def test_a_copied_study_folder_resumes_the_same_study(study, tmp_path) -> None:
    """The study's name is recorded in the folder: a copy under another name continues
    the study (trial numbers go on), and every cached figure belongs to it."""
    folder = copy_of(study, tmp_path, "elsewhere")
    done = run_cli("resume", "elsewhere", "--out", str(tmp_path), "--trials", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(folder)
    assert [t["trial"] for t in trials] == [0, 1, 2, 3, 4]
    assert trials[:3] == [
        {**t, "artifact": trials[i]["artifact"]} for i, t in enumerate(trials_of(study))
    ]
    identity = json.loads((folder / "study.json").read_text())
    assert identity == json.loads((study / "study.json").read_text())
    cached = json.loads((folder / "test_accuracy.json").read_text())
    assert all(key.startswith(identity["id"] + "/") for key in cached)


def test_stale_test_figures_are_not_shown(study, tmp_path) -> None:
    """A cached test figure is keyed by study id, trial and artifact hash: one planted
    under the trial number alone (the old key) or for another file is never reported."""
    folder = copy_of(study, tmp_path)
    # The search's own figures are cached here; retrained ones have their own cache.
    (folder / "retrained.json").unlink(missing_ok=True)
    pareto = json.loads((folder / "pareto.json").read_text())
    member = pareto["front"][0]
    planted = {str(member["trial"]): 0.123}
    identity = json.loads((folder / "study.json").read_text())["id"]
    planted[f"{identity}/{member['trial']}/{'0' * 64}"] = 0.456
    (folder / "test_accuracy.json").write_text(json.dumps(planted))
    done = run_cli("report", "s", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((folder / "pareto.json").read_text())
    shown = next(m for m in again["front"] if m["trial"] == member["trial"])
    # A report measures nothing (it reads the folder alone): the figure is unknown, not stale.
    assert member["test_accuracy"] not in (0.123, 0.456, None)
    assert shown["test_accuracy"] is None


def test_one_writer_per_study(study, tmp_path) -> None:
    folder = copy_of(study, tmp_path)
    before = snapshot(folder)
    with StudyLock(folder):
        line = one_line(run_cli("resume", "s", "--out", str(tmp_path), "--trials", "4"), 2)
        assert f"PID {os.getpid()}" in line and "being written" in line
        with pytest.raises(StudyBusyError), StudyLock(folder):
            pass
        reported = run_cli("report", "s", "--out", str(tmp_path))  # readers take no lock
        assert reported.returncode == 0, reported.stderr[-2000:]
    assert snapshot(folder)["study.journal"] == before["study.journal"]
    with StudyLock(folder):  # released by the holder: free again
        pass


def test_pareto_names_only_files_that_exist(study) -> None:
    for trial in trials_of(study):
        assert trial["artifact"] is None or (study / trial["artifact"]).is_file()


def test_heal_refuses_a_missing_journal(tmp_path) -> None:
    from autoshrink.studies.journal import JournalError

    with pytest.raises(JournalError, match="missing"):
        heal_for_append(tmp_path / "study.journal", "s", has_artifacts=False)


# --- bad input: one line, the right exit code, nothing written ------------------------------
#
# These run the command line's entry point in this process (argv, environment and working
# folder set as a shell would), which is the same code as the installed script and keeps
# the matrix fast; the cases that need a fresh interpreter use run_cli.


@pytest.fixture
def cli_here(capsys, monkeypatch):
    """``cli_here(*args, cwd=None)``: run ``autoshrink ARGS`` in this process; returns an
    object with ``returncode``, ``stdout`` and ``stderr`` like ``subprocess.run``."""
    from types import SimpleNamespace

    from autoshrink import cli

    def run(*args: str, cwd: Path | None = None) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["autoshrink", *args])
        if cwd is not None:
            monkeypatch.chdir(cwd)
        cli.State.debug, cli.State.strict_plugins = False, None
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run

BAD_SEARCHES = {
    "seed-negative": (["--seed", "-1"], 2, "seed"),
    "seed-too-big": (["--seed", str(2**64)], 2, "seed"),
    "budget-words": (["--budget", "lots"], 2, "budget"),
    "budget-zero": (["--budget", "0"], 2, "budget"),
    "trials-zero": (["--trials", "0"], 2, "trials"),
    "trials-negative": (["--trials", "-3"], 2, "trials"),
    "timeout-zero": (["--timeout", "0"], 2, "timeout"),
    "sampler": (["--sampler", "grid"], 2, "sampler"),
    "backend": (["--backend", "slurm"], 2, "backend"),
    "workers-zero": (["--workers", "0"], 2, "workers"),
    "finetune-negative": (["--finetune-steps", "-1"], 2, "finetune"),
    "tune-trials-negative": (["--tune-trials", "-1"], 2, "tune"),
    "unknown-task": (["--task", "nope"], 2, "unknown task"),
    "task-not-a-task": (["--task", "os:system"], 2, "os:system"),
    "task-missing-module": (["--task", "no_such_module_xyz:make"], 2, "cannot load task"),
    "unknown-preset": (["--space", "nope"], 2, "nope"),
    "study-with-slash": (["--study", "../escape"], 2, "--study"),
    "study-with-space": (["--study", "a b"], 2, "--study"),
    "out-is-a-file": (["--out", "FILE"], 2, "cannot create the study folder"),
    "budget-too-small": (["--budget", "300B"], 2, "below the smallest model"),
}


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
def test_bad_search_command_lines(tmp_path, cli_here, case) -> None:
    extra, code, needle = BAD_SEARCHES[case]
    out = tmp_path / "reports"
    out.mkdir()
    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(tmp_path / "FILE") if word == "FILE" else word for word in extra]
    args = ["search", *FAST, "--out", str(out), "--study", "x", *extra]
    line = one_line(cli_here(*args), code)
    assert needle in line, line
    assert list(out.iterdir()) == []
    assert (tmp_path / "FILE").read_text() == "not a folder"


def _bad_preset(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[layers]\nname = '\xe9'\n")
    return path


def test_bad_environment_value_is_an_error_even_under_a_flag(tmp_path) -> None:
    line = one_line(
        run_cli("search", *FAST, "--trials", "2", "--out", str(tmp_path), "--study", "x",
                env={"AUTOSHRINK_TRIALS": "abc"}),
        2,
    )
    assert "AUTOSHRINK_TRIALS" in line
    assert not (tmp_path / "x").exists()


def test_a_preset_that_is_not_utf8(tmp_path) -> None:
    line = one_line(
        run_cli("search", *FAST, "--space", str(_bad_preset(tmp_path)), "--out",
                str(tmp_path / "r"), "--study", "x"),
        2,
    )
    assert "latin1.toml" in line
    assert not (tmp_path / "r" / "x").exists()


def test_damaged_study_files_are_one_line(study, tmp_path) -> None:
    folder = copy_of(study, tmp_path)
    (folder / "settings.json").write_text("{garbage")
    before = snapshot(folder)
    for command in (["resume", "s", "--trials", "4"], ["report", "s"]):
        line = one_line(run_cli(*command, "--out", str(tmp_path)), 2)
        assert "settings.json" in line
    assert snapshot(folder) == before
    folder = copy_of(study, tmp_path, "t")
    (folder / "study.json").write_text("[1, 2")
    line = one_line(run_cli("resume", "t", "--trials", "4", "--out", str(tmp_path)), 2)
    assert "study.json" in line


OTHER_BAD = {
    "resume-unknown": (["resume", "ghost"], 2, "no study"),
    "resume-trials-zero": (["resume", "s", "--trials", "0"], 2, "trials"),
    "report-unknown": (["report", "ghost"], 2, "no study"),
    "doctor-unknown": (["doctor", "ghost"], 1, "no study journal"),
    "eval-missing": (["eval", "MISSING"], 1, "MISSING"),
    "eval-folder": (["eval", "FOLDER"], 1, "FOLDER"),
    "eval-text": (["eval", "TEXT"], 1, "TEXT"),
    "eval-unknown-task": (["eval", "ARTIFACT", "--task", "nope"], 2, "unknown task"),
    "compile-missing": (["compile", "MISSING"], 1, "MISSING"),
    "compile-threads-zero": (["compile", "ARTIFACT", "--threads", "0"], 2, "--threads"),
    "compile-batch-zero": (["compile", "ARTIFACT", "--batch", "0"], 2, "--batch"),
    "compile-trials-negative": (["compile", "ARTIFACT", "--trials", "-1"], 2, "trials"),
    "compile-target": (["compile", "ARTIFACT", "--target", "tpu"], 2, "tpu"),
    "baseline-unknown-task": (["baseline", "--task", "nope"], 2, "unknown task"),
    "space-unknown-task": (["space", "--task", "nope"], 2, "unknown task"),
    "space-unknown-preset": (["space", "--task", "digits-mlp", "--space", "nope"], 2, "nope"),
}


@pytest.mark.parametrize("case", list(OTHER_BAD))
def test_bad_command_lines(study, tmp_path, cli_here, case) -> None:
    args, code, needle = OTHER_BAD[case]
    copy_of(study, tmp_path)
    (tmp_path / "FOLDER").mkdir()
    (tmp_path / "TEXT").write_text("hello")
    places = {
        "MISSING": str(tmp_path / "missing.safetensors"), "FOLDER": str(tmp_path / "FOLDER"),
        "TEXT": str(tmp_path / "TEXT"), "ARTIFACT": str(study / "best.safetensors"),
    }
    args = [places.get(word, word) for word in args]
    if args[0] in ("resume", "report", "doctor"):
        args += ["--out", str(tmp_path)]
    before = snapshot(tmp_path)
    line = one_line(cli_here(*args, cwd=tmp_path), code)
    assert places.get(needle, needle) in line, line
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path) -> None:
    """An unexpected error is one line, and `--debug` shows where it came from."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "brokentask.py").write_text(
        "from autoshrink.tasks import Task\n"
        "def make():\n    return Task.__new__(Task)\n"  # a Task with nothing set
    )
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    plain = run_cli("space", "--task", "brokentask:make", env=env)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert len([line for line in plain.stderr.splitlines() if line.strip()]) == 1
    debug = run_cli("--debug", "space", "--task", "brokentask:make", env=env)
    assert "Traceback" in debug.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (skipped where this process may not mount one)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_found_behind_the_error_optuna_raises_while_handling_it() -> None:
    import errno

    from autoshrink.studies.local import storage_failure

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        finally:
            raise AssertionError("Should not reach.")  # as Optuna's trial end does
    except AssertionError as exc:
        assert storage_failure(exc) is full
    assert storage_failure(ValueError("x")) is None
    assert storage_failure(OSError(errno.ENOENT, "missing")) is None


def test_a_full_disk_stops_the_search_in_one_line_and_resume_continues(small_disk) -> None:
    import subprocess

    done = run_cli("search", *FAST, "--trials", "12", "--out", str(small_disk), "--study", "s")
    line = one_line(done, 1)
    assert "No space left on device" in line or "cannot be written" in line, line
    assert not list(small_disk.rglob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resumed = run_cli("resume", "s", "--out", str(small_disk), "--trials", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = trials_of(small_disk / "s")
    assert sum(t["state"] == "complete" for t in trials) >= 3
