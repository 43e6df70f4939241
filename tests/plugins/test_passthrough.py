"""The passthrough built-ins prove the method contract through the conformance kit."""

from autoshrink.testing import StructureMethodTests, ValueMethodTests
from autoshrink_plugins.dense import Dense
from autoshrink_plugins.floating import Float


class TestDense(StructureMethodTests):
    method = Dense()


class TestFloat(ValueMethodTests):
    method = Float()
    configs = [{"bits": 32}, {"bits": 16}]
