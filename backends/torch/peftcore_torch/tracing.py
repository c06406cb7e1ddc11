"""Whether ``torch.compile`` is tracing the code running now.

Code on the inference paths asks this to keep out of a traced graph what dynamo cannot
trace (context variables, per-call caches, the model lock) and to write the arithmetic
in the form inductor fuses best.
"""

from __future__ import annotations

from typing import Callable

import torch

#: ``torch.compiler.is_compiling`` (torch >= 2.3) or its older home; dynamo reads it as a constant
compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (
    torch._dynamo.is_compiling
)
