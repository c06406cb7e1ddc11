"""The shared conformance suite, on the torch backend (which also builds UniPELT)."""

from peftcore.testing import ConformanceSuite, UniPELTSuite


class TestTorchConformance(ConformanceSuite, UniPELTSuite):
    backends = ["torch"]
