"""Prompt tuning on SINGA models that cannot take the positions it adds: a peftcore error
before the forward, not a SINGA abort of the interpreter.

The models are written here in the shape of SINGA's ``examples/trans`` encoder (its
position table looked up with the raw input ids, so it has ``seq`` positions where the
prompted embedding has ``seq + n``) and of a model with a learned position table of fixed
length. The abort-prone cases run in a child interpreter, so a regression shows up as a
failed test rather than a dead test session.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.subprocess_env import child_env

MODELS = '''
import numpy as np
from peftcore_singa.compat import import_singa
import_singa()
from singa import autograd, device, layer, model, tensor


class TransEncoder(model.Model):
    """Word embedding plus a position embedding looked up with the input ids themselves
    (as SINGA's examples/trans does), then a classifier head."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.input_emb = layer.Embedding(vocab, dim)
        self.pos_emb = layer.Embedding(vocab, dim)
        self.head = layer.Linear(classes)

    def forward(self, ids):
        x = autograd.add(self.input_emb(ids), self.pos_emb(ids))
        return self.head(autograd.reduce_mean(x, axes=[1], keepdims=0))

    def train_one_batch(self, ids, y):
        out = self.forward(ids)
        loss = autograd.softmax_cross_entropy(out, y)
        self.optimizer(loss)
        return out, loss


class LearnedPositions(model.Model):
    """Positions 0..len-1 of the embedded sequence, from a table of max_len rows."""

    def __init__(self, vocab=20, dim=8, max_len=8, classes=3):
        super().__init__()
        self.tokens = layer.Embedding(vocab, dim)
        self.positions = layer.Embedding(max_len, dim)
        self.head = layer.Linear(classes)

    def forward(self, ids):
        x = self.tokens(ids)
        batch, length = x.shape[0], x.shape[1]
        pos = tensor.Tensor((batch, length), x.device, tensor.int32, requires_grad=False, stores_grad=False)
        pos.copy_from_numpy(np.tile(np.arange(length, dtype=np.int32), (batch, 1)))
        x = autograd.add(x, self.positions(pos))
        return self.head(autograd.reduce_mean(x, axes=[1], keepdims=0))


def ids_tensor(array):
    t = tensor.Tensor(array.shape, device.get_default_device(), tensor.int32, requires_grad=False, stores_grad=False)
    t.copy_from_numpy(array.astype(np.int32))
    return t
'''


def _child(body: str) -> str:
    code = MODELS + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("call", ["eval", "train"])
def test_positions_sized_from_the_input_give_a_peftcore_error(sg: object, call: str) -> None:
    out = _child(
        f"""
        import peftcore
        from peftcore.errors import AdapterError
        from singa import opt
        net = TransEncoder()
        ids = np.arange(10).reshape(2, 5) % 20
        peft_model = peftcore.get_peft_model(net, peftcore.PromptTuningConfig(num_virtual_tokens=3), example_inputs=ids)
        peft_model.set_optimizer(opt.SGD(lr=0.1))
        peft_model.graph(False)
        try:
            if {call!r} == "eval":
                peft_model.eval()
                peft_model(ids_tensor(ids))
            else:
                peft_model.train()
                labels = tensor.Tensor((2, 3), device.get_default_device())
                labels.copy_from_numpy(np.eye(3, dtype=np.float32)[[0, 1]])
                peft_model(ids_tensor(ids), labels)
            print("NO ERROR")
        except AdapterError as exc:
            print("ERROR", str(exc).replace("\\n", " "))
        """
    )
    assert out.startswith("ERROR"), out
    assert "3 virtual tokens at 'input_emb'" in out and "add of tensors shaped (2, 8, 8) and (2, 5, 8)" in out
    assert "examples/trans" in out


def test_a_position_table_too_short_gives_a_peftcore_error(sg: object) -> None:
    out = _child(
        """
        import peftcore
        from peftcore.errors import AdapterError
        net = LearnedPositions(max_len=8)
        ids = np.ones((2, 6), np.int32)
        peft_model = peftcore.get_peft_model(
            net, peftcore.PromptTuningConfig(num_virtual_tokens=4, embedding_layer="tokens"), example_inputs=ids
        )
        peft_model.eval()
        try:
            peft_model(ids_tensor(ids))
            print("NO ERROR")
        except AdapterError as exc:
            print("ERROR", str(exc).replace("\\n", " "))
        """
    )
    assert out.startswith("ERROR") and "index 9 in a table of 8 rows" in out, out


def test_a_long_enough_position_table_takes_the_prompt(sg: object) -> None:
    """The check passes a model that counts the virtual tokens; the prompt trains."""
    out = _child(
        """
        import peftcore
        from singa import opt
        net = LearnedPositions(max_len=16)
        ids = np.ones((2, 6), np.int32)
        peft_model = peftcore.get_peft_model(
            net, peftcore.PromptTuningConfig(num_virtual_tokens=4, embedding_layer="tokens"), example_inputs=ids
        )
        peft_model.eval()
        before = tensor.to_numpy(peft_model(ids_tensor(ids))).copy()
        prompt = peft_model.get_params()["tokens.prompt_embeddings.default"]
        start = tensor.to_numpy(prompt).copy()
        sgd = opt.SGD(lr=0.5)
        autograd.training = True
        out = peft_model.forward(ids_tensor(ids))
        target = tensor.Tensor((2, 3), device.get_default_device())
        target.copy_from_numpy(np.eye(3, dtype=np.float32)[[0, 2]])
        sgd(autograd.softmax_cross_entropy(out, target))
        print(before.shape, bool(np.abs(tensor.to_numpy(prompt) - start).max() > 0))
        """
    )
    assert out == "(2, 3) True", out


def test_the_check_runs_once_per_input_shape(sg: object) -> None:
    """A model that fits is probed once per adapter set and input shape, not every call."""

    import peftcore
    from peftcore_singa import prompt_fit

    namespace: dict = {}
    exec(MODELS, namespace)
    net = namespace["LearnedPositions"](max_len=16)
    ids = np.ones((2, 6), np.int32)
    peft_model = peftcore.get_peft_model(
        net, peftcore.PromptTuningConfig(num_virtual_tokens=4, embedding_layer="tokens"), example_inputs=ids
    )
    calls = []
    original = prompt_fit.check_prompt_fits

    def counting(*args: object) -> None:
        calls.append(args)
        original(*args)  # type: ignore[arg-type]

    import peftcore_singa.peft_model as shell

    shell.check_prompt_fits = counting  # type: ignore[assignment]
    try:
        peft_model.eval()
        for _ in range(3):
            peft_model(namespace["ids_tensor"](ids))
        peft_model(namespace["ids_tensor"](np.ones((2, 4), np.int32)))
        peft_model(namespace["ids_tensor"](ids))  # a shape seen before: not probed again
    finally:
        shell.check_prompt_fits = original  # type: ignore[assignment]
    assert len(calls) == 2
