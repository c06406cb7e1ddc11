"""XPrompt (Ma et al., EMNLP 2022): prune a trained prompt down to its useful parts.

Starting from a trained prompt-tuning adapter:

1. **Token level.** Each virtual token ``i`` gets a mask ``g_i`` (1 at the start); its
   importance is the expected absolute sensitivity of the loss to that mask,
   ``E_batch |dL/dg_i|``. Since token ``i`` enters the model as ``g_i * p_i``,
   ``dL/dg_i = <dL/dp_i, p_i>``: the score needs only the prompt and its gradient. The
   lowest-scoring ``token_ratio`` of the tokens are pruned (over ``rounds`` rounds,
   rescoring the survivors each round).
2. **Piece level.** Every surviving token vector is cut into ``num_pieces`` pieces, scored
   the same way (``|<dL/dp_piece, p_piece>|``), and the lowest ``piece_ratio`` of the
   pieces are pruned.
3. **Rewind.** The surviving entries go back to their trained values, pruned pieces are
   zero, pruned tokens leave the sequence; the masks are fixed in the adapter's plan
   (saved with it) and the user retrains with their own loop.

The scoring loop is framework-neutral: the user brings batches and a loss function; the
backend runtime's ``gradients`` primitive turns each loss into numpy gradients
(:meth:`~peftcore.peft_model.PeftModel.adapter_gradients`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np

from peftcore import model_ops
from peftcore.errors import AdapterError, ConfigError
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore.model_lock import changes_model
from peftcore.plan import RewritePlan

if TYPE_CHECKING:
    from peftcore.api import PeftModel

LossFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class XPromptConfig:
    """How much of a trained prompt XPrompt prunes.

    - ``token_ratio``: share of the virtual tokens pruned (``[0, 1)``).
    - ``piece_ratio``: share of the surviving tokens' pieces pruned (``[0, 1)``).
    - ``num_pieces``: pieces each token vector is cut into (at most its width).
    - ``rounds``: each level reaches its ratio over this many scoring rounds.
    - ``scoring_batches``: batches used per scoring round (``None``: all given).
    """

    token_ratio: float = 0.5
    piece_ratio: float = 0.25
    num_pieces: int = 4
    rounds: int = 1
    scoring_batches: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("token_ratio", "piece_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"XPromptConfig.{name} must be in [0, 1), got {value!r}")
        for name, low in (("num_pieces", 1), ("rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"XPromptConfig.{name} must be an integer >= {low}, got {value!r}")
        batches = self.scoring_batches
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
            raise ConfigError(f"XPromptConfig.scoring_batches must be a positive integer or None, got {batches!r}")


@dataclass(frozen=True)
class XPromptResult:
    """What pruning kept: ``token_mask`` over the original tokens (1 = kept),
    ``piece_mask`` over the kept tokens' pieces, and the last round's scores."""

    token_mask: np.ndarray
    piece_mask: np.ndarray
    token_scores: np.ndarray
    piece_scores: np.ndarray

    @property
    def num_pruned_tokens(self) -> int:
        return int((self.token_mask == 0).sum())


def token_importance(prompt: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``|dL/dg_i| = |<dL/dp_i, p_i>|`` for each token mask ``g_i`` (one batch)."""
    return np.abs((prompt.astype(np.float64) * grad.astype(np.float64)).sum(axis=-1))


def piece_importance(prompt: np.ndarray, grad: np.ndarray, num_pieces: int) -> np.ndarray:
    """``|<dL/dp_piece, p_piece>|`` for each piece of each token: ``(tokens, num_pieces)``."""
    product = prompt.astype(np.float64) * grad.astype(np.float64)
    bounds = piece_bounds(prompt.shape[-1], num_pieces)
    return np.abs(np.stack([product[:, bounds[j] : bounds[j + 1]].sum(axis=-1) for j in range(num_pieces)], axis=-1))


