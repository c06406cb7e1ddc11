"""The shared conformance suite, on the SINGA backend (skipped, with the reason, without SINGA)."""

from peftcore.testing import ConformanceSuite


class TestSingaConformance(ConformanceSuite):
    backends = ["singa"]
