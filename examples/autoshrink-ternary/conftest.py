"""Pytest puts this folder on ``sys.path`` (it holds a conftest), so the tests import
``autoshrink_ternary`` from here: nothing needs installing to run them."""

import autoshrink_ternary
import pytest

from autoshrink.registry import Registry, load_registry


@pytest.fixture
def registry() -> Registry:
    """The built-in plugins and this one, registered in-process."""
    return load_registry(extra_plugins=[autoshrink_ternary])
