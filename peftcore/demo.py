"""``python -m peftcore demo``: LoRA on a torch MLP with scikit-learn's digits data.

The base MLP (64-256-10) is trained only on the digits 0-4, so it cannot recognise
5-9. LoRA (r=8 on both linears, base frozen) then adapts it to all ten digits while
training a small share of the parameters (10 epochs by default). The script prints accuracy before and after
and the trainable share; ``--plot PATH`` saves the training loss curve (base training,
then LoRA) as a PNG (needs matplotlib, checked before any training starts).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from peftcore.errors import PeftCoreError


def _load_digits(seed: int) -> tuple:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    return train_test_split(features, digits.target.astype(np.int64), test_size=0.3, random_state=seed, stratify=digits.target)


def _train(model: Any, parameters: list, x: Any, y: Any, epochs: int, lr: float, seed: int, label: str) -> list[float]:
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    losses: list[float] = []
    batches = [(i, min(i + 64, len(x))) for i in range(0, len(x), 64)]
    model.train()
    with tqdm(total=epochs * len(batches), desc=label, unit="step", disable=None) as progress:  # a terminal only; the bar stays
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start, stop in batches:
                index = order[start:stop]
                loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def run_demo(epochs: int = 10, seed: int = 0, plot: Optional[str] = None) -> dict[str, float]:
    """Run the demo; returns the accuracies, trainable share and timings it printed."""
    import torch
    from torch import nn

    import peftcore

    if plot:
        _pyplot()  # fail before training, not after
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = (torch.from_numpy(a) for a in _load_digits(seed))
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 256))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(256, 10))

    seen = y_train < 5
    base_losses = _train(
        model, list(model.parameters()), x_train[seen], y_train[seen], epochs=10, lr=0.05, seed=seed, label="base (digits 0-4)"
    )
    before = _accuracy(model, x_test, y_test)

    config = peftcore.LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "fc2"])
    peft_model = peftcore.get_peft_model(model, config)
    assert isinstance(peft_model, nn.Module)  # on torch the PeftModel is an nn.Module
    trainable, total = peft_model.get_nb_trainable_parameters()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    started = time.perf_counter()
    losses = _train(peft_model, params, x_train, y_train, epochs=epochs, lr=0.03, seed=seed, label="LoRA (all digits)")
    seconds = time.perf_counter() - started
    after = _accuracy(peft_model, x_test, y_test)

    print("peftcore demo: LoRA on a 64-256-10 MLP, scikit-learn digits, backend", peft_model.backend.name)
    print(f"  base model (trained on digits 0-4) test accuracy on 0-9: {before:.3f}")
    print(f"  after LoRA r=8 on fc1+fc2, {epochs} epochs ({seconds:.1f}s):     {after:.3f}")
    print(f"  trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%)")
    if plot:
        _plot_losses(base_losses, losses, plot, accuracies=(before, after))
        print(f"  loss curve saved to {plot}")
    return {"before": before, "after": after, "trainable_share": trainable / total, "seconds": seconds}


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or a clear error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PeftCoreError(f"--plot needs matplotlib (pip install 'peftcore[demo]' or pip install matplotlib): {exc}") from None
    return plt


def _plot_losses(base_losses: list[float], lora_losses: list[float], path: str, accuracies: tuple) -> None:
    """Both training phases on one step axis, the LoRA phase starting where the base ends;
    ``accuracies`` is the test accuracy on all ten digits before and after LoRA."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.8))
    start = len(base_losses)
    axes.plot(range(start), base_losses, linewidth=1, label="base model, digits 0-4 (all weights)")
    axes.plot(range(start, start + len(lora_losses)), lora_losses, linewidth=1, label="LoRA r=8, digits 0-9 (base frozen)")
    axes.axvline(start, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("training step")
    axes.set_ylabel("cross-entropy loss")
    axes.set_title(
        "peftcore demo: LoRA teaches a digits MLP the classes it never saw (torch)\n"
        f"test accuracy on digits 0-9: {accuracies[0]:.3f} before LoRA, {accuracies[1]:.3f} after",
        fontsize="medium",
    )
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise PeftCoreError(f"cannot save the plot to {path!r}: {exc}") from None
    finally:
        plt.close(figure)
