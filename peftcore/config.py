"""Base class of PEFT configs: validated on construction, JSON round trip.

Configs use Hugging Face PEFT's field names where the concept exists, so an
``adapter_config.json`` written by either library reads in the other. Fields that are
peftcore-only runtime choices (such as ``backend``) are marked ``saved=False`` and never
written to disk.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, TypeVar

from peftcore import config_files
from peftcore.errors import ConfigError, MissingFieldError, UnknownFieldError, did_you_mean
from peftcore.task_type import TASK_TYPES

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:
    from typing_extensions import dataclass_transform

if TYPE_CHECKING:
    from peftcore.graph import ModelGraph
    from peftcore.plan import RewritePlan

C = TypeVar("C", bound="PeftConfig")

CONFIG_NAME = "adapter_config.json"


def runtime_field(default: Any = None) -> Any:
    """A config field that is a runtime choice and is not saved with the adapter."""
    return dataclasses.field(default=default, metadata={"saved": False})


@dataclass_transform(kw_only_default=True)
def config_class(cls: type[C]) -> type[C]:
    """Turn a config class into a dataclass whose constructor rejects unknown fields.

    An unknown keyword raises :class:`ConfigError` naming the field and the closest
    known field, instead of Python's bare ``TypeError``. The constructor takes keyword
    arguments only. Type checkers see the class as a keyword-only dataclass
    (``dataclass_transform``).
    """
    cls = dataclasses.dataclass(cls)
    dataclass_init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "peft_type" in kwargs:  # HF's configs take it as a keyword; the class decides it
            _check_peft_type_keyword(cls, kwargs.pop("peft_type"))
        unsupported: Mapping[str, Any] = getattr(cls, "hf_unsupported_fields", {})
        for key in [k for k in kwargs if k not in names and k in unsupported]:
            value = kwargs.pop(key)  # an HF PEFT field: fine while it leaves its feature off
            if not is_off_value(value, unsupported[key]):
                raise ConfigError(unsupported_field_message(cls.__name__, key, value))
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise UnknownFieldError(
                f"{cls.__name__} has no field {unknown[0]!r}{did_you_mean(unknown[0], names)}"
            )
        if len(args) > 0:
            raise ConfigError(f"{cls.__name__} takes keyword arguments only, got {len(args)} positional")
        dataclass_init(self, **kwargs)

    __init__.__doc__ = dataclass_init.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _check_peft_type_keyword(cls: type, given: Any) -> None:
    expected = getattr(cls, "peft_type", "")
    if expected and str(given) != str(expected):
        warnings.warn(
            f"{cls.__name__}(peft_type={given!r}) is ignored: a {cls.__name__} is always peft_type {str(expected)!r}",
            UserWarning,
            stacklevel=3,
        )


#: Where a config saved alone (:meth:`PeftConfig.save_pretrained`) keeps peftcore's own
#: fields (an adapter keeps them with its weights), away from HF PEFT's keys.
OWN_CONFIG_KEY = "peftcore_config"

#: Builds the right config class from a saved dict by its ``peft_type``; set by
#: :mod:`peftcore.registry` (which knows the methods) when it is imported.
_config_from_dict: Optional[Callable[[dict], PeftConfig]] = None


def set_config_source(build: Callable[[dict], PeftConfig]) -> None:
    """Give :meth:`PeftConfig.from_pretrained` the registry's peft_type -> class lookup."""
    global _config_from_dict
    _config_from_dict = build


