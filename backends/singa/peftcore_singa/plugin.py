"""The Apache SINGA backend plugin (entry point ``singa`` in the ``peftcore`` group).

This module imports without SINGA installed: singa and the layer modules are imported
inside the hooks, and :func:`peftcore_backend_info` reports the backend unavailable,
with the reason, when ``import singa`` fails in any way. SINGA 5.x needs two shims on
Python >= 3.10 / numpy >= 1.24, applied before its first import (see
:mod:`peftcore_singa.compat`).

Using it::

    model = MyModel()                          # a singa.model.Model (or layer.Layer)
    peft = get_peft_model(model, LoraConfig(target_modules=["fc1"]), example_inputs=x)
    model.compile([tx], is_train=True, use_graph=False)   # after get_peft_model
    model.train(); out, loss = model(tx, ty)

SINGA specifics a user must know:

* **Lazy layers.** SINGA creates parameters on the first forward. ``describe`` runs one
  eval-mode forward with ``example_inputs`` (numpy arrays or SINGA tensors, one or a
  list) when some layer is not initialised, and raises asking for them otherwise.
* **Graph mode.** With ``compile(..., use_graph=True)`` the first ``train_one_batch``
  records forward, backward and update, and later calls replay that record. Call
  ``get_peft_model`` / ``from_pretrained`` / ``add_adapter`` *before* ``compile`` and the
  first training step. Every later change that alters a training step (set/delete
  adapter, disable_adapter, merge/unmerge, unload, trainable flags) drops the recorded
  graph (:func:`peftcore_singa.apply.invalidate_graph`), so the next step re-records it;
  placeholders fed with ``copy_from_numpy`` keep working. Do not merge in the middle of a
  recorded training run you want to keep replaying.
* **Freezing** sets ``stores_grad = requires_grad = False`` on every frozen tensor (SINGA
  optimizers update every tensor with ``stores_grad`` that backward reaches; they have no
  parameter list). Trainable counts use ``stores_grad``.
* **Names.** Adapter tensors are named ``<layer path>.<tensor>.<adapter>``:
  ``fc1.lora_A.default`` (and ``lora_B``), ``fc1.bitfit_bias.default`` (BitFit),
  ``embed.prompt_embeddings.default`` and ``embed.residual_down_weight.default``... (prompt
  tuning); copies of ``modules_to_save`` are ``<path>.modules_to_save.<adapter>.<attr>``.
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
* **Layouts.** LoRA A/B are exported and imported in the canonical (torch/HF) layout;
  ``layer.Linear`` W ``(in, out)`` is reported as ``(out, in)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from peftcore.hookspecs import BackendInfo, hookimpl

NAME = "singa"
FRAMEWORK = "Apache SINGA"


@hookimpl
def peftcore_backend_info() -> BackendInfo:
    try:
        from peftcore_singa.compat import import_singa, singa_version

        singa = import_singa()
        version = singa_version(singa)
    except Exception as exc:  # any failure (ImportError, numpy ABI errors...) means unavailable
        return BackendInfo(
            NAME, FRAMEWORK, available=False, reason=f"singa is not importable ({type(exc).__name__}: {exc})"
        )
    return BackendInfo(NAME, FRAMEWORK, available=True, version=version, ops=tuple(sorted(_builders())))


@hookimpl
def peftcore_detect(model: Any) -> bool:
    from peftcore_singa.compat import singa_imported

    if not singa_imported():
        return False
    from peftcore_singa.compat import import_singa

    singa = import_singa()
    return isinstance(model, (singa.model.Model, singa.layer.Layer))


def _builders() -> dict:
    from peftcore.plugins import get_plugin_manager
    from peftcore_singa.apply import BUILDERS

    builders = dict(BUILDERS)
    for extra in get_plugin_manager().hook.peftcore_op_builders(backend=NAME):
        builders.update(extra or {})
    return builders


@hookimpl
def peftcore_describe(model: Any, example_inputs: Any) -> Any:
    from peftcore.plugins import get_plugin_manager
    from peftcore_singa.describe import describe_model

    extra: dict = {}
    for kinds in get_plugin_manager().hook.peftcore_layer_kinds(backend=NAME):
        extra.update(kinds or {})
    return describe_model(model, example_inputs, extra)


@hookimpl
def peftcore_apply(model: Any, plan: Any) -> Any:
    from peftcore_singa.apply import apply_plan

    return apply_plan(model, plan, _builders())


@hookimpl
def peftcore_export_adapter(model: Any, adapter_name: str) -> Mapping[str, Any]:
    from peftcore_singa.apply import export_adapter

    return export_adapter(model, adapter_name)


@hookimpl
def peftcore_import_adapter(model: Any, adapter_name: str, tensors: Mapping[str, Any]) -> None:
    from peftcore_singa.apply import import_adapter

    import_adapter(model, adapter_name, tensors)


@hookimpl
def peftcore_set_active_adapters(model: Any, adapter_names: Sequence[str]) -> None:
    from peftcore_singa.apply import set_active

    set_active(model, adapter_names)


@hookimpl
def peftcore_set_adapters_enabled(model: Any, enabled: bool) -> None:
    from peftcore_singa.apply import for_each_layer

    def switch(layer: Any) -> None:
        layer.disabled = not enabled

    for_each_layer(model, switch)


@hookimpl
def peftcore_set_trainable(model: Any, adapter_name: str, trainable: bool) -> None:
    from peftcore_singa.apply import for_each_layer

    for_each_layer(model, lambda layer: layer.set_trainable(adapter_name, trainable))


@hookimpl
def peftcore_delete_adapter(model: Any, adapter_name: str) -> None:
    from peftcore_singa.apply import delete_adapter

    delete_adapter(model, adapter_name)


@hookimpl
def peftcore_merge(model: Any, adapter_names: Sequence[str]) -> None:
    from peftcore_singa.apply import for_each_layer

    for_each_layer(model, lambda layer: layer.merge(list(adapter_names)))


@hookimpl
def peftcore_unmerge(model: Any) -> None:
    from peftcore_singa.apply import for_each_layer

    for_each_layer(model, lambda layer: layer.unmerge())


@hookimpl
def peftcore_unload(model: Any, merge: bool) -> Any:
    from peftcore_singa.apply import unload

    return unload(model, merge)


@hookimpl
def peftcore_bake(model: Any, adapter_name: str) -> None:
    from peftcore_singa.apply import bake

    bake(model, adapter_name)


@hookimpl
def peftcore_adapter_gradients(model: Any, adapter_name: str, loss: Any) -> Mapping[str, Any]:
    from peftcore_singa.apply import adapter_gradients

    return adapter_gradients(model, adapter_name, loss)


@hookimpl
def peftcore_count_parameters(model: Any) -> tuple:
    from peftcore_singa.apply import count_parameters

    return count_parameters(model)


@hookimpl
def peftcore_build_toy_model(spec: Any, weights: Mapping[str, Any]) -> Any:
    from peftcore_singa.toys import build_toy

    return build_toy(spec, weights)


@hookimpl
def peftcore_toy_forward(model: Any, inputs: Any) -> Any:
    from peftcore_singa.toys import toy_forward

    return toy_forward(model, inputs)
