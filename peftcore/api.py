"""The public entry point :func:`get_peft_model`."""

from __future__ import annotations

from typing import Any, Optional

from peftcore.config import PeftConfig
from peftcore.errors import ConfigError
from peftcore.io import DEFAULT_ADAPTER, check_adapter_name
from peftcore.peft_model import PeftModel, wrap_model
from peftcore.plugins import get_plugin_manager

__all__ = ["PeftModel", "get_peft_model", "inject_adapter_in_model"]


def get_peft_model(
    model: Any,
    config: PeftConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    backend: Optional[str] = None,
    example_inputs: Any = None,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``config``; the model is changed in place.

    The backend is ``backend`` if given, else ``config.backend``, else the
    ``PEFTCORE_BACKEND`` environment variable, else the one that recognises the model.
    ``example_inputs`` is passed to backends whose layers only know their shapes after
    a forward pass (SINGA).

    Hugging Face PEFT's arguments: ``mixed=True`` (a ``PeftMixedModel`` of several
    methods) is refused with a :class:`ConfigError`; peftcore models hold adapters of
    different methods already. ``autocast_adapter_dtype`` (keep adapters of a
    half-precision model in float32) and ``low_cpu_mem_usage`` (adapter tensors on no
    device until loaded) are HF PEFT's; see :meth:`PeftModel.add_adapter`.
    ``revision`` names a hub revision and changes nothing here. As in HF PEFT, the config's
    ``base_model_name_or_path`` is filled from the model's ``name_or_path`` when unset.
    """
    if not isinstance(config, PeftConfig):
        raise ConfigError(f"config must be a peftcore PeftConfig, got {type(config).__name__}")
    if mixed:
        raise ConfigError(
            "mixed=True (HF PEFT's PeftMixedModel) is not supported; a peftcore PeftModel can hold adapters of "
            "different methods: add them with add_adapter() and activate several with set_adapter([...])"
        )
    name_or_path = getattr(model, "name_or_path", None)
    if config.base_model_name_or_path is None and isinstance(name_or_path, str) and name_or_path:
        config = config.replace(base_model_name_or_path=name_or_path)
    check_adapter_name(adapter_name)
    chosen = get_plugin_manager().select_backend(model, backend=backend, config=config)
    peft_model = wrap_model(model, chosen, example_inputs, task_type=config.task_type)
    peft_model.add_adapter(
        adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
    )
    return peft_model




def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: Any,
    adapter_name: str = DEFAULT_ADAPTER,
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[Any] = None,
) -> Any:
    """Add an adapter's layers to ``model`` in place and return the model itself, not a
    PeftModel (HF PEFT's low-level API). The adapter is active and trainable; switching,
    merging and saving need :func:`get_peft_model`. ``low_cpu_mem_usage`` leaves the
    adapter's tensors without storage until they are loaded (see
    :meth:`PeftModel.add_adapter`). HF PEFT's ``state_dict`` (targets read from a
    checkpoint's keys) is refused: name the layers in ``target_modules``.
    """
    if state_dict is not None:
        raise ConfigError(
            "inject_adapter_in_model(state_dict=...) is not supported: peftcore targets layers from the config; "
            "set target_modules (or load the checkpoint with PeftModel.from_pretrained)"
        )
    peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return peft_model.get_base_model()
