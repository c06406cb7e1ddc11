"""(IA)^3 for peftcore, as a third-party plugin package.

(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning") trains one vector per adapted linear layer that
rescales the layer's output (or, for feed-forward layers, its input).

The package reaches peftcore only through the ``peftcore`` entry-point group (entry
point ``ia3`` -> :mod:`peftcore_ia3.plugin`). Importing it does not import torch.
"""

from __future__ import annotations

from peftcore_ia3.config import IA3Config, IA3Scale

__version__ = "0.1.0"

__all__ = ["IA3Config", "IA3Scale", "__version__"]
