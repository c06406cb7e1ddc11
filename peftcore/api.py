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
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``config``; the model is changed in place.

    The backend is ``backend`` if given, else ``config.backend``, else the
    ``PEFTCORE_BACKEND`` environment variable, else the one that recognises the model.
    ``example_inputs`` is passed to backends whose layers only know their shapes after
    a forward pass (SINGA).
    """
    if not isinstance(config, PeftConfig):
        raise ConfigError(f"config must be a peftcore PeftConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    chosen = get_plugin_manager().select_backend(model, backend=backend, config=config)
    peft_model = wrap_model(model, chosen, example_inputs)
    peft_model.add_adapter(adapter_name, config)
    return peft_model


