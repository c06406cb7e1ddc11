"""Optional capabilities of adapter layers, as small runtime-checkable protocols.

What belongs to one method, or to one backend's fast path, is not part of every adapter
layer (:class:`~peftcore.runtime.AdapterLayerProtocol`). A layer that has such a
capability implements the protocol's methods; the core asks with :func:`supports`, never
by probing attribute names:

- :class:`Bakes`: turns a training-time reparameterisation into its inference form
  (residual prompt tuning's MLP into a plain prompt);
- :class:`RecordsGates`: reports the gate values its last forward computed (UniPELT);
- :class:`ReportsWeightDtype`: tells its base weight's dtype now (the merge check);
- :class:`RoutesRows`: runs a batch whose rows use different adapters.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Bakes(Protocol):
    def bake(self, adapter_name: str) -> None:
        """Store the adapter's reparameterised tensors in their inference form."""


@runtime_checkable
class RecordsGates(Protocol):
    def recorded_gates(self, adapter_name: str) -> Mapping[str, Any]:
        """``{gate stem: values}`` of the last forward, where the adapter is gated here."""


@runtime_checkable
class ReportsWeightDtype(Protocol):
    def weight_dtype(self) -> str:
        """The base weight's dtype now, canonically named (``"float16"``)."""


@runtime_checkable
class RoutesRows(Protocol):
    def routes_rows(self) -> bool:
        """Whether this layer's forward routes each row to its own adapter."""

    def set_batch_adapters(self, routing: Any) -> None:
        """Route the rows of the following forwards as ``routing`` says (None: stop)."""


_answers: dict[tuple[type, type], bool] = {}


def supports(layer: Any, capability: type) -> bool:
    """Whether ``layer`` has ``capability`` (one of this module's protocols). The
    protocols hold only methods, which a class defines, so the answer is kept per class:
    the forward-time callers (mixed-adapter batches) pay one dict lookup."""
    key = (type(layer), capability)
    answer = _answers.get(key)
    if answer is None:
        answer = _answers[key] = isinstance(layer, capability)
    return answer
