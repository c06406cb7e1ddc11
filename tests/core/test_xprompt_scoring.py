"""XPrompt's framework-free parts: scores, piece layout, pruning order, config checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore import ConfigError, XPromptConfig
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore.xprompt import _prune_lowest, _spread, piece_bounds, piece_importance, token_importance


def test_token_score_is_the_absolute_mask_derivative() -> None:
    prompt = np.array([[1.0, 2.0], [3.0, -1.0]])
    grad = np.array([[0.5, -1.0], [1.0, 3.0]])
    # dL/dg_i = <grad_i, p_i>: 0.5 - 2 = -1.5 and 3 - 3 = 0
    np.testing.assert_allclose(token_importance(prompt, grad), [1.5, 0.0])


def test_piece_scores_sum_to_the_token_product_per_piece() -> None:
    rng = np.random.default_rng(0)
    prompt, grad = rng.standard_normal((3, 10)), rng.standard_normal((3, 10))
    pieces = piece_importance(prompt, grad, 3)
    assert pieces.shape == (3, 3)
    assert piece_bounds(10, 3) == [0, 3, 6, 10]
    np.testing.assert_allclose(pieces[:, 2], np.abs((prompt * grad)[:, 6:].sum(axis=1)))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 40), pieces=st.integers(1, 40), rows=st.integers(1, 5), seed=st.integers(0, 1000),
       blocks=st.sampled_from([1, 2]))
def test_piece_layout_matches_the_plan_op(width: int, pieces: int, rows: int, seed: int, blocks: int) -> None:
    """The op's mask covers its whole stored table: HF's encoder-decoder layout (two blocks
    of rows) is masked block by block alike."""
    pieces = min(pieces, width)
    mask = np.random.default_rng(seed).integers(0, 2, size=(rows, pieces))
    op = AddPrompt(path="e", num_virtual_tokens=rows, token_dim=width, num_embeddings=3, piece_mask=mask.tolist(),
                   num_transformer_submodules=blocks)
    np.testing.assert_array_equal(np.asarray(op.element_mask()), np.tile(_spread(mask, width), (blocks, 1)))


def test_pruning_takes_the_lowest_kept_entries_first() -> None:
    mask = np.array([1, 0, 1, 1, 1])
    _prune_lowest(mask, np.array([0.5, 0.0, 0.1, 0.9, 0.1]), target=3)
    np.testing.assert_array_equal(mask, [1, 0, 0, 1, 0])
    _prune_lowest(mask, np.zeros(5), target=2)  # already past the target: unchanged
    np.testing.assert_array_equal(mask, [1, 0, 0, 1, 0])


@pytest.mark.parametrize(
    "bad",
    [{"token_ratio": 1.0}, {"piece_ratio": -0.1}, {"num_pieces": 0}, {"rounds": 1.5}, {"scoring_batches": 0}, {"token_ratio": True}],
)
def test_config_errors_name_the_field(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        XPromptConfig(**bad)
