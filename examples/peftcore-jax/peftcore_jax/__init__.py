"""peftcore's JAX backend: LoRA, BitFit and prompt tuning on Flax NNX models.

Written only against peftcore's public seam (:mod:`peftcore.runtime`,
:mod:`peftcore.primitives`, :mod:`peftcore.adapter_layer`); see ``docs/architecture.md``,
"Write a backend", which this package follows step by step.
"""
