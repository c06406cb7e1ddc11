"""The shared conformance suite, on the torch backend."""

from peftcore.testing import ConformanceSuite


class TestTorchConformance(ConformanceSuite):
    backends = ["torch"]
