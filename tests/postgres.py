"""A real PostgreSQL server for tests, in a temporary data directory: ``initdb``, then
``pg_ctl start`` on a free port of 127.0.0.1 (its unix socket in the same temporary folder),
one database, and ``pg_ctl stop`` at the end. Where the server cannot run, the test is skipped
with the reason, never silently.

PostgreSQL refuses to run as root: as root, the server runs as ``nobody`` (with ``runuser``, or
``setpriv`` where that is missing), in a folder that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["running_postgres"]

#: The server's user and database (trust authentication: only this machine can connect).
USER, DATABASE = "autoshrink", "trials"
#: The unprivileged account the server runs as when the tests run as root.
SERVER_ACCOUNT = "nobody"


def binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, or Debian's newest
    ``/usr/lib/postgresql/N/bin`` (the package puts nothing on PATH)."""
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "pg_ctl").exists():
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def _as_server_account(folder: Path) -> list[str]:
    """The command prefix that runs a program as the server's account (root only), after
    giving it ``folder``; skips the test when there is no way to."""
    try:
        account = pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        pytest.skip(f"PostgreSQL refuses root, and there is no `{SERVER_ACCOUNT}` user to run it")
    os.chown(folder, account.pw_uid, account.pw_gid)
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", SERVER_ACCOUNT, "--"]
    if setpriv := shutil.which("setpriv"):
        return [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                "--clear-groups"]
    pytest.skip("PostgreSQL refuses root, and neither runuser nor setpriv is here to drop it")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_postgres() -> Iterator[str]:
    """A running PostgreSQL server with an empty database; yields its URL."""
    folder = binaries()
    if folder is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in "
                    "/usr/lib/postgresql/*/bin); Debian's package is `postgresql`")
    root = Path(tempfile.mkdtemp(prefix="autoshrink-pg-"))
    data, log = root / "data", root / "server.log"
    port = _free_port()
    prefix: list[str] = []
    started = False

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120,
                              cwd=root)

    def cannot(step: str, done: subprocess.CompletedProcess) -> None:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        if log.is_file():
            said += log.read_text(errors="replace").strip().splitlines()[-3:]
        pytest.skip(f"PostgreSQL cannot start here: {step} failed: {' | '.join(said[-4:])}")

    try:
        if os.geteuid() == 0:
            prefix = _as_server_account(root)
        done = run(str(folder / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                   "-E", "UTF8", "--locale=C", "--no-sync")
        if done.returncode:
            cannot("initdb", done)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        done = run(str(folder / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                   "-o", options, "start")
        started = True
        if done.returncode:
            cannot("pg_ctl start", done)
        done = run(str(folder / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER,
                   DATABASE)
        if done.returncode:
            cannot("createdb", done)
        yield f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            run(str(folder / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
