from autoshrink_ternary import Ternary

from autoshrink.testing import ValueMethodTests


class TestTernary(ValueMethodTests):
    method = Ternary()
    configs = [{"threshold": 0.0}, {"threshold": 0.05}, {"threshold": 0.3}]
