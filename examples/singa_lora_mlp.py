"""LoRA on Apache SINGA with peftcore: the task of SINGA's ``examples/singa_peft``, done right.

SINGA's PEFT example fine-tunes its ``MLP`` (``linear1`` -> ReLU -> ``linear2``) with
LoRA, on MNIST. Here the same MLP is 64-256-10 on scikit-learn's digits (no download),
and the run is set up so that LoRA has something to learn:

1. The base MLP is trained on the digits 0-4 only (SGD, lr 0.01, momentum 0.9, 10
   epochs), so it cannot recognise 5-9 (about half the test set right). The gentle
   base learning rate matters: a base trained at lr 0.05 is so sure of 0-4 that LoRA
   starts at a loss near 9 and, at lr 0.05 with momentum 0.9, diverges (PyTorch too).
2. The base is frozen and peftcore adds LoRA (r=8, alpha=16) to ``linear1`` and
   ``linear2``; about a fifth of the parameters are trainable.
3. LoRA is trained on all ten digits: SGD, lr 0.05, momentum 0.9, batch 64, 5 epochs,
   in SINGA's graph mode (``compile(..., use_graph=True)``).
4. The test accuracy before and after, the trainable parameter counts and the time per
   step are printed, and the adapter is saved in Hugging Face PEFT's format
   (``adapter_config.json`` + ``adapter_model.safetensors``) to ``--out``, then loaded
   back into a fresh copy of the base model to check it gives the same accuracy.

Run it with a Python that has SINGA (and scikit-learn)::

    python examples/singa_lora_mlp.py --out /tmp/digits-lora

Where ``import singa`` fails, it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

try:
    from peftcore_singa.compat import apply_shims

    apply_shims()  # SINGA 5.x needs two removed names back on Python >= 3.10 / numpy >= 1.24
    from singa import device, layer, model, opt, tensor
except Exception as exc:  # ImportError, or a SINGA built against another numpy
    SINGA_UNAVAILABLE: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    SINGA_UNAVAILABLE = None

import peftcore

BATCH = 64
SEED = 0

if SINGA_UNAVAILABLE is None:

    class MLP(model.Model):
        """``linear1`` -> ReLU -> ``linear2``, trained with softmax cross-entropy."""

        def __init__(self, hidden: int = 256, classes: int = 10) -> None:
            super().__init__()
            self.linear1 = layer.Linear(hidden)
            self.relu = layer.ReLU()
            self.linear2 = layer.Linear(classes)
            self.loss = layer.SoftMaxCrossEntropy()

        def forward(self, x: Any) -> Any:
            return self.linear2(self.relu(self.linear1(x)))

        def set_optimizer(self, optimizer: Any) -> None:
            self.optimizer = optimizer

        def train_one_batch(self, x: Any, y: Any) -> tuple:
            out = self.forward(x)
            loss = self.loss(out, y)
            self.optimizer(loss)
            return out, loss


def load_digits_split(seed: int = SEED) -> tuple:
    """scikit-learn's 8x8 digits scaled to [0, 1]: ``(x_train, x_test, y_train, y_test)``
    (70/30, stratified), float32 features and int32 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(features, labels, test_size=0.3, random_state=seed, stratify=labels)


def train(net: Any, placeholders: tuple, x: np.ndarray, y: np.ndarray, epochs: int, label: str) -> list[float]:
    """Train ``net`` for ``epochs`` over ``(x, y)`` in shuffled full batches, feeding the
    graph-mode placeholders in place. Returns the seconds each step took."""
    from tqdm import tqdm

    tx, ty = placeholders
    order_rng = np.random.default_rng(SEED)
    steps_per_epoch = len(x) // BATCH  # graph mode replays fixed shapes: the last partial batch is dropped
    seconds: list[float] = []
    net.train()
    with tqdm(total=epochs * steps_per_epoch, desc=label, unit="step", leave=False, disable=None) as progress:
        for _ in range(epochs):
            order = order_rng.permutation(len(x))
            for step in range(steps_per_epoch):
                batch = order[step * BATCH : (step + 1) * BATCH]
                started = time.perf_counter()
                tx.copy_from_numpy(x[batch])
                ty.copy_from_numpy(y[batch])
                _, loss = net(tx, ty)
                loss_value = float(tensor.to_numpy(loss)[0])
                seconds.append(time.perf_counter() - started)
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.3f}")
    return seconds


