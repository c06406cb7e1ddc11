"""Residual prompt tuning and XPrompt on a tiny T5 (an encoder-decoder), built locally.

A tiny T5 is first trained on four "shift" tasks: it reads a sequence of word tokens and
writes each one shifted by ``k`` places, ``k`` announced by a task token in front of the
input. The frozen model is then taught the ``+3`` task with no task token: a residual
prompt (prompt tuning through a bottleneck MLP, Razdaibiedina et al., 2023) goes in front
of the encoder's input and learns to stand in for it. The prompt is baked into a plain
prompt, XPrompt prunes half of its tokens and a quarter of the rest's pieces by their loss
sensitivity, rewinds, and retraining with the masks fixed recovers the quality.
Quality is the share of target tokens the decoder predicts right (teacher forcing), and
greedy ``generate`` (with the cache) on a few examples.

    python examples/t5_residual_xprompt.py            # about a minute on a laptop CPU
    python examples/t5_residual_xprompt.py --quick    # fewer steps (what the tests run)
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm
from transformers import T5Config, T5ForConditionalGeneration

import peftcore
from peftcore import ResidualPromptTuningConfig, XPromptConfig, xprompt_prune

VOCAB = 24
FIRST_WORD = 4  # 0 pad / decoder start, 1 eos, 2-3 unused; task tokens live among the words' ids below
WORDS = VOCAB - FIRST_WORD
SHIFTS = (1, 2, 3, 5)
TASK_TOKENS = {1: 2, 2: 3, 3: 1, 5: 0}  # any ids outside the words
SHIFT = 3
LENGTH = 6


def shift_batch(generator: torch.Generator, shift: int, size: int = 32, task_token: bool = False) -> dict:
    words = torch.randint(0, WORDS, (size, LENGTH), generator=generator)
    source = words + FIRST_WORD
    target = (words + shift) % WORDS + FIRST_WORD
    if task_token:
        source = torch.cat([torch.full((size, 1), TASK_TOKENS[shift]), source], dim=1)
    return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": target}


def seq2seq_loss(model: object, batch: dict) -> torch.Tensor:
    return model(**batch).loss  # type: ignore[operator, no-any-return]


def train(model: torch.nn.Module, batches: list, lr: float, desc: str) -> None:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        loss = seq2seq_loss(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def pretrained_t5(steps: int, generator: torch.Generator) -> T5ForConditionalGeneration:
    """A tiny T5 taught all shift tasks, each announced by a task token."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config)
    batches = [
        {key: torch.cat([b[key] for b in parts]) for key in parts[0]}
        for parts in ([shift_batch(generator, k, 16, task_token=True) for k in SHIFTS] for _ in range(steps))
    ]
    train(model, batches, 3e-3, "pretraining the base")
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per phase")
    parser.add_argument("--quick", action="store_true", help="60 steps per phase")
    args = parser.parse_args(argv)
    steps = 60 if args.quick else args.steps
    generator = torch.Generator().manual_seed(2)
    model = pretrained_t5(4 * steps, generator)
    # num_transformer_submodules=1: no HF decoder block of prompt rows, unused by the model, to train and prune
    config = ResidualPromptTuningConfig(
        num_virtual_tokens=8, bottleneck_size=16, prompt_tuning_init="SAMPLE_VOCAB",
        task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1,
    )
    peft_model = peftcore.get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    test = shift_batch(generator, SHIFT, 256)

    def accuracy() -> float:
        with torch.no_grad():
            logits = peft_model(**test).logits
        return float((logits.argmax(-1) == test["labels"]).float().mean())

    with peft_model.disable_adapter():
        base = accuracy()
    train(peft_model, [shift_batch(generator, SHIFT) for _ in range(steps)], 3e-2, "residual prompt tuning")
    trained = accuracy()
    peft_model.bake()
    baked = accuracy()
    result = xprompt_prune(
        peft_model, [shift_batch(generator, SHIFT) for _ in range(4)], seq2seq_loss,
        XPromptConfig(token_ratio=0.5, piece_ratio=0.25, num_pieces=4, rounds=2), progress=False,
    )
    pruned = accuracy()
    train(peft_model, [shift_batch(generator, SHIFT) for _ in range(steps)], 3e-2, "retraining")
    retrained = accuracy()
    with torch.no_grad():
        sample = {k: v[:3] for k, v in test.items() if k != "labels"}
        generated = peft_model.generate(**sample, max_new_tokens=LENGTH + 1, do_sample=False)
    print(f"Residual prompt tuning + XPrompt on a tiny T5 pretrained on shift tasks (prompt replaces the task token of +{SHIFT}):")
    print(f"  {trainable:,} of {total:,} parameters trainable while training the residual prompt")
    print(f"  target-token accuracy: base alone {base:.3f}, residual prompt {trained:.3f}, baked {baked:.3f}, "
          f"pruned {pruned:.3f}, retrained {retrained:.3f}")
    print(f"  tokens kept: {result.token_mask.tolist()}; pieces pruned among kept tokens: "
          f"{int((result.piece_mask == 0).sum())} of {result.piece_mask.size}")
    for source, target, out in zip(sample["input_ids"].tolist(), test["labels"][:3].tolist(), generated.tolist()):
        print(f"  generate: {source} -> {out[1:LENGTH + 1]} (target {target})")
    return {"base": base, "trained": trained, "baked": baked, "pruned": pruned, "retrained": retrained,
            "kept": int(result.token_mask.sum())}


if __name__ == "__main__":
    main()
