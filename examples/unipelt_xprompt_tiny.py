"""UniPELT and XPrompt on tiny transformers, built locally (no downloads).

* **UniPELT**: a frozen, randomly initialised tiny BERT learns to tell whether a sequence
  contains the "signal" token, through UniPELT's gated LoRA, prefix and adapter (plus the
  classifier head); the gates it learned are printed per layer.
* **XPrompt**: a tiny Llama is first trained on four "shift" tasks, each announced by a
  task token; prompt tuning then teaches the frozen model to do the ``token + 3`` task with
  no task token, and XPrompt prunes half of the prompt's tokens and a quarter of the rest's
  pieces by their loss sensitivity, rewinds, and retrains with the masks fixed.

    python examples/unipelt_xprompt_tiny.py            # about a minute on a laptop CPU
    python examples/unipelt_xprompt_tiny.py --quick    # fewer steps (what the tests run)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftcore
from peftcore import PromptTuningConfig, UniPELTConfig, XPromptConfig, gate_values, xprompt_prune

VOCAB = 48
SIGNAL = 7
SHIFT = 3


def train(peft_model: peftcore.PeftModel, batches: list, loss_fn, lr: float, desc: str) -> None:
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        loss = loss_fn(peft_model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    peft_model.eval()


# -- UniPELT ------------------------------------------------------------------------------
def signal_batch(generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(8, VOCAB, (size, 10), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    where = torch.randint(0, 10, (size,), generator=generator)
    ids[labels == 1, where[labels == 1]] = SIGNAL
    return ids, labels


def unipelt_demo(steps: int) -> dict:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    peft_model = peftcore.get_peft_model(
        model, UniPELTConfig(variant="APL", r=4, num_virtual_tokens=4, bottleneck_size=16, task_type="SEQ_CLS")
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    generator = torch.Generator().manual_seed(1)
    test_ids, test_labels = signal_batch(generator, 256)

    def accuracy() -> float:
        with torch.no_grad():
            return float((peft_model(input_ids=test_ids).logits.argmax(-1) == test_labels).float().mean())

    before = accuracy()
    batches = [signal_batch(generator) for _ in range(steps)]
    train(peft_model, batches, lambda m, b: m(input_ids=b[0], labels=b[1]).loss, 1e-2, "UniPELT")
    after = accuracy()
    with torch.no_grad():
        peft_model(input_ids=test_ids[:4])
    gates = {path: float(np.mean(values)) for path, values in gate_values(peft_model).items()}
    print(f"UniPELT (APL) on a frozen tiny BERT: {trainable:,} of {total:,} parameters trainable")
    print(f"  accuracy on 'contains token {SIGNAL}': {before:.3f} -> {after:.3f}")
    print("  mean gate values after training:")
    for path, value in gates.items():
        print(f"    {path:55} {value:.3f}")
    return {"before": before, "after": after, "gates": gates}


# -- XPrompt ------------------------------------------------------------------------------
SHIFTS = (1, 2, 3, 5)  # task k is announced by token k - 1 ... in pretraining only
FIRST_WORD = 8


def shift_batch(generator: torch.Generator, shift: int, size: int = 16, task_token: bool = False) -> torch.Tensor:
    start = torch.randint(0, VOCAB - FIRST_WORD, (size, 1), generator=generator)
    ids = (start + shift * torch.arange(10)) % (VOCAB - FIRST_WORD) + FIRST_WORD
    if task_token:
        ids = torch.cat([torch.full((size, 1), SHIFTS.index(shift)), ids], dim=1)
    return ids


def lm_loss(model: object, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def pretrained_llama(steps: int, generator: torch.Generator) -> LlamaForCausalLM:
    """A tiny Llama taught all shift tasks, each announced by a task token."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(steps), desc="pretraining the base", leave=False, disable=None):
        ids = torch.cat([shift_batch(generator, k, 8, task_token=True) for k in SHIFTS])
        loss = lm_loss(model, ids)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def xprompt_demo(steps: int) -> dict:
    generator = torch.Generator().manual_seed(2)
    model = pretrained_llama(2 * steps, generator)
    # the prompt must stand in for the task token of shift 3, which the data no longer has
    peft_model = peftcore.get_peft_model(model, PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB"))
    test = shift_batch(generator, SHIFT, 128)

    def accuracy() -> tuple[float, int]:
        """How often the token after the first one is right: with no earlier pair to copy
        the shift from, only the prompt (or a task token) can say which task this is."""
        with torch.no_grad():
            logits = peft_model(input_ids=test).logits
        first = logits[:, -test.shape[1]]
        return float((first.argmax(-1) == test[:, 1]).float().mean()), logits.shape[1]

    with peft_model.disable_adapter():
        base, _ = accuracy()
    train(peft_model, [shift_batch(generator, SHIFT) for _ in range(steps)], lm_loss, 5e-2, "prompt tuning")
    trained, trained_length = accuracy()
    result = xprompt_prune(
        peft_model, [shift_batch(generator, SHIFT) for _ in range(4)], lm_loss,
        XPromptConfig(token_ratio=0.5, piece_ratio=0.25, num_pieces=4, rounds=2),
    )
    pruned, pruned_length = accuracy()
    train(peft_model, [shift_batch(generator, SHIFT) for _ in range(steps // 2)], lm_loss, 5e-2, "retraining")
    retrained, _ = accuracy()
    prompt = peft_model.get_input_embeddings().prompt("default").detach()
    zero_share = float((prompt == 0).float().mean())
    print(f"\nXPrompt on a tiny Llama pretrained on shift tasks (prompt replaces the task token of shift {SHIFT}):")
    print(f"  accuracy of the first prediction: base alone {base:.3f}, prompt-tuned {trained:.3f}, pruned {pruned:.3f}, "
          f"retrained {retrained:.3f}")
    print(f"  tokens kept: {result.token_mask.tolist()} (sequence {trained_length} -> {pruned_length} positions)")
    print(f"  pieces pruned among kept tokens: {int((result.piece_mask == 0).sum())} of {result.piece_mask.size}; "
          f"share of prompt entries exactly zero after retraining: {zero_share:.3f}")
    return {"base": base, "trained": trained, "pruned": pruned, "retrained": retrained,
            "lengths": (trained_length, pruned_length), "zero_share": zero_share}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps per phase")
    parser.add_argument("--quick", action="store_true", help="40 steps per phase")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else args.steps
    return {"unipelt": unipelt_demo(steps), "xprompt": xprompt_demo(steps)}


if __name__ == "__main__":
    main()