def piece_bounds(width: int, num_pieces: int) -> list[int]:
    """Where the pieces of a ``width``-long vector start and end (as ``AddPrompt.element_mask``)."""
    return [j * width // num_pieces for j in range(num_pieces + 1)]


@changes_model
def xprompt_prune(
    peft_model: PeftModel,
    batches: Iterable[Any],
    loss_fn: LossFn,
    config: Optional[XPromptConfig] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
) -> XPromptResult:
    """Prune the trained prompt of ``adapter_name`` (default: the active adapter) in place.

    ``loss_fn(peft_model, batch)`` must run the model on ``batch`` and return the loss as
    a scalar of the model's framework (with its graph, as for training). Scores use the
    model in its current train/eval mode; call ``eval()`` first for deterministic scores.
    Afterwards the adapter is a prompt-tuning adapter with the surviving tokens and fixed
    piece masks, rewound to the trained values: retrain it with your own loop.
    """
    from tqdm.auto import tqdm

    config = config or XPromptConfig()
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.plans:
        raise AdapterError(f"no adapter named {name!r} to prune")
    plan = peft_model.plans[name]
    op = _plain_prompt_op(plan, name)
    if config.num_pieces > op.token_dim:
        raise ConfigError(f"XPromptConfig.num_pieces={config.num_pieces} exceeds the prompt width {op.token_dim}")
    scoring = _take(batches, config.scoring_batches)
    if not scoring:
        raise ConfigError("xprompt_prune needs at least one batch to score the prompt")

    exported = {k: np.asarray(v) for k, v in peft_model.export_adapter(name).items()}
    key = f"{op.path}.prompt_embeddings"
    # HF's encoder-decoder layout stores a second block of rows after the prompt the model
    # reads (the decoder's, unused): scores come from the first block, and the second is
    # cut to the same kept tokens and pieces, so the file keeps HF's layout
    tokens, width = op.num_virtual_tokens, op.token_dim
    trained = exported[key].astype(np.float64)[:tokens]
    other_blocks = exported[key].astype(np.float64)[tokens:]

    def table(values: np.ndarray, others: np.ndarray) -> np.ndarray:
        return np.concatenate([values, others]).astype(exported[key].dtype)

    def score(values: np.ndarray, level: str) -> np.ndarray:
        current = {**exported, key: table(values, other_blocks)}
        peft_model.import_adapter(name, current)
        total: Optional[np.ndarray] = None
        for index, batch in enumerate(tqdm(scoring, desc=f"XPrompt {level} scores", disable=not progress, leave=False)):
            loss = loss_fn(peft_model, batch)
            _check_finite_scores(np.asarray(peft_model.runtime.to_numpy(loss)), f"the loss of batch {index}", level, name)
            grad = np.asarray(peft_model.adapter_gradients(name, loss)[key])[:tokens]
            step = token_importance(values, grad) if level == "token" else piece_importance(values, grad, config.num_pieces)
            _check_finite_scores(step, f"the {level} importance scores of batch {index}", level, name)
            total = step if total is None else total + step
        assert total is not None
        _check_finite_scores(total, f"the summed {level} importance scores", level, name)
        return total / len(scoring)

    trainable = name in peft_model.active_adapters and not peft_model.peft_config[name].inference_mode
    runtime, model = peft_model.runtime, peft_model.get_base_model()
    model_ops.set_trainable(runtime, model, name, True)
    try:
        token_mask = np.ones(tokens, dtype=np.int64)
        token_scores = np.zeros(tokens)
        for round_index in range(1, config.rounds + 1):
            target = round(config.token_ratio * tokens * round_index / config.rounds)
            token_scores = score(trained * token_mask[:, None], "token")
            _prune_lowest(token_mask, token_scores, target)
        kept = np.flatnonzero(token_mask)
        piece_mask = np.ones((len(kept), config.num_pieces), dtype=np.int64)
        piece_scores = np.zeros(piece_mask.shape)
        for round_index in range(1, config.rounds + 1):
            target = round(config.piece_ratio * piece_mask.size * round_index / config.rounds)
            masked = np.zeros_like(trained)
            masked[kept] = trained[kept] * _spread(piece_mask, width)
            piece_scores = score(masked, "piece")[kept]
            _prune_lowest(piece_mask.reshape(-1), piece_scores.reshape(-1), target)
    finally:
        # the trained values back, whether scoring failed or not: installing the pruned
        # prompt below is all or nothing, and on failure leaves the adapter as trained
        peft_model.import_adapter(name, exported)
        model_ops.set_trainable(runtime, model, name, trainable)

    pruned_op = dataclasses.replace(
        op,
        num_virtual_tokens=len(kept),
        init="random",
        init_token_ids=(),
        token_mask=tuple(int(m) for m in token_mask),
        piece_mask=tuple(tuple(int(m) for m in row) for row in piece_mask),
    )
    new_plan = RewritePlan(plan.method, name, tuple(pruned_op if o is op else o for o in plan.ops), plan.version)
    new_config = peft_model.peft_config[name].replace(num_virtual_tokens=len(kept))
    spread = _spread(piece_mask, width)
    others = other_blocks.reshape(-1, tokens, width)[:, kept] * spread  # (blocks - 1, kept, width)
    rewound = table(trained[kept] * spread, others.reshape(-1, width))
    peft_model.replace_adapter(name, new_config, new_plan, {**exported, key: rewound})
    return XPromptResult(token_mask, piece_mask, token_scores, piece_scores)


def _plain_prompt_op(plan: RewritePlan, name: str) -> AddPrompt:
    ops = [op for op in plan.ops if isinstance(op, AddPrompt)]
    if len(ops) != 1:
        raise AdapterError(f"adapter {name!r} is not a prompt-tuning adapter; XPrompt prunes a trained prompt")
    op = ops[0]
    if op.residual:
        raise AdapterError(f"adapter {name!r} is a residual prompt; bake() it before pruning")
    if op.token_mask or op.piece_mask:
        raise AdapterError(f"adapter {name!r} is already pruned")
    if op.encoder:
        raise AdapterError(f"adapter {name!r} is a P-tuning prompt (an encoder's output); XPrompt prunes a plain prompt")
    return op


def _check_finite_scores(values: np.ndarray, what: str, level: str, adapter_name: str) -> None:
    """Refuse to rank entries on NaN/Inf: a non-finite loss or gradient makes every
    comparison of scores meaningless (NaN sorts last, so the pruned half would be chance)."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise AdapterError(
            f"xprompt_prune of adapter {adapter_name!r}: {what} hold {bad} NaN/Inf value(s) while scoring at the "
            f"{level} level; nothing was pruned and the adapter is unchanged (check the loss function and the batches)"
        )


def _take(batches: Iterable[Any], limit: Optional[int]) -> list[Any]:
    taken: list[Any] = []
    for batch in batches:
        if limit is not None and len(taken) >= limit:
            break
        taken.append(batch)
    return taken


def _prune_lowest(mask: np.ndarray, scores: np.ndarray, target: int) -> None:
    """Zero the lowest-scoring kept entries of ``mask`` until ``target`` are zero."""
    missing = target - int((mask == 0).sum())
    if missing <= 0:
        return
    kept = np.flatnonzero(mask)
    order = kept[np.argsort(scores[kept], kind="stable")]
    mask[order[:missing]] = 0


def _spread(piece_mask: np.ndarray, width: int) -> np.ndarray:
    """``(tokens, pieces)`` piece mask -> ``(tokens, width)`` entry mask."""
    bounds = piece_bounds(width, piece_mask.shape[1])
    return np.repeat(piece_mask, np.diff(bounds), axis=1).astype(np.float64)


__all__ = ["XPromptConfig", "XPromptResult", "piece_importance", "token_importance", "xprompt_prune"]
