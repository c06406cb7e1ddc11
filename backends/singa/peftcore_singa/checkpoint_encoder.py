"""P-tuning's prompt, computed with numpy from the encoder tensors of a SINGA checkpoint.

A SINGA model trained with P-tuning keeps only the encoder (``<path>.encoder.<module
name>.<adapter>``, HF PEFT's module names in torch's layout); the prompt that HF PEFT
saves, ``prompt_embeddings``, is the encoder's output. :func:`encoder_prompt` computes it
(eval mode: no dropout) so ``peftcore convert`` can write a complete adapter from a
``save_states`` zip. Like :mod:`peftcore_singa.checkpoint`, this imports no SINGA.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from peftcore.errors import AdapterError


def encoder_kind(names: Mapping[str, object]) -> str:
    """``"lstm"`` or ``"mlp"``, from the encoder's tensor names."""
    return "lstm" if any(name.startswith("lstm_head.") for name in names) else "mlp"


def encoder_prompt(tensors: Mapping[str, np.ndarray], where: str) -> np.ndarray:
    """The encoder's output ``(rows, token_dim)``, float32; ``tensors`` by module name
    (``embedding.weight``, ``mlp_head.0.weight``, ``lstm_head.weight_ih_l0``...)."""
    t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}

    def get(name: str) -> np.ndarray:
        if name not in t:
            raise AdapterError(f"{where}: the prompt encoder has no tensor {name!r}")
        return t[name]

    def linear(name: str, x: np.ndarray) -> np.ndarray:
        return x @ get(f"{name}.weight").T + get(f"{name}.bias")

    x = get("embedding.weight")
    if encoder_kind(t) == "lstm":
        layer = 0
        while f"lstm_head.weight_ih_l{layer}" in t:
            x = np.concatenate([_lstm(t, x, layer, ""), _lstm(t, x, layer, "_reverse")], axis=1)
            layer += 1
        return linear("mlp_head.2", np.maximum(linear("mlp_head.0", x), 0.0)).astype(np.float32)
    hidden = np.maximum(linear("mlp_head.2", np.maximum(linear("mlp_head.0", x), 0.0)), 0.0)
    return linear("mlp_head.4", hidden).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lstm(t: Mapping[str, np.ndarray], x: np.ndarray, layer: int, suffix: str) -> np.ndarray:
    """One direction of one LSTM layer over the rows of ``x`` (torch's gate order i, f, g, o)."""
    w_ih, w_hh = t[f"lstm_head.weight_ih_l{layer}{suffix}"], t[f"lstm_head.weight_hh_l{layer}{suffix}"]
    bias = t[f"lstm_head.bias_ih_l{layer}{suffix}"] + t[f"lstm_head.bias_hh_l{layer}{suffix}"]
    size = w_hh.shape[1]
    h, c = np.zeros(size), np.zeros(size)
    out = np.zeros((len(x), size))
    for step in (range(len(x) - 1, -1, -1) if suffix else range(len(x))):
        i, f, g, o = np.split(w_ih @ x[step] + w_hh @ h + bias, 4)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[step] = h
    return out
