"""Float comparisons that hold on every CPU: differences measured against the scale of what is compared.

Two float32 computations of the same maths in a different order (another BLAS kernel, another
batch shape, HF PEFT's ``lora_B(lora_A(x)) * scaling`` against a fused product, a vectorised
kernel against ``ATEN_CPU_CAPABILITY=default``) differ by rounding. That difference grows with the
size of the values, so an absolute bound such as ``1e-5`` holds on one CPU and fails on another.
These helpers bound the largest difference by ``rtol`` times the largest magnitude of the two
operands instead.

Where bit-exactness is the claim (merge then unmerge, the frozen base product, a reload of the
same tensors) tests use ``torch.equal`` / ``np.array_equal`` or zero tolerances, not these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The same maths in float32 in two orders: float32's epsilon (1.2e-7) grown by sums of a few hundred
# terms over several layers. Measured: 1.1e-5 relative on a 2-layer T5 with LoRA (peftcore vs HF PEFT),
# so 1e-4 leaves a tenfold margin for other CPUs' kernels.
FLOAT32_RTOL = 1e-4
# The same maths in float64 (the numpy reference, or both models cast to double): what is left is
# rounding of 2**-52 grown the same way, and any real difference in the maths shows far above it.
FLOAT64_RTOL = 1e-10
# Half precision kinds keep 8 (bfloat16) or 11 (float16) bits of mantissa.
HALF_RTOL = {"bfloat16": 3e-2, "float16": 4e-3}


def as_array(value: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy array, a framework tensor (torch, SINGA, JAX) or a number."""
    if hasattr(value, "detach"):  # torch: leave the graph and reach the host; numpy has no bfloat16
        value = value.detach().cpu()
        value = (value.double() if value.is_floating_point() else value).numpy()
    return np.asarray(value, dtype=np.float64)


def scaled_difference(actual: Any, expected: Any) -> tuple[float, float]:
    """(largest absolute difference, largest magnitude of either operand)."""
    got, want = as_array(actual), as_array(expected)
    if got.shape != want.shape:
        raise AssertionError(f"shapes differ: {got.shape} vs {want.shape}")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        same = np.array_equal(got, want, equal_nan=True)
        return (0.0 if same else float("inf")), 1.0
    if got.size == 0:
        return 0.0, 0.0
    difference = float(np.abs(got - want).max())
    scale = max(float(np.abs(got).max()), float(np.abs(want).max()))
    return difference, scale


def close_to_scale(actual: Any, expected: Any, rtol: float = FLOAT32_RTOL) -> bool:
    """True when the largest difference is at most ``rtol`` times the largest magnitude compared."""
    difference, scale = scaled_difference(actual, expected)
    return difference <= rtol * scale


def assert_close_to_scale(actual: Any, expected: Any, rtol: float = FLOAT32_RTOL, err_msg: str = "") -> None:
    """Assert :func:`close_to_scale`, reporting the difference, the scale and their ratio."""
    difference, scale = scaled_difference(actual, expected)
    if difference > rtol * scale:
        ratio = difference / scale if scale else float("inf")
        prefix = f"{err_msg}: " if err_msg else ""
        raise AssertionError(
            f"{prefix}largest difference {difference:.3g} is {ratio:.3g} of the largest magnitude {scale:.3g} "
            f"(allowed: {rtol:g})"
        )
