"""The Apache SINGA backend plugin (entry point ``singa`` in the ``peftcore`` group).

This module imports without SINGA installed: singa and the layer modules are imported
inside the hooks, and :func:`peftcore_backend` reports the backend unavailable,
with the reason, when ``import singa`` fails in any way. SINGA 5.x needs two shims on
Python >= 3.10 / numpy >= 1.24, applied before its first import (see
:mod:`peftcore_singa.compat`).

Using it::

    model = MyModel()                          # a singa.model.Model (or layer.Layer)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["fc1"]))   # a singa Model
    peft_model.set_optimizer(sgd)
    peft_model.compile([tx], is_train=True, use_graph=False)   # adapters built here
    peft_model.train(); out, loss = peft_model(tx, ty)     # your model's train_one_batch

SINGA specifics a user must know:

* **Lazy layers.** SINGA creates parameters on the first forward. ``describe`` runs one
  eval-mode forward with ``example_inputs`` (numpy arrays or SINGA tensors, one or a
  list) when some layer is not initialised, and returns None without them: the
  :class:`~peftcore_singa.peft_model.SingaPeftModel` then keeps the adapters pending and
  builds them when SINGA initialises the layers (``compile`` or the first forward).
* **Graph mode.** With ``compile(..., use_graph=True)`` the first ``train_one_batch``
  records forward, backward and update, and later calls replay that record. Call
  ``get_peft_model`` / ``from_pretrained`` / ``add_adapter`` *before* ``compile`` and the
  first training step. Every later change that alters a training step (set/delete
  adapter, disable_adapter, merge/unmerge, unload, trainable flags) drops the recorded
  graph (:meth:`peftcore_singa.runtime.SingaRuntime.model_changed`), so the next step re-records it;
  placeholders fed with ``copy_from_numpy`` keep working. Do not merge in the middle of a
  recorded training run you want to keep replaying.
* **Freezing** sets ``stores_grad = requires_grad = False`` on every frozen tensor (SINGA
  optimizers update every tensor with ``stores_grad`` that backward reaches; they have no
  parameter list). Trainable counts use ``stores_grad``.
* **Names.** Adapter tensors are named ``<layer path>.<tensor>.<adapter>``:
  ``fc1.lora_A.default`` (and ``lora_B``), ``fc1.bitfit_bias.default`` (BitFit),
  ``embed.prompt_embeddings.default`` and ``embed.residual_down_weight.default``... (prompt
  tuning), ``embed.encoder.mlp_head.0.weight.default``... (P-tuning's encoder); copies of ``modules_to_save`` are ``<path>.modules_to_save.<adapter>.<attr>``.
  They appear in ``get_params()`` / ``get_states()`` / ``save_states()``; base tensors keep
  their names (``fc1.W``), so plain-model checkpoints still load.
* **Prompt tuning** wraps the input ``layer.Embedding`` (the first one the model's
  forward calls, found with ``example_inputs`` when there are several, or set
  ``embedding_layer``) and prepends the virtual tokens to its ``(batch, seq, dim)``
  output: the layers after it must accept ``seq + num_virtual_tokens`` positions.
  SINGA's own embedding op copies the indices to the host inside forward, which aborts
  the process while a graph records: a model with a ``layer.Embedding`` cannot go
  through ``compile`` or train in graph mode (with or without peftcore). Train it
  eagerly and give ``example_inputs`` so its layers get initialised.
* **P-tuning** (MLP or LSTM encoder) sits where prompt tuning does. Prefix tuning and
  UniPELT are refused with the reason (:mod:`peftcore_singa.limitations`): SINGA's core
  has no attention layer.
* **Layouts.** LoRA A/B are exported and imported in the canonical (torch/HF) layout;
  ``layer.Linear`` W ``(in, out)`` is reported as ``(out, in)``.
"""

from __future__ import annotations

from typing import Any

from peftcore.hookspecs import hookimpl
from peftcore.runtime import BackendRuntime, UnavailableRuntime

NAME = "singa"
FRAMEWORK = "Apache SINGA"


@hookimpl
def peftcore_backend() -> BackendRuntime:
    try:
        from peftcore_singa.compat import import_singa, singa_version

        version = singa_version(import_singa())
        from peftcore_singa.runtime import SingaRuntime
    except Exception as exc:  # any failure (ImportError, numpy ABI errors...) means unavailable
        return UnavailableRuntime(NAME, FRAMEWORK, f"singa is not importable ({type(exc).__name__}: {exc})")
    return SingaRuntime(version)


@hookimpl
def peftcore_backend_modules() -> list[str]:
    # a model of this backend has a class from these modules; others are not asked about
    # (so picking a backend for another framework's model does not import this one's)
    return ["singa"]


@hookimpl
def peftcore_conformance_kit(backend: str) -> Any:
    if backend != NAME:
        return None
    from peftcore_singa.toys import SingaToyKit

    return SingaToyKit()


@hookimpl
def peftcore_checkpoint_formats() -> Any:
    from peftcore_singa.checkpoint import SingaCheckpointFormat

    return [SingaCheckpointFormat()]
