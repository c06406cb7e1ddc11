"""The scaled float comparison every numerical test uses (peftcore.testing.numerics)."""

from __future__ import annotations

import numpy as np
import pytest

from peftcore.testing.numerics import (
    FLOAT32_RTOL,
    FLOAT64_RTOL,
    assert_close_to_scale,
    close_to_scale,
    scaled_difference,
)


def test_the_bound_scales_with_the_largest_magnitude() -> None:
    big = np.array([3.4, -1.0, 0.0])
    assert close_to_scale(big + [3e-5, 0.0, 3e-5], big)  # 1e-5 absolute on logits of 3.4 is rounding
    assert not close_to_scale(big + [0.0, 0.0, 1e-3], big)
    small = big * 1e-6
    assert not close_to_scale(small + [0.0, 0.0, 3e-6], small)  # an absolute 1e-5 bound would pass this


def test_float32_rounding_of_a_sum_in_another_order_passes() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 512)).astype(np.float32), rng.standard_normal((512, 32)).astype(np.float32)
    blocked = sum(a[:, i : i + 64] @ b[i : i + 64] for i in range(0, 512, 64))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert_close_to_scale(blocked, a @ b)
    assert_close_to_scale(a @ b, exact)
    assert not close_to_scale(a @ b, exact, rtol=FLOAT64_RTOL)  # float32 is visible at float64's bound


def test_the_failure_message_names_difference_scale_and_ratio() -> None:
    with pytest.raises(AssertionError, match=r"logits: largest difference 0\.5 is 0\.25 of the largest magnitude 2"):
        assert_close_to_scale([2.0, 1.0], [2.0, 1.5], err_msg="logits")


def test_shape_mismatch_and_non_finite_values_fail_plainly() -> None:
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close_to_scale(np.zeros(3), np.zeros(4))
    assert not close_to_scale([np.nan, 1.0], [0.0, 1.0])
    assert not close_to_scale([np.inf], [1e30])
    assert close_to_scale([np.nan, np.inf], [np.nan, np.inf])  # the same non-finite values in the same places
    assert scaled_difference([], []) == (0.0, 0.0)


def test_zeros_compare_exactly() -> None:
    assert close_to_scale(np.zeros(5), np.zeros(5))
    assert not close_to_scale(np.zeros(5), np.full(5, 1e-30))


def test_torch_tensors_with_gradients_and_half_precision_are_read() -> None:
    torch = pytest.importorskip("torch")
    x = torch.ones(3, requires_grad=True) * 2
    assert_close_to_scale(x, np.full(3, 2.0))
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert_close_to_scale(half, [1.0, 2.0], rtol=FLOAT32_RTOL)
