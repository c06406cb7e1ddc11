"""The public entry point :func:`get_peft_model`."""

from __future__ import annotations

from typing import Any, Optional

from peftcore.config import PeftConfig
from peftcore.errors import ConfigError
from peftcore.io import DEFAULT_ADAPTER, check_adapter_name
from peftcore.peft_model import PeftModel, wrap_model
from peftcore.plugins import get_plugin_manager

__all__ = ["PeftModel", "get_peft_model"]


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
    different methods already. ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` are
    accepted (the backend chooses the adapter dtype; adapters are built at once).
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
    peft_model = wrap_model(model, chosen, example_inputs)
    peft_model.add_adapter(adapter_name, config)
    return peft_model