def accuracy(net: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy (eval mode runs eagerly, so the whole set goes in one batch)."""
    net.eval()
    out = net(tensor.from_numpy(x))
    return float((tensor.to_numpy(out).argmax(axis=1) == y).mean())


def new_model(dev: Any, lr: float) -> tuple:
    """A fresh MLP with an SGD optimizer, compiled for graph-mode training on
    ``(BATCH, 64)`` placeholders."""
    tx = tensor.Tensor((BATCH, 64), dev, tensor.float32)
    tx.requires_grad = False  # input data: no gradient needed
    ty = tensor.Tensor((BATCH,), dev, tensor.int32)
    net = MLP()
    net.set_optimizer(opt.SGD(lr=lr, momentum=0.9))
    net.compile([tx], is_train=True, use_graph=True)
    return net, (tx, ty)


def run_example(out_dir: Optional[str] = None, epochs: int = 5, base_epochs: int = 10) -> dict[str, Any]:
    """Train the base, then LoRA, save and reload the adapter; returns what :func:`main` prints."""
    x_train, x_test, y_train, y_test = load_digits_split()
    dev = device.get_default_device()
    dev.SetRandSeed(SEED)  # SINGA draws Linear and LoRA initial weights on the host RNG
    net, placeholders = new_model(dev, lr=0.01)
    seen = y_train < 5
    train(net, placeholders, x_train[seen], y_train[seen], base_epochs, "base (digits 0-4)")
    base_weights = {name: tensor.to_numpy(t).copy() for name, t in net.get_params().items()}
    before = accuracy(net, x_test, y_test)

    # Freeze the base and add LoRA. peftcore drops the graph recorded for the base, so the
    # next step records the LoRA model (no second compile needed); set a fresh optimizer.
    config = peftcore.LoraConfig(r=8, lora_alpha=16, target_modules=["linear1", "linear2"])
    peft_model = peftcore.get_peft_model(net, config)
    net.set_optimizer(opt.SGD(lr=0.05, momentum=0.9))
    trainable, total = peft_model.get_nb_trainable_parameters()
    step_seconds = train(net, placeholders, x_train, y_train, epochs, "LoRA (all digits)")
    after = accuracy(net, x_test, y_test)

    out_dir = out_dir or tempfile.mkdtemp(prefix="peftcore-singa-lora-")
    peft_model.save_pretrained(out_dir)
    fresh, _ = new_model(dev, lr=0.05)
    fresh.set_params(base_weights)
    reloaded = peftcore.PeftModel.from_pretrained(fresh, out_dir)
    return {
        "backend": peft_model.backend.name,
        "before": before,
        "after": after,
        "trainable": trainable,
        "total": total,
        "ms_per_step": 1000.0 * statistics.median(step_seconds),
        "steps": len(step_seconds),
        "out_dir": out_dir,
        "reloaded_accuracy": accuracy(reloaded.model, x_test, y_test),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="LoRA on a SINGA MLP with peftcore (scikit-learn digits)")
    parser.add_argument("--out", help="directory to save the adapter in (default: a new temporary directory)")
    parser.add_argument("--epochs", type=int, default=5, help="LoRA training epochs (default 5)")
    parser.add_argument("--base-epochs", type=int, default=10, help="base training epochs on digits 0-4 (default 10)")
    args = parser.parse_args(argv)
    if SINGA_UNAVAILABLE is not None:
        print(f"skipping the SINGA LoRA example: singa is not importable ({SINGA_UNAVAILABLE})")
        return 0
    if importlib.util.find_spec("sklearn") is None:
        print("this example needs scikit-learn for the digits data: pip install scikit-learn", file=sys.stderr)
        return 1
    result = run_example(args.out, args.epochs, args.base_epochs)
    share = 100.0 * result["trainable"] / result["total"]
    print(f"peftcore + SINGA: LoRA on a 64-256-10 MLP, scikit-learn digits (backend {result['backend']})")
    print(f"  base model (trained on digits 0-4), test accuracy on 0-9: {result['before']:.3f}")
    print(f"  after LoRA r=8 on linear1+linear2 ({args.epochs} epochs):  {result['after']:.3f}")
    print(f"  trainable parameters: {result['trainable']:,} of {result['total']:,} ({share:.2f}%)")
    print(f"  median time per training step: {result['ms_per_step']:.2f} ms ({result['steps']} steps, graph mode)")
    print(f"  adapter saved to {result['out_dir']}")
    print(f"  reloaded into a fresh copy of the base model, test accuracy: {result['reloaded_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
