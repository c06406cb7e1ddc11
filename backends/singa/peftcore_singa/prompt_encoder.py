"""P-tuning's prompt encoder on SINGA: Hugging Face PEFT's MLP and LSTM heads.

The encoder's tensors follow HF PEFT's module names and torch's layout, so they export
and import without conversion (``embedding.weight`` ``(n, d)``; ``mlp_head.<i>.weight``
``(out, in)``; ``lstm_head.weight_ih_l<k>[_reverse]`` ``(4h, in)`` with torch's gate
order input, forget, cell, output). Canonical name ``encoder.<module name>`` is stored in
the adapter layer as tensor ``<path>.encoder.<module name>.<adapter>``.

- ``"mlp"``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``.
- ``"lstm"``: a bidirectional LSTM of ``encoder_num_layers`` layers (dropout
  ``encoder_dropout`` between layers while training, as ``torch.nn.LSTM``), then
  ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``.

SINGA's own ``layer.LSTM`` cannot express this head: on CPU it is one unidirectional
layer (it stores ``num_layers`` and ``bidirectional`` but ignores them), and
``layer.CudnnRNN`` needs CUDA. So the LSTM is composed here, step by step, from
``singa.autograd`` ops (``cat``, ``sigmoid``, ``tanh``, ``mul``, ``add``) and two small
operators below: :class:`TorchLinear` (a torch-layout weight; SINGA's matmul takes
``x @ w``) and :class:`Chunks` (``autograd.split`` fails in backward when one piece,
such as the first step's forget gate, is unused); its gradients are checked against finite
differences in the tests. The initial values follow torch's defaults (a unit normal
embedding, uniform linear and LSTM tensors within ``1/sqrt(fan_in)``, ``1/sqrt(h)``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, singa_wrap  # noqa: E402

from peftcore.methods.prompt_tuning import AddPrompt  # noqa: E402
from peftcore_singa.lora import lora_dropout  # noqa: E402

#: The canonical names of an encoder's tensors start with this.
ENCODER_PREFIX = "encoder."


class TorchLinear(autograd.Operator):
    """``x @ w^T`` for 2-D ``x`` ``(n, in)`` and a torch-layout weight ``w`` ``(out, in)``."""

    def forward(self, x: Any, w: Any) -> Any:
        if autograd.training:
            self.inputs = (x, w)
        return singa_wrap.Mult(x, singa_wrap.Transpose(w, [1, 0]))

    def backward(self, dy: Any) -> tuple:
        x, w = self.inputs
        return singa_wrap.Mult(dy, w), singa_wrap.Mult(singa_wrap.Transpose(dy, [1, 0]), x)


class Chunks(autograd.Operator):
    """``x`` cut along ``axis`` into pieces of ``sizes``. Unlike ``autograd.split``, an
    unused piece (the forget gate of an LSTM's first step) gets a zero gradient."""

    def __init__(self, axis: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.axis = axis
        self.sizes = [int(s) for s in sizes]

    def forward(self, x: Any) -> tuple:
        if autograd.training:
            self.like = (list(x.shape()), x.device(), x.data_type())
        pieces, start = [], 0
        for size in self.sizes:
            pieces.append(singa_wrap.SliceOn(x, start, start + size, self.axis))
            start += size
        return tuple(pieces)

    def backward(self, *dys: Any) -> Any:
        shape, device, dtype = self.like
        filled = []
        for size, dy in zip(self.sizes, dys):
            if dy is None:
                dy = singa_wrap.Tensor(shape[: self.axis] + [size] + shape[self.axis + 1 :], device, dtype)
                dy.SetFloatValue(0.0)
            filled.append(dy)
        return singa_wrap.ConcatOn(singa_wrap.VecTensor(filled), self.axis)


def chunks(x: Any, axis: int, sizes: Sequence[int]) -> list[Any]:
    """The pieces of ``x`` along ``axis`` (see :class:`Chunks`); ``x`` itself for one piece."""
    return [x] if len(sizes) == 1 else list(Chunks(axis, sizes)(x))


def linear(x: Any, weight: Any, bias: Any) -> Any:
    """torch's ``F.linear``: ``x @ weight^T + bias`` for 2-D ``x``."""
    return autograd.add(TorchLinear()(x, weight)[0], bias)


class PromptEncoder:
    """One adapter's P-tuning encoder: its tensors (by HF module name) and its forward."""

    def __init__(self, op: AddPrompt, new_tensor: Callable[[Sequence[int], str], Any]) -> None:
        """``new_tensor(shape, module name)`` makes one trainable tensor of the encoder."""
        self.kind = op.encoder
        self.num_layers = int(op.encoder_num_layers)
        self.dropout = float(op.encoder_dropout)
        self.tensors: dict[str, Any] = {}
        shapes = op.encoder_shapes()
        for name, shape in shapes.items():
            t = new_tensor(shape, name)
            if name == "embedding.weight":
                t.gaussian(0.0, 1.0)  # torch's nn.Embedding
            else:  # torch's nn.Linear and nn.LSTM: uniform within 1/sqrt(fan_in), 1/sqrt(h)
                weight = shapes[name.rsplit(".", 1)[0] + ".weight"] if name.startswith("mlp_head") else None
                bound = 1.0 / math.sqrt(weight[1] if weight else op.encoder_hidden)
                t.uniform(-bound, bound)
            self.tensors[name] = t

    def __call__(self) -> Any:
        """The encoder's output, ``(rows, token_dim)`` (dropout only while training)."""
        t = self.tensors
        x = t["embedding.weight"]
        if self.kind == "lstm":
            for index in range(self.num_layers):
                if index:
                    x = lora_dropout(x, self.dropout)  # torch.nn.LSTM: between layers only
                x = autograd.cat([self._direction(x, index, ""), self._direction(x, index, "_reverse")], axis=1)
            return linear(autograd.relu(linear(x, t["mlp_head.0.weight"], t["mlp_head.0.bias"])), t["mlp_head.2.weight"], t["mlp_head.2.bias"])
        hidden = autograd.relu(linear(x, t["mlp_head.0.weight"], t["mlp_head.0.bias"]))
        hidden = autograd.relu(linear(hidden, t["mlp_head.2.weight"], t["mlp_head.2.bias"]))
        return linear(hidden, t["mlp_head.4.weight"], t["mlp_head.4.bias"])

    def _direction(self, x: Any, index: int, suffix: str) -> Any:
        """One direction of LSTM layer ``index`` over the rows of ``x``: ``(n, h)``, the
        hidden state at each position (``_reverse`` runs from the last row to the first)."""
        t = self.tensors
        w_hh = t[f"lstm_head.weight_hh_l{index}{suffix}"]
        size = int(w_hh.shape[1])
        n = int(x.shape[0])
        # x's part of every step at once; both biases folded in (torch adds both)
        bias = autograd.add(t[f"lstm_head.bias_ih_l{index}{suffix}"], t[f"lstm_head.bias_hh_l{index}{suffix}"])
        inputs = linear(x, t[f"lstm_head.weight_ih_l{index}{suffix}"], bias)
        rows = chunks(inputs, 0, [1] * n)
        order = range(n - 1, -1, -1) if suffix else range(n)
        outputs: list[Any] = [None] * n
        h = c = None
        for step in order:
            gates = rows[step] if h is None else autograd.add(rows[step], TorchLinear()(h, w_hh)[0])
            i, f, g, o = chunks(gates, 1, [size] * 4)  # torch's order
            i, f, g, o = autograd.sigmoid(i), autograd.sigmoid(f), autograd.tanh(g), autograd.sigmoid(o)
            c = autograd.mul(i, g) if c is None else autograd.add(autograd.mul(f, c), autograd.mul(i, g))
            h = autograd.mul(o, autograd.tanh(c))
            outputs[step] = h
        return autograd.cat(outputs, axis=0) if n > 1 else outputs[0]
