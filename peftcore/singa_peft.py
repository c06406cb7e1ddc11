"""The names of SINGA's PEFT example (the "seed", ``examples/singa_peft``), with its signatures.

A script written for the seed runs on peftcore with one change, its import::

    # from singa_peft import LinearLoraConfig, get_peft_model
    from peftcore.singa_peft import LinearLoraConfig, get_peft_model

    config = LinearLoraConfig(8, 1, 0., ["linear1", "linear2"])   # the seed's positional order
    peft_model = get_peft_model(model, config)                     # peftcore's SINGA PeftModel
    ...
    peft_model.merge_weights(mode=True)

Each name is a thin mapping onto peftcore's own objects (this module imports no framework):

* :class:`LinearLoraConfig` ``(r=8, lora_alpha=1, lora_dropout=0., target_layers=None)``
  is a :class:`peftcore.LoraConfig` (``target_layers`` is ``target_modules``), so it plans,
  saves and loads as any LoRA config does (the seed's default ``lora_alpha=1`` kept).
* :func:`get_peft_model` ``(base_model, peft_config)`` is :func:`peftcore.get_peft_model`
  for a peftcore config, and runs a registered :class:`BaseTuner` for a seed-style
  :class:`PeftConfig`.
* :class:`PeftRegistry` ``.register(name)`` registers a peftcore config class as a method
  (:meth:`peftcore.PeftRegistry.register`) or a :class:`BaseTuner` subclass, as the seed
  did; ``get_tuner(name)`` returns the tuner.
* :class:`BaseTuner` keeps the seed's ``inject(base_model)``, ``merge_weights(base_model,
  mode)`` and ``freeze_base_parameters``; :class:`LinearLoraTuner` (``"linear_lora"``) is
  peftcore's LoRA behind them, ``merge_weights(mode=True/False)`` being
  ``merge_adapter()`` / ``unmerge_adapter()``.
* ``PeftModel`` is :class:`peftcore.PeftModel` (the SINGA shell is a ``singa.model.Model``).

The seed's own ``examples/train.py`` reads ``args.precision``, which its argument parser
never defines, so that script stops with ``AttributeError`` before training; the calls it
makes work here as written.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Optional, Sequence

from peftcore.api import get_peft_model as _peftcore_get_peft_model
from peftcore.config import PeftConfig as _CoreConfig
from peftcore.errors import ConfigError, UnknownMethodError, did_you_mean
from peftcore.methods.lora import LoraConfig
from peftcore.peft_model import PeftModel
from peftcore.plugins import get_plugin_manager
from peftcore.registry import PeftRegistry as _CoreRegistry

__all__ = [
    "BaseTuner",
    "LinearLoraConfig",
    "LinearLoraTuner",
    "PeftConfig",
    "PeftModel",
    "PeftRegistry",
    "get_peft_model",
]


class PeftConfig(abc.ABC):  # noqa: B024  # abstract only so peftcore's configs count as instances
    """The seed's config base: ``PeftConfig(peft_type, freeze_base_model=True)``.

    Subclass it for a tuner of your own (registered with :meth:`PeftRegistry.register`).
    peftcore's configs (:class:`LinearLoraConfig` too) are instances of it as well.
    """

    def __init__(self, peft_type: str, freeze_base_model: bool = True) -> None:
        self.peft_type = peft_type
        self.freeze_base_model = freeze_base_model


PeftConfig.register(_CoreConfig)


class LinearLoraConfig(LoraConfig):
    """The seed's ``LinearLoraConfig(r=8, lora_alpha=1, lora_dropout=0, target_layers=None)``,
    positional as in the seed; a :class:`peftcore.LoraConfig` with ``target_modules=target_layers``.

    Any other LoRA field may be given by keyword (``use_rslora=True``...).
    """

    #: the seed's flag; LoRA always freezes the base model
    freeze_base_model: ClassVar[bool] = True

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        target_layers: Optional[Sequence[str]] = None,
        **lora_fields: Any,
    ) -> None:
        if target_layers is not None:
            if "target_modules" in lora_fields:
                raise ConfigError("give target_layers (the seed's name) or target_modules, not both")
            if isinstance(target_layers, str):
                raise ConfigError(f"target_layers must be a list of layer names, got the string {target_layers!r}")
            lora_fields["target_modules"] = list(target_layers)
        LoraConfig.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), **lora_fields)

    @property
    def target_layers(self) -> Any:
        """The seed's name for ``target_modules``."""
        return self.target_modules


