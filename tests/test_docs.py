"""The README's plugin example is the tested one, and no hook ships undocumented."""

from __future__ import annotations

import inspect

from autoshrink import hookspecs
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "autoshrink-ternary"


def test_readme_plugin_example_is_the_tested_example() -> None:
    source = (EXAMPLE / "autoshrink_ternary.py").read_text()
    # The README shows the module minus its docstring line.
    body = source.split("\n", 2)[2].strip()
    assert body in README
    assert (EXAMPLE / "tests" / "test_ternary.py").read_text().strip() in README


def test_every_hook_is_documented() -> None:
    specs = [
        f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(f, "autoshrink_spec")
    ]
    assert len(specs) >= 2
    for spec in specs:
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40, spec.__name__
        assert spec.__name__ in README or spec.__name__ in inspect.getsource(hookspecs)


def test_readme_names_the_two_setup_commands() -> None:
    assert ".venv/bin/autoshrink search --budget 5MB" in README
    assert ".venv/bin/python -m pytest -q" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci


def test_every_package_of_the_source_tree_is_in_the_distribution() -> None:
    """The package list in pyproject.toml is explicit: a new subpackage must be added there,
    or a wheel (not an editable install) ships without it."""
    import tomllib

    from setuptools import find_packages

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {name for name in find_packages(str(ROOT), include=["autoshrink*"])}
    assert found <= listed, sorted(found - listed)
