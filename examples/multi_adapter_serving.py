"""Serve several LoRA adapters from one base model, each row of a batch naming its own.

A tiny Llama (random base weights, built locally) gets one LoRA adapter per "skill": adapter
``shift<k>`` learns to continue any sequence with ``token + k``. Then one mixed batch runs
every skill at once (``peft_model(ids, adapter_names=[...])``, Hugging Face PEFT's argument;
``"__base__"`` is the base model), and the script checks each row against running its
adapter alone and times the mixed batch against looping over the adapters.

    python examples/multi_adapter_serving.py            # about 10-30 s on a laptop CPU
    python examples/multi_adapter_serving.py --quick    # fewer steps (what the tests run)
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import peftcore

VOCAB = 64
SHIFTS = (1, 2, 3, 5)


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def skill_batch(shift: int, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences that follow the skill: each token is the previous one plus ``shift``."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + shift * torch.arange(length)) % VOCAB


def train_adapter(peft_model: peftcore.PeftModel, name: str, shift: int, steps: int) -> float:
    peft_model.set_adapter(name)
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(shift)
    peft_model.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc=f"training {name}", leave=False, disable=None):
        ids = skill_batch(shift, 16, 12, generator)
        loss = peft_model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    peft_model.eval()
    return float(loss.detach())


def next_token_accuracy(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float((logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    parser.add_argument("--quick", action="store_true", help="40 steps per adapter")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else args.steps

    names = [f"shift{k}" for k in SHIFTS]
    config = peftcore.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    peft_model = peftcore.get_peft_model(base_model(), config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    for name, shift in zip(names, SHIFTS):
        loss = train_adapter(peft_model, name, shift, steps)
        print(f"  {name}: final training loss {loss:.3f}")

    # one mixed batch: 8 rows per adapter plus 8 rows of the base model
    generator = torch.Generator().manual_seed(99)
    rows = [(name, skill_batch(shift, 8, 12, generator)) for name, shift in zip(names, SHIFTS)]
    rows.append(("__base__", skill_batch(1, 8, 12, generator)))
    ids = torch.cat([batch for _, batch in rows])
    adapter_names = [name for name, batch in rows for _ in range(len(batch))]
    with torch.no_grad():
        start = time.perf_counter()
        mixed = peft_model(input_ids=ids, adapter_names=adapter_names).logits
        mixed_time = time.perf_counter() - start
        start = time.perf_counter()
        alone = []
        for name, batch in rows:
            if name == "__base__":
                with peft_model.disable_adapter():
                    alone.append(peft_model(input_ids=batch).logits)
            else:
                peft_model.set_adapter(name)
                alone.append(peft_model(input_ids=batch).logits)
        loop_time = time.perf_counter() - start
    separate = torch.cat(alone)
    # relative to the largest logit: the rows are the same maths in another batch shape, so they differ by rounding
    largest = float((mixed - separate).abs().max() / separate.abs().max())

    print(f"\nmixed batch of {len(ids)} rows, {len(rows)} adapters (incl. the base):")
    print(f"  {'adapter':10} {'next-token accuracy on its skill':>34}")
    offset = 0
    accuracies = {}
    for name, batch in rows:
        accuracies[name] = next_token_accuracy(mixed[offset : offset + len(batch)], batch)
        print(f"  {name:10} {accuracies[name]:>34.3f}")
        offset += len(batch)
    print(f"  largest difference from running each adapter alone: {largest:.2e} of the largest logit")
    print(f"  one mixed forward {mixed_time * 1e3:.1f} ms vs a forward per adapter {loop_time * 1e3:.1f} ms")
    return {"accuracies": accuracies, "largest_difference": largest}


if __name__ == "__main__":
    main()
