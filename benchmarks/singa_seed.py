"""Benchmark: LoRA on SINGA, the seed example (``examples/singa_peft``) vs peftcore.

The task is the issue's version of the seed's (whose ``train.py`` uses MNIST and a
hidden width of 16): the seed's own ``MLP`` class (``examples/model/mlp.py``) built
64-256-10, on scikit-learn's digits (70/30 stratified split). A base MLP is first trained, without PEFT, on the digits 0-4 only (SGD lr 0.01,
momentum 0.9, 10 epochs), so it gets about half the test set right. Each run then
starts from those base weights, freezes them, adds LoRA r=8, alpha=16 on ``linear1``
and ``linear2`` and trains it on all ten digits: SGD lr 0.05, momentum 0.9, batch 64,
5 epochs, in graph mode. The seed side uses the seed's library as its ``train.py``
does (``get_peft_model``, ``set_optimizer``, ``compile(..., use_graph=True)``); the
peftcore side calls ``peftcore.get_peft_model`` on an identical model. Both use the
same data, batch order and RNG seeds; the runs alternate, the order reversed every
round, and the device's recorded graph is cleared before each. A step is: copy the batch into the placeholders, run
``train_one_batch``, read the loss. Reported: test accuracy after LoRA, median ms per
step over all rounds, and the time relative to the seed's. Two more rows, for
reference: peftcore run eagerly (``use_graph=False``), and the seed with its dropout bug
patched out for the run (a diagnostic showing what that bug costs; not how a user runs
it). The notes column reports the seed's bugs where they show in the run: the double
optimizer update of its first graph-mode call, and its always-on 50% LoRA dropout.

Nothing of the seed is part of this repository: point ``--seed-dir`` at a checkout of
it (the ``singa_peft`` example directory, or a SINGA source tree that contains
``examples/singa_peft``)::

    /opt/singa-venv/bin/python benchmarks/singa_seed.py --seed-dir /path/to/singa/examples/singa_peft

Targets (issue 4): accuracy at least the seed's, time per step no worse than the seed's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

BATCH = 64
SEED = 0
TARGETS = ["linear1", "linear2"]
LORA_LR = 0.05
BASE_LR = 0.01
BASE_EPOCHS = 10
SEED_LABEL = "seed (singa_peft)"
SEED_FIXED_LABEL = "seed, dropout bug patched out (diagnostic)"


class SeedCode:
    """The seed's library (``singa_peft``) and its ``MLP`` class, imported from a checkout."""

    def __init__(self, seed_dir: str) -> None:
        root = _find_seed_root(seed_dir)
        self.root = root
        source = os.path.join(root, "src")
        if source not in sys.path:
            sys.path.insert(0, source)
        import singa_peft

        self.peft = singa_peft
        # the seed's examples/ is imported by file: this repository has an `examples` package too
        mlp_path = os.path.join(root, "examples", "model", "mlp.py")
        spec = importlib.util.spec_from_file_location("singa_seed_mlp", mlp_path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.MLP = module.MLP


def _find_seed_root(seed_dir: str) -> str:
    candidates = [seed_dir, os.path.join(seed_dir, "examples", "singa_peft")]
    for root in candidates:
        if os.path.isfile(os.path.join(root, "src", "singa_peft", "__init__.py")) and os.path.isfile(
            os.path.join(root, "examples", "model", "mlp.py")
        ):
            return os.path.abspath(root)
    raise FileNotFoundError(
        f"--seed-dir {seed_dir!r} is not a checkout of SINGA's PEFT example: expected src/singa_peft/ and "
        "examples/model/mlp.py in it (or in its examples/singa_peft/)"
    )


def digits_split() -> tuple:
    """``(x_train, x_test, y_train, y_test)``: digits scaled to [0, 1], float32 / int32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(features, labels, test_size=0.3, random_state=SEED, stratify=labels)


class Placeholders:
    """The fixed input tensors a graph-mode model is recorded with, fed in place.

    Making them also empties the device's graph: a SINGA device holds *one* recorded
    graph, and a model recording in graph mode appends to it, so without the reset each
    run would also replay every earlier run's training step.
    """

    def __init__(self, dev: Any) -> None:
        from singa import tensor

        dev.ResetGraph()
        self.x = tensor.Tensor((BATCH, 64), dev, tensor.float32)
        self.y = tensor.Tensor((BATCH,), dev, tensor.int32)


def train_steps(call: Callable, holders: Placeholders, x: np.ndarray, y: np.ndarray, epochs: int, quiet: bool,
                label: str) -> List[float]:
    """Train through ``call(tx, ty)`` over shuffled full batches; seconds per step."""
    from singa import tensor
    from tqdm import tqdm

    order_rng = np.random.default_rng(SEED)
    steps = len(x) // BATCH
    seconds: List[float] = []
    with tqdm(total=epochs * steps, desc=label, unit="step", leave=False, disable=True if quiet else None) as bar:
        for _ in range(epochs):
            order = order_rng.permutation(len(x))
            for step in range(steps):
                batch = order[step * BATCH : (step + 1) * BATCH]
                started = time.perf_counter()
                holders.x.copy_from_numpy(x[batch])
                holders.y.copy_from_numpy(y[batch])
                _, loss = call(holders.x, holders.y)
                tensor.to_numpy(loss)
                seconds.append(time.perf_counter() - started)
                bar.update(1)
    return seconds


def accuracy(forward: Callable, x: np.ndarray, y: np.ndarray) -> float:
    from singa import tensor

    return float((tensor.to_numpy(forward(tensor.from_numpy(x))).argmax(axis=1) == y).mean())


def base_weights(seed: SeedCode, data: tuple, quiet: bool) -> Dict[str, np.ndarray]:
    """Train the seed's MLP (no PEFT) on digits 0-4; its parameters as numpy."""
    from singa import device, opt, tensor

    x_train, _, y_train, _ = data
    dev = device.get_default_device()
    dev.SetRandSeed(SEED)
    holders = Placeholders(dev)
    net = seed.MLP(in_features=64, perceptron_size=256, num_classes=10)
    net.set_optimizer(opt.SGD(lr=BASE_LR, momentum=0.9))
    net.compile([holders.x], is_train=True, use_graph=True)
    net.train()
    seen = y_train < 5
    step = lambda tx, ty: net(tx, ty, "plain", None)  # noqa: E731
    train_steps(step, holders, x_train[seen], y_train[seen], BASE_EPOCHS, quiet, "base")
    return {name: tensor.to_numpy(t).copy() for name, t in net.get_params().items()}


def fresh_base(seed: SeedCode, weights: Dict[str, np.ndarray], holders: Placeholders) -> Any:
    """The seed's MLP initialised (eager compile) and loaded with the base weights."""
    net = seed.MLP(in_features=64, perceptron_size=256, num_classes=10)
    net.compile([holders.x], is_train=True, use_graph=False)
    for name, t in net.get_params().items():
        t.copy_from_numpy(weights[name])
    return net


def run_seed(seed: SeedCode, weights: Dict[str, np.ndarray], data: tuple, epochs: int, quiet: bool,
             fix_dropout: bool = False) -> Dict[str, Any]:
    """LoRA with the seed's library, the way its ``train.py`` runs it (graph mode).

    With ``fix_dropout`` (a diagnostic, not how a user runs it), ``autograd.dropout`` is
    the identity during the run, which is what the configured ``lora_dropout=0`` means;
    the seed's layer calls ``autograd.dropout(x, 0.0)``, i.e. seed 0 and ratio 0.5.
    """
    from singa import autograd

    if not fix_dropout:
        return _run_seed(seed, weights, data, epochs, quiet)
    original = autograd.dropout
    autograd.dropout = lambda x, seed=0, ratio=0.5: x
    try:
        return _run_seed(seed, weights, data, epochs, quiet)
    finally:
        autograd.dropout = original


def _run_seed(seed: SeedCode, weights: Dict[str, np.ndarray], data: tuple, epochs: int,
              quiet: bool) -> Dict[str, Any]:
    from singa import device, opt

    dev = device.get_default_device()
    holders = Placeholders(dev)
    net = fresh_base(seed, weights, holders)
    dev.SetRandSeed(SEED)
    peft_model = seed.peft.get_peft_model(net, seed.peft.LinearLoraConfig(8, 16, 0.0, TARGETS))
    sgd = opt.SGD(lr=LORA_LR, momentum=0.9)
    peft_model.set_optimizer(sgd)
    peft_model.compile([holders.x], is_train=True, use_graph=True)
    peft_model.train()
    trainable = sum(int(t.size()) for t in net.get_params().values() if t.stores_grad)
    step = lambda tx, ty: peft_model(tx, ty, "plain", None)  # noqa: E731
    result = _train_and_measure(step, sgd, holders, data[0], data[2], epochs, quiet, "seed")
    peft_model.eval()
    return {**result, **_after_training(peft_model.forward, net, weights, data), "trainable": trainable}


def run_peftcore(seed: SeedCode, weights: Dict[str, np.ndarray], data: tuple, epochs: int, quiet: bool,
                 use_graph: bool) -> Dict[str, Any]:
    """LoRA with peftcore on the same model and data."""
    from singa import device, opt

    import peftcore

    dev = device.get_default_device()
    holders = Placeholders(dev)
    net = fresh_base(seed, weights, holders)
    dev.SetRandSeed(SEED)
    config = peftcore.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    peft_model = peftcore.get_peft_model(net, config)
    sgd = opt.SGD(lr=LORA_LR, momentum=0.9)
    net.set_optimizer(sgd)
    net.compile([holders.x], is_train=True, use_graph=use_graph)
    net.train()
    trainable = peft_model.get_nb_trainable_parameters()[0]
    step = lambda tx, ty: net(tx, ty, "plain", None)  # noqa: E731
    label = "peftcore" if use_graph else "peftcore eager"
    result = _train_and_measure(step, sgd, holders, data[0], data[2], epochs, quiet, label)
    net.eval()
    return {**result, **_after_training(net.forward, net, weights, data), "trainable": trainable}


def _train_and_measure(call: Callable, sgd: Any, holders: Placeholders, x_train: np.ndarray, y_train: np.ndarray,
                       epochs: int, quiet: bool, label: str) -> Dict[str, Any]:
    """Train, timing each step; also record how many optimizer updates the first call made."""
    from singa import tensor

    first_steps: Optional[float] = None

    def counted(tx: Any, ty: Any) -> Any:
        nonlocal first_steps
        result = call(tx, ty)
        if first_steps is None:
            first_steps = float(tensor.to_numpy(sgd.step_counter)[0])
        return result

    seconds = train_steps(counted, holders, x_train, y_train, epochs, quiet, label)
    return {"seconds": seconds, "first_call_updates": first_steps}


def _after_training(forward: Callable, net: Any, weights: Dict[str, np.ndarray], data: tuple) -> Dict[str, Any]:
    """Test accuracy, and whether any base weight moved (it must not: the base is frozen)."""
    from singa import tensor

    changed = any(
        not np.array_equal(tensor.to_numpy(t), weights[name]) for name, t in net.get_params().items() if name in weights
    )
    return {"accuracy": accuracy(forward, data[1], data[3]), "base_changed": changed}


def run(seed_dir: str, epochs: int = 5, quiet: bool = False, rounds: int = 3) -> List[Dict[str, Any]]:
    """Run the comparison and return one row per implementation.

    Row keys: ``name``, ``mode``, ``accuracy``, ``ms_per_step`` (median), ``ratio`` (ms
    per step relative to the seed's), ``trainable``, ``first_call_updates`` (optimizer
    steps the first training call applied), ``base_frozen``, ``notes``, and
    ``base_accuracy`` (the base model's, before LoRA).
    """
    from peftcore_singa.compat import import_singa

    import_singa()  # shims first: the seed imports singa itself
    seed = SeedCode(seed_dir)
    data = digits_split()
    weights = base_weights(seed, data, quiet)
    base_net = fresh_base(seed, weights, Placeholders(_default_device()))
    base_net.eval()
    base_accuracy = accuracy(base_net.forward, data[1], data[3])

    runners: Dict[str, Callable[[], Dict[str, Any]]] = {
        SEED_LABEL: lambda: run_seed(seed, weights, data, epochs, quiet),
        "peftcore": lambda: run_peftcore(seed, weights, data, epochs, quiet, use_graph=True),
        "peftcore (eager)": lambda: run_peftcore(seed, weights, data, epochs, quiet, use_graph=False),
        SEED_FIXED_LABEL: lambda: run_seed(seed, weights, data, epochs, quiet, fix_dropout=True),
    }
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in runners}
    names = list(runners)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            results[name].append(runners[name]())
    return _rows(results, base_accuracy)