@config_class
class PeftConfig:
    """Fields every method shares. Subclasses are registered PEFT methods.

    Class attributes set by subclasses: ``method`` (the registry name, e.g. ``"lora"``)
    and ``peft_type`` (HF PEFT's ``peft_type`` string, e.g. ``"LORA"``).
    ``hf_unsupported_fields`` lists HF PEFT config keys for features peftcore does not
    have; reading a file accepts them only at their "feature not used" value.
    ``tensor_prefix`` is HF PEFT's tuner ``prefix`` for the method, if it has one.
    ``plan_ops`` names the plan op types the planner may emit (``peftcore backends``
    shows a method as buildable by a backend that builds all of them).
    """

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    hf_metadata_fields: ClassVar[tuple] = ("peft_version", "auto_mapping", "revision")
    hf_unsupported_fields: ClassVar[Mapping[str, Any]] = {}
    #: fields of this config HF PEFT's class of the same ``peft_type`` lacks: saved with
    #: peftcore's own data in the weights file, never in ``adapter_config.json``
    peftcore_fields: ClassVar[tuple] = ()
    plan_ops: ClassVar[tuple] = ()
    #: the start every adapter tensor name of this method has (``"lora_"``): HF PEFT's
    #: tuner ``prefix``; empty where the method's tensors share none
    tensor_prefix: ClassVar[str] = ""
    #: HF PEFT's attribute: the method adds virtual tokens (prompt, prefix or P-tuning)
    #: rather than changing layers, so it has no unload or per-adapter requires_grad
    is_prompt_learning: ClassVar[bool] = False

    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    backend: Optional[str] = runtime_field()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field values; subclasses extend it. Raises :class:`ConfigError`."""
        if self.backend is not None and not isinstance(self.backend, str):
            raise ConfigError(f"backend must be a backend name (str) or None, got {self.backend!r}")
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise ConfigError(f"task_type must be a string or None, got {self.task_type!r}")
        if self.task_type is not None:
            if self.task_type not in TASK_TYPES:
                hint = did_you_mean(str(self.task_type), TASK_TYPES).lstrip("; ")
                raise ConfigError(  # HF PEFT's wording, so code matching its message keeps working
                    f"Invalid task type: {self.task_type!r}. Must be one of the following task types: "
                    f"{', '.join(TASK_TYPES)}. {hint[:1].upper() + hint[1:] if hint else ''}".rstrip()
                )
            self.task_type = str(TASK_TYPES[TASK_TYPES.index(self.task_type)])  # a TaskType member -> its string
        if not isinstance(self.inference_mode, bool):
            raise ConfigError(f"inference_mode must be True or False, got {self.inference_mode!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ConfigError(f"base_model_name_or_path must be a string or None, got {self.base_model_name_or_path!r}")

    # -- planning -------------------------------------------------------------------
    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        """Turn this config into a rewrite plan for ``graph`` (implemented per method)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement plan()")

    def plan_disagreement(self, plan: RewritePlan) -> Optional[str]:
        """Why a stored ``plan`` of this config's method would load differently from what
        a reader of the config alone (HF PEFT, ``convert --to hf``) computes; None when
        they agree (always, unless a method says otherwise)."""
        return None

    def variants(self) -> tuple[str, ...]:
        """The named forms of the method this config asks for (LoRA's ``"dora"``): a
        backend that lists one in ``BackendInfo.limitations`` refuses the config with its
        reason. None by default."""
        return ()

    def check_beside(self, others: Mapping[str, PeftConfig]) -> None:
        """Raise a :class:`ConfigError` if an adapter of this config cannot join a model
        that holds adapters with the configs ``others`` (by name). Every combination is
        allowed unless a method says otherwise."""

    def loading_plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        """The plan to rebuild a saved adapter that has no stored plan (an HF PEFT one).

        Its tensors come from the file, so a method whose initialisation needs more than
        the config (prompt tuning's tokenizer) plans without it here.
        """
        return self.plan(graph, adapter_name)

    def baked(self) -> PeftConfig:
        """The config of this adapter after ``PeftModel.bake()`` (itself unless the
        method has a training-time reparameterisation)."""
        return self

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> PeftConfig:
        """This config as Hugging Face PEFT saves it once the adapter is on a model:
        ``inference_mode`` True, and (in subclasses) what the model decided written out
        (default ``target_modules``, the task's heads in ``modules_to_save``, prompt
        sizes). ``graph`` and ``plan`` are the model's and the adapter's, where known."""
        return self.replace(inference_mode=True)

    # -- serialisation -------------------------------------------------------------
    def hf_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`to_dict` split in two: the keys HF PEFT's config has (for
        ``adapter_config.json``) and peftcore's own (:attr:`peftcore_fields`)."""
        data = self.to_dict()
        own = {name: data.pop(name) for name in self.peftcore_fields if name in data}
        return data, own

    def to_dict(self) -> dict[str, Any]:
        """The config as written to ``adapter_config.json`` (HF PEFT keys)."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("saved", True):
                continue
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset, tuple)):
                value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
            data[f.name] = value
        data["peft_type"] = self.peft_type
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from a saved dict, validating every key.

        Keys HF PEFT writes for features peftcore does not have are accepted only at
        their "unused" value; anything else unknown is a :class:`ConfigError`.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(f"config has peft_type {peft_type!r}, expected '{cls.peft_type}' for {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in cls.hf_metadata_fields:
                continue
            elif key in cls.hf_unsupported_fields:
                if not is_off_value(value, cls.hf_unsupported_fields[key]):
                    raise ConfigError(unsupported_field_message(cls.__name__, key, value))
            elif _is_off(value):
                ignored.append(key)  # most likely a newer HF PEFT's feature, left off
            else:
                raise ConfigError(
                    f"{cls.__name__} has no field {key!r}{did_you_mean(key, names)}: the config was probably "
                    f"written by a newer PEFT version, and {key}={value!r} would change what the adapter computes, "
                    "which peftcore cannot do"
                )
        if ignored:
            warnings.warn(
                f"{cls.__name__}: ignoring config key(s) {', '.join(repr(k) for k in sorted(ignored))} that this "
                "peftcore does not know (probably from a newer PEFT version); each is at a value that turns its "
                "feature off",
                UserWarning,
                stacklevel=3,
            )
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        from peftcore import strict_json

        try:
            data = strict_json.loads(text)
        except ValueError as exc:  # JSONDecodeError too; numbers or nesting out of bounds
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # -- files (HF PEFT's config-only API) --------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write this config as ``<save_directory>/adapter_config.json`` (HF PEFT's
        ``PeftConfig.save_pretrained``); ``auto_mapping_dict=`` is stored as ``auto_mapping``."""
        data, own = self.hf_dict()  # HF PEFT's keys; peftcore's own, where set, under their own key
        own = {key: value for key, value in own.items() if value is not None}
        if own:
            data[OWN_CONFIG_KEY] = own
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if kwargs:
            raise ConfigError(f"save_pretrained got unexpected keyword(s) {sorted(kwargs)}")
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        config_files.write_config_dict(save_directory, data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any) -> PeftConfig:
        """The config saved in a local directory (HF PEFT's ``PeftConfig.from_pretrained``).

        As in HF PEFT, the class is the one the file's ``peft_type`` names (on any config
        class, ``PeftConfig`` included); keywords other than HF's download options
        (``revision``, ``cache_dir``..., which a local directory does not use) override
        the saved fields. peftcore never downloads: the path must be a directory.
        """
        data = config_files.config_dict_in(pretrained_model_name_or_path, subfolder)
        own = data.pop(OWN_CONFIG_KEY, {})
        if not isinstance(own, dict):
            raise ConfigError(f"{pretrained_model_name_or_path}: '{OWN_CONFIG_KEY}' must be an object, got {own!r}")
        data.update(own)
        data.update({k: v for k, v in kwargs.items() if k not in config_files.HUB_KEYWORDS})
        if "peft_type" not in data:
            raise MissingFieldError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"({pretrained_model_name_or_path} holds no PEFT adapter config)"
            )
        if cls.peft_type and data["peft_type"] == cls.peft_type:
            return cls.from_dict(data)
        if _config_from_dict is None:  # only before peftcore.registry is imported
            raise ConfigError("no method registry to read a config with; import peftcore first")
        return _config_from_dict(data)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """A config of the class that ``peft_type=`` names, built from the other keywords
        (HF PEFT's ``PeftConfig.from_peft_type``)."""
        if "peft_type" not in kwargs:
            raise ConfigError("from_peft_type needs a peft_type= keyword")
        if _config_from_dict is None:
            raise ConfigError("no method registry to read a config with; import peftcore first")
        return _config_from_dict({**kwargs, "peft_type": str(kwargs["peft_type"])})

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """The saved config's fields as a dict, as HF PEFT's ``from_json_file`` returns
        them (a ``runtime_config`` entry, runtime-only, is dropped)."""
        data = config_files.read_config_dict(path_json_file)
        data.pop("runtime_config", None)
        return data

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no field {unknown[0]!r}")
        return dataclasses.replace(self, **changes)


def is_off_value(value: Any, off: Any) -> bool:
    """Whether ``value`` of an HF PEFT field peftcore lacks leaves its feature off: the
    field's own "unused" value ``off``, or null/false/empty."""
    return value in (off, None, False, {}, [])


def unsupported_field_message(owner: str, key: str, value: Any) -> str:
    """The one message for an HF PEFT feature peftcore does not support, whether it comes
    from a constructor keyword or a config file."""
    return (
        f"{owner}: {key}={value!r} is an HF PEFT feature peftcore does not support; leave {key} at its default "
        f"(or remove it) to use this method without it"
    )


def _is_off(value: Any) -> bool:
    """Whether an unknown config key's value leaves a feature off (null, false, empty)."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def check_type(owner: str, name: str, value: Any, types: tuple, allow_none: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``types`` (bools are not ints)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{owner}.{name} must be {_describe(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{owner}.{name} must be {_describe(types)}, got {value!r}")


def _describe(types: tuple) -> str:
    return " or ".join(t.__name__ for t in types)

