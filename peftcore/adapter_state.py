"""Adapter bookkeeping that every backend's adapter layers share, framework-free.

A backend's adapter layer keeps each kind of adapter tensor in a dict-like attribute
(``lora_A``, ``prompt_embeddings``...), keyed by adapter name, and lists those attributes
in ``adapter_tensor_names``. Which adapters a layer has, which of them forward must run,
and the canonical names of their tensors follow from that alone, so the rules live here
once and the torch and SINGA layers (and third-party ones) inherit them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence, Union

from peftcore.errors import AdapterError


class AdapterBookkeeping:
    """Mixin for adapter layers: names, active/merged/disabled state, tensor naming.

    Every adapter has a tensor in the first attribute of ``adapter_tensor_names``; the
    others may hold only some adapters (optional parts, such as residual prompt tuning's
    MLP). ``canonical_names`` renames an attribute to its canonical tensor name where the
    two differ (BitFit's ``bitfit_bias`` is saved as ``bias``). Call
    :meth:`init_adapter_state` from the layer's ``__init__``.
    """

    adapter_tensor_names: ClassVar[tuple] = ()
    canonical_names: ClassVar[Mapping[str, str]] = {}
    #: the layer runs one adapter at a time (a ``modules_to_save`` copy): two active
    #: adapters that both hold one are refused, as HF PEFT refuses them
    single_active: ClassVar[bool] = False

    def init_adapter_state(self) -> None:
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- Hugging Face PEFT's layer API (``BaseTunerLayer``) -------------------------------
    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into this layer's base weights."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """Whether the layer runs its base layer alone (HF PEFT's attribute)."""
        return bool(self.disabled)

    def enable_adapters(self, enabled: bool) -> None:
        """Turn this layer's adapters on (``True``) or off (``False``), as HF PEFT's layer
        method does; the model-level switch is ``enable_adapter_layers``."""
        self.disabled = not enabled

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_names`` this layer's active adapters; their tensors train and
        the layer's other adapters' do not (HF PEFT's layer method; the model-level
        ``set_adapter`` sets every layer)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = self.adapter_names()
        if self.single_active and sum(name in present for name in names) > 1:
            raise AdapterError(
                f"Only one adapter can be set at a time for ModulesToSaveWrapper; {type(self).__name__} holds "
                f"{[n for n in names if n in present]}"
            )
        layer: Any = self  # a backend's adapter layer, which has set_trainable (runtime.AdapterLayer)
        for name in present:
            layer.set_trainable(name, name in names)
        self.active_adapters = names

    def _all_available_adapter_names(self) -> list[str]:
        """HF PEFT's name for :meth:`adapter_names`."""
        return self.adapter_names()

    def adapter_store(self, attribute: str) -> Any:
        """The dict-like store of one kind of adapter tensor."""
        return getattr(self, attribute)

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in the order they were added."""
        if not self.adapter_tensor_names:
            return []
        return list(self.adapter_store(self.adapter_tensor_names[0]).keys())

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.adapter_names()

    def adapters_to_run(self) -> list[str]:
        """Active, present and not merged: the adapters forward must add."""
        if self.disabled:
            return []
        present = self.adapter_names()
        return [a for a in self.active_adapters if a in present and a not in self.merged_adapters]

    def tensor_names(self, adapter_name: str) -> list[str]:
        """The attributes holding a tensor of ``adapter_name`` in this layer."""
        return [name for name in self.adapter_tensor_names if adapter_name in self.adapter_store(name)]

    def canonical_name(self, attribute: str) -> str:
        """The canonical (saved) name of the tensors kept in ``attribute``."""
        return self.canonical_names.get(attribute, attribute)

    def canonical_tensor(self, adapter_name: str, tensors: Mapping[str, Any], attribute: str) -> tuple[str, Any]:
        """``(canonical name, value)`` of ``attribute``'s tensor in ``tensors``, which a
        loader must supply: a missing one is an :class:`AdapterError`."""
        key = self.canonical_name(attribute)
        if key not in tensors:
            raise AdapterError(f"tensor {key!r} missing for adapter {adapter_name!r}")
        return key, tensors[key]

    def forget_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's tensors from every store and from the active list."""
        for name in self.adapter_tensor_names:
            store = self.adapter_store(name)
            if adapter_name in store:
                del store[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
