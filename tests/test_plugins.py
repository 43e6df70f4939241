"""The plugin manager: third-party distributions, broken plugins, blocking, strictness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoshrink.errors import PluginError
from autoshrink.registry import load_registry
from tests.conftest import ROOT, install_plugin, run_cli, write_plugin

EXAMPLE = ROOT / "examples" / "autoshrink-ternary"


@pytest.fixture(scope="module")
def ternary_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's example plugin, built and installed into a site folder of its own."""
    return install_plugin(EXAMPLE, tmp_path_factory.mktemp("site"))


def test_builtins_register_through_the_hooks(registry) -> None:
    assert {"dense", "float"} <= set(registry.methods)
    assert {"fashion-mnist-mlp", "fashion-mnist-cnn", "digits-mlp"} <= set(registry.tasks)
    assert registry.sources["dense"] == "autoshrink (built-in)"
    assert registry.problems == []


def test_installed_plugin_is_listed_and_searchable(ternary_site: Path) -> None:
    env = {"PYTHONPATH": str(ternary_site)}
    listed = run_cli("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    methods = {m["name"]: m for m in json.loads(listed.stdout)["methods"]}
    assert methods["ternary"]["source"] == "autoshrink-ternary"
    assert methods["ternary"]["stage"] == "value"
    assert methods["ternary"]["knobs"] == {"threshold": "[0, 0.5] float"}
    space = run_cli("space", "--task", "digits-mlp", "--json", env=env)
    assert space.returncode == 0, space.stderr
    params = json.loads(space.stdout)
    assert "ternary" in params["layer.fc1.value"].split(" | ")
    assert params["layer.fc1.ternary.threshold"] == "[0, 0.5] float"


def test_installed_plugin_passes_the_conformance_kit(ternary_site: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ternary_site)},
        cwd=EXAMPLE,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


BROKEN_IMPORT = "raise RuntimeError('this plugin is broken on purpose')\n"
DUPLICATE = """
from autoshrink import hookimpl
from autoshrink_plugins.dense import Dense

@hookimpl
def register_methods(register):
    register(Dense())
"""
INVALID_SCHEMA = """
from autoshrink import MethodConfig, hookimpl
from autoshrink_plugins.dense import Dense

class Unbounded(MethodConfig):
    size: int = 3

class Bad(Dense):
    name = "unbounded"
    Config = Unbounded

@hookimpl
def register_methods(register):
    register(Bad())
"""
MISSPELLED = """
from autoshrink import hookimpl

@hookimpl
def register_method(register):
    pass
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install plugins into a temporary site folder on sys.path; registry reloaded after."""
    target = tmp_path / "site"

    def add(name: str, code: str) -> Path:
        install_plugin(write_plugin(tmp_path / name, name, code), target)
        return target

    monkeypatch.syspath_prepend(str(target))
    load_registry.cache_clear()
    yield add
    load_registry.cache_clear()


@pytest.mark.parametrize(
    ("name", "code", "expected"),
    [
        ("broken-import", BROKEN_IMPORT, "failed to load: this plugin is broken on purpose"),
        ("duplicate", DUPLICATE, "method `dense`, already registered by autoshrink (built-in)"),
        ("invalid-schema", INVALID_SCHEMA, "`unbounded.size` is not searchable"),
    ],
)
def test_broken_plugin_is_named_and_skipped(site, name: str, code: str, expected: str) -> None:
    module = name.replace("-", "_")
    site(name, code)
    registry = load_registry()
    assert "dense" in registry.methods and "unbounded" not in registry.methods
    assert len(registry.problems) == 1
    assert f"`{module}`" in registry.problems[0] and expected in registry.problems[0]
    load_registry.cache_clear()
    with pytest.raises(PluginError, match=module):
        load_registry(strict=True)


def test_misspelled_hook_fails_loudly(site) -> None:
    site("autoshrink-typo", MISSPELLED)
    with pytest.raises(PluginError, match="register_method.*AUTOSHRINK_BLOCK_PLUGINS"):
        load_registry()


def test_blocked_plugin_is_not_loaded(site, monkeypatch: pytest.MonkeyPatch) -> None:
    site("autoshrink-typo", MISSPELLED)
    monkeypatch.setenv("AUTOSHRINK_BLOCK_PLUGINS", "autoshrink_typo,autoshrink.floating")
    registry = load_registry()
    assert "float" not in registry.methods and "dense" in registry.methods
    assert registry.problems == []


def test_strict_flag_on_the_command_line(tmp_path: Path) -> None:
    target = install_plugin(write_plugin(tmp_path / "b", "autoshrink-broken", BROKEN_IMPORT),
                            tmp_path / "site")
    env = {"PYTHONPATH": str(target)}
    lenient = run_cli("plugins", env=env)
    assert lenient.returncode == 0
    assert "warning: plugin `autoshrink_broken`" in lenient.stderr
    strict = run_cli("--strict-plugins", "plugins", env=env)
    assert strict.returncode == 1
    assert strict.stderr.strip().startswith("error: plugin `autoshrink_broken`")