def _default_device() -> Any:
    from singa import device

    return device.get_default_device()


def _rows(results: Dict[str, List[Dict[str, Any]]], base_accuracy: float) -> List[Dict[str, Any]]:
    rows = []
    for name, runs in results.items():
        steps = [s for r in runs for s in r["seconds"]]
        rows.append({
            "name": name,
            "mode": "eager" if "eager" in name else "graph",
            "accuracy": statistics.median(r["accuracy"] for r in runs),
            "ms_per_step": 1000.0 * statistics.median(steps),
            "trainable": runs[0]["trainable"],
            "first_call_updates": runs[0]["first_call_updates"],
            "base_frozen": not any(r["base_changed"] for r in runs),
            "base_accuracy": base_accuracy,
            "steps": len(steps),
        })
    seed_ms = rows[0]["ms_per_step"]
    for row in rows:
        row["ratio"] = row["ms_per_step"] / seed_ms
        row["notes"] = _notes(row)
    return rows


def _notes(row: Dict[str, Any]) -> str:
    notes = []
    if row["first_call_updates"] and row["first_call_updates"] > 1:
        notes.append(f"first call applied {row['first_call_updates']:.0f} optimizer updates (graph recorded twice)")
    if row["name"] == SEED_LABEL:
        notes.append("LoRA input always 50% dropped and scaled by 0.5 in training (lora_dropout=0 asked)")
    if row["name"] == SEED_FIXED_LABEL:
        notes.append("not how a user runs it: autograd.dropout made the identity, to show what that bug costs")
    if not row["base_frozen"]:
        notes.append("base weights changed")
    return "; ".join(notes)


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| implementation | mode | test accuracy | median ms/step | vs seed | trainable params | base frozen | notes |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['mode']} | {row['accuracy']:.3f} | {row['ms_per_step']:.3f} | "
            f"{row['ratio']:.2f}x | {row['trainable']:,} | {'yes' if row['base_frozen'] else 'no'} | {row['notes']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="LoRA on SINGA: the seed example vs peftcore")
    parser.add_argument("--seed-dir", required=True, help="checkout of SINGA's examples/singa_peft (or a SINGA tree)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per implementation (default 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        from peftcore_singa.compat import import_singa, singa_version

        version = singa_version(import_singa())
    except Exception as exc:
        print(f"skipping: singa is not importable ({type(exc).__name__}: {exc})")
        return 0
    try:
        rows = run(args.seed_dir, epochs=args.epochs, quiet=args.quiet, rounds=args.rounds)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"LoRA r=8 alpha=16 on a 64-256-10 MLP, digits; SGD lr {LORA_LR} momentum 0.9, batch {BATCH}, "
          f"{args.epochs} epochs, {args.rounds} alternating rounds")
    print(f"python {platform.python_version()}, singa {version}, numpy {np.__version__}, "
          f"{platform.machine()} CPU; base model accuracy before LoRA {rows[0]['base_accuracy']:.3f}\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
