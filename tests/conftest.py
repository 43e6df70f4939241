"""Shared fixtures: an isolated cache (so the digits baseline trains once per run) and
helpers to run the real command line and to install plugins as real distributions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoshrink.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from autoshrink.cli import main; main()"]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test run starts with an empty baseline cache of its own."""
    cache = Path(os.environ.get("AUTOSHRINK_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["AUTOSHRINK_CACHE"] = str(cache)
    os.environ.pop("AUTOSHRINK_BLOCK_PLUGINS", None)
    return cache


@pytest.fixture
def registry():
    """The registry of built-in (and installed) plugins, loaded fresh."""
    load_registry.cache_clear()
    yield load_registry()
    load_registry.cache_clear()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run ``autoshrink ARGS`` in a fresh process; returns the CompletedProcess."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=900,
    )


def install_plugin(source: Path, target: Path) -> Path:
    """Build and install the plugin distribution in ``source`` into the site folder
    ``target`` with pip (a real wheel build and a real entry point); returns ``target``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    return target


def write_plugin(folder: Path, name: str, code: str, *, entry_point: str | None = None) -> Path:
    """A plugin distribution folder (pyproject.toml + one module) named ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    (folder / f"{module}.py").write_text(code)
    (folder / "pyproject.toml").write_text(
        "[build-system]\nrequires = ['setuptools>=68']\nbuild-backend = 'setuptools.build_meta'\n"
        f"[project]\nname = '{name}'\nversion = '0.1'\n"
        f"[project.entry-points.autoshrink]\n{entry_point or module} = '{module}'\n"
        f"[tool.setuptools]\npy-modules = ['{module}']\n"
    )
    return folder
