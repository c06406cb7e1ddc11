"""peftcore's shipped test kit: the conformance suite, toy model specs and the numpy reference.

Importing :mod:`peftcore.testing` needs pytest; the core itself never imports it.
"""

from __future__ import annotations

from peftcore.testing.suite import ConformanceSuite
from peftcore.testing.suite_unipelt import UniPELTSuite
from peftcore.testing.toys import TOY_SPECS, ToySpec, ToyStep, lora_deltas, reference_forward

__all__ = ["ConformanceSuite", "UniPELTSuite", "TOY_SPECS", "ToySpec", "ToyStep", "lora_deltas", "reference_forward"]
