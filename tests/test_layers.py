"""The package's shape: its imports form no cycle and never climb a layer.

Layers, lowest first: the core (the method contract, plans, tasks, artifacts, the registry,
the search space, compression and training: ``autoshrink/*.py``), ``autoshrink/studies/``
(studies, trials, backends, the outcome), ``autoshrink/reports/`` and
``autoshrink/compiler/`` (what a finished study is turned into), the application
(``session``, ``api``: running a search end to end), and ``autoshrink/cli/``. Every import
counts: at module level, inside a function, or under ``TYPE_CHECKING`` (an annotation is a
dependency too). ``from package import module`` counts as importing the package as well, and
no module imports the package root: ``autoshrink/__init__`` is the public face that lazily
re-exports the API, so it is the one module allowed to import from the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autoshrink"
#: ``settings`` (the command line's and the API's settings) belongs to the application: the
#: engine reads the typed, frozen ``studies.setup.SearchOptions`` made from it once.
APPLICATION = {"autoshrink.session", "autoshrink.api", "autoshrink.settings"}
LAYERS = {"studies": 1, "reports": 2, "compiler": 2, "cli": 4}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def layer(module: str) -> int:
    if module in APPLICATION:
        return 3
    return LAYERS.get(module.split(".")[1], 0)


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports, anywhere in its code (``autoshrink`` itself
    included, so that an import of the root shows)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    """Every module but the root, and the modules it imports (the root left out)."""
    known = module_names()
    return {
        m: imports(m, p, known) - {"autoshrink"} for m, p in known.items() if m != "autoshrink"
    }


def test_no_module_imports_the_package_root() -> None:
    known = module_names()
    found = sorted(m for m, p in known.items() if m != "autoshrink"
                   and "autoshrink" in imports(m, p, known))
    assert not found, f"import what you need from its module, not from `autoshrink`: {found}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in graph().items()
        for t in targets
        if layer(t) > layer(m)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


#: The built-in methods, held to the same length as the package.
PLUGINS = PACKAGE.parent / "plugins"


@pytest.mark.parametrize(
    "path", sorted([*PACKAGE.rglob("*.py"), *PLUGINS.glob("*.py")]),
    ids=lambda p: str(p.relative_to(PACKAGE.parent)),
)
def test_no_module_is_long(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 420, f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it"


def test_the_walk_sees_real_imports() -> None:
    edges = graph()
    assert "autoshrink.methods" in edges["autoshrink.plan"]
    assert "autoshrink.cli.app" in edges["autoshrink.cli.search"]
    assert layer("autoshrink.cli.search") == 4 and layer("autoshrink.methods") == 0
    assert layer("autoshrink.studies.study") == 1 and layer("autoshrink.reports.html") == 2


def test_no_package_hides_an_api_call() -> None:
    """A subpackage named like an API call (``autoshrink.search``) would replace it as the
    package attribute once imported; every package imported, the API names still call."""
    import importlib

    import autoshrink

    for path in PACKAGE.rglob("__init__.py"):
        importlib.import_module(".".join(path.parent.relative_to(PACKAGE.parent).parts))
    for name in ("search", "resume", "report", "load", "compile", "model_task"):
        assert callable(getattr(autoshrink, name)), name
