"""Run by ``test_atomic_save.py`` in a subprocess, to be killed in the middle of a save.

Usage: ``python interrupted_save_worker.py DIRECTORY WIDTH LAYERS``. Builds a torch
model of ``LAYERS`` ``Linear(WIDTH, WIDTH)`` layers with a rank-``WIDTH`` LoRA adapter
(large, so that writing it takes a while) and saves it over ``DIRECTORY``.
"""

from __future__ import annotations

import sys


def main() -> None:
    directory, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import torch

    import peftcore
    from peftcore import LoraConfig

    torch.manual_seed(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    config = LoraConfig(r=width, target_modules=[str(i) for i in range(layers)], init_lora_weights=False)
    peftcore.get_peft_model(model, config).save_pretrained(directory)


if __name__ == "__main__":
    main()