class BaseTuner(abc.ABC):
    """The seed's tuner base: ``inject(base_model)`` puts the method into the model and
    ``merge_weights(base_model, mode)`` merges (``mode=True``) or unmerges it."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @abc.abstractmethod
    def inject(self, base_model: Any) -> Any:
        """Put the method into ``base_model``; return the model to train."""

    @abc.abstractmethod
    def merge_weights(self, base_model: Any, mode: bool = True) -> Any:
        """Merge the method into the weights (``mode=True``) or take it out again."""

    @staticmethod
    def freeze_base_parameters(base_model: Any) -> None:
        """Freeze every parameter of ``base_model`` through its backend (on SINGA:
        ``stores_grad = requires_grad = False`` on every tensor of an initialised layer)."""
        runtime = get_plugin_manager().select_backend(base_model).runtime
        for t in runtime.parameters(base_model):
            runtime.set_trainable(t, False)


class PeftRegistry:
    """The seed's registry: ``@PeftRegistry.register(name)`` and ``PeftRegistry.get_tuner(name)``.

    ``register`` takes a :class:`BaseTuner` subclass (as in the seed) or a peftcore config
    class, which becomes a peftcore method (``peftcore.PeftRegistry.register``)."""

    _tuners: ClassVar[dict[str, type[BaseTuner]]] = {}

    @classmethod
    def register(cls, tuner_name: str) -> Any:
        def decorator(tuner_class: Any) -> Any:
            if isinstance(tuner_class, type) and issubclass(tuner_class, _CoreConfig):
                return _CoreRegistry.register(tuner_name)(tuner_class)
            if not (isinstance(tuner_class, type) and issubclass(tuner_class, BaseTuner)):
                raise ConfigError(
                    f"PeftRegistry.register({tuner_name!r}) takes a BaseTuner subclass or a peftcore PeftConfig "
                    f"subclass, got {tuner_class!r}"
                )
            cls._tuners[tuner_name] = tuner_class
            return tuner_class

        return decorator

    @classmethod
    def get_tuner(cls, tuner_name: str) -> type[BaseTuner]:
        if tuner_name not in cls._tuners:
            raise UnknownMethodError(
                f"Unsupported peft method: {tuner_name!r}{did_you_mean(tuner_name, cls._tuners)}; "
                f"registered tuners: {', '.join(sorted(cls._tuners))}"
            )
        return cls._tuners[tuner_name]


@PeftRegistry.register("linear_lora")
class LinearLoraTuner(BaseTuner):
    """The seed's ``linear_lora`` tuner, as peftcore's LoRA."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.peft_model: Optional[PeftModel] = None

    def inject(self, base_model: Any) -> Any:
        """``get_peft_model(base_model, config)``: the base is frozen, LoRA added."""
        self.peft_model = _peftcore_get_peft_model(base_model, self.config)
        return self.peft_model

    def merge_weights(self, base_model: Any, mode: bool = True) -> Any:
        """``merge_adapter()`` (``mode=True``) or ``unmerge_adapter()`` on the model :meth:`inject` returned."""
        peft_model = base_model if isinstance(base_model, PeftModel) else self.peft_model
        if peft_model is None or (peft_model is not base_model and peft_model.get_base_model() is not base_model):
            raise ConfigError("merge_weights takes the model this tuner's inject() returned")
        if mode:
            peft_model.merge_adapter()
        else:
            peft_model.unmerge_adapter()
        return peft_model


def get_peft_model(base_model: Any, peft_config: Any) -> Any:
    """The seed's ``get_peft_model(base_model, peft_config)``.

    A peftcore config (``LinearLoraConfig`` and every peftcore method) gives peftcore's
    SINGA PeftModel; a seed-style :class:`PeftConfig` runs the :class:`BaseTuner`
    registered under its ``peft_type`` and gives a :class:`TunedModel` around the result.
    """
    if isinstance(peft_config, _CoreConfig):
        return _peftcore_get_peft_model(base_model, peft_config)
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"get_peft_model takes a PeftConfig, got {type(peft_config).__name__}")
    tuner = PeftRegistry.get_tuner(peft_config.peft_type)(peft_config)
    injected = tuner.inject(base_model)
    return injected if isinstance(injected, PeftModel) else TunedModel(injected, tuner)


class TunedModel:
    """What the seed's ``PeftModel`` was for a tuner of your own: calling it calls your
    (injected) model, ``merge_weights(mode)`` calls the tuner's, and every other attribute
    (``set_optimizer``, ``compile``, ``train``, ``eval``, ``get_params``, ``save_states``...)
    is your model's. Your model is not wrapped in another layer, so no layer or tensor is
    renamed (the seed's wrapper renamed them all ``base_model.*``)."""

    def __init__(self, model: Any, tuner: BaseTuner) -> None:
        self.model = model
        self.tuner = tuner

    @property
    def base_model(self) -> Any:
        """Your model, as the tuner left it (the seed's ``peft_model.base_model``)."""
        return self.model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("model")
        if name.startswith("__") or model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def merge_weights(self, mode: bool = True) -> None:
        """The tuner's ``merge_weights(model, mode)``."""
        self.tuner.merge_weights(self.model, mode)
