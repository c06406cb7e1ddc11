"""Let ``transformers.Trainer`` treat a peftcore torch PeftModel as it treats HF PEFT's.

``Trainer`` decides how to save and resume a model by asking whether it is a PEFT
model: ``transformers.trainer_utils._is_peft_model`` (re-imported by name in
``transformers.trainer`` and ``transformers.integrations.neftune``), and, when saving,
an ``isinstance`` check against ``peft.PeftModel`` (the name ``PeftModel`` in
``transformers.trainer``). Both know only HF PEFT's classes, so a peftcore model would
be saved as a full ``model.safetensors`` state dict.

:func:`enable_trainer_integration` widens those checks to include peftcore's
:class:`peftcore.peft_model.PeftModel` (every torch PeftModel is one). Trainer then calls our
``save_pretrained`` for checkpoints and ``save_model()`` (adapter files only), reads
the model's forward signature through ``get_base_model()`` (``remove_unused_columns``),
and resumes through ``load_adapter``. HF PEFT's own models are still recognised. The
shell calls it when it wraps a model while ``transformers`` is imported, so users need
no extra code; calling it again does nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from peftcore.peft_model import PeftModel

_MARK = "__peftcore_wrapped__"
_MODULES_WITH_CHECK = ("transformers.trainer_utils", "transformers.trainer", "transformers.integrations.neftune")


def _widen(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def _is_peft_model(model: Any) -> bool:
        return isinstance(model, PeftModel) or bool(original(model))

    setattr(_is_peft_model, _MARK, True)
    _is_peft_model.__doc__ = original.__doc__
    return _is_peft_model


def enable_trainer_integration() -> bool:
    """Make ``transformers.Trainer`` save and resume peftcore models as adapters.

    Returns False (and changes nothing) when ``transformers`` is not installed.
    """
    try:
        import transformers.trainer as trainer_module
    except ImportError:
        return False
    for module_name in _MODULES_WITH_CHECK:
        module: Any = sys.modules.get(module_name)
        if module is None:
            try:
                __import__(module_name)
            except ImportError:
                continue
            module = sys.modules[module_name]
        check = getattr(module, "_is_peft_model", None)
        if check is not None and not getattr(check, _MARK, False):
            module._is_peft_model = _widen(check)

    # ``Trainer._save`` calls ``save_pretrained`` on instances of (PreTrainedModel, PeftModel)
    patched: Any = trainer_module
    known: Any = getattr(trainer_module, "PeftModel", None)
    if known is None:
        patched.PeftModel = PeftModel
        # peft is not installed: Trainer only looks at ``PeftModel`` when it thinks it is
        available = trainer_module.is_peft_available
        if not getattr(available, _MARK, False):
            def is_peft_available() -> bool:
                return True

            setattr(is_peft_available, _MARK, True)
            patched.is_peft_available = is_peft_available
    elif isinstance(known, tuple):
        if PeftModel not in known:
            patched.PeftModel = (*known, PeftModel)
    elif known is not PeftModel:
        patched.PeftModel = (known, PeftModel)
    return True


def enable_if_transformers_loaded() -> None:
    """Call :func:`enable_trainer_integration` when the program already uses transformers
    (never imports it otherwise)."""
    if "transformers" in sys.modules:
        enable_trainer_integration()
