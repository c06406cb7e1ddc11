"""All-or-nothing for every call that writes several tensors.

Rule: a call that writes several tensors (``import_adapter``, ``load_adapter``,
``set_peft_model_state_dict``, ``add_weighted_adapter``, ``bake``, XPrompt's
``replace_adapter``) first checks everything it will write (names, shapes, finiteness),
then writes; if a write still fails part-way (the backend raised, memory ran out),
what was already written is put back, so the model is as it was before the call.

The snapshots here are numpy copies taken through the core's export primitives, so
putting them back is bit-exact in every dtype a backend exports losslessly (float32,
float16 and bfloat16, which torch exports widened to float32).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from peftcore.errors import AdapterError, BackendError
from peftcore.plan import RewritePlan


def check_tensor_shapes(plan: RewritePlan, tensors: Mapping[str, Any], adapter_name: str) -> None:
    """Refuse, before anything is written, a tensor whose shape is not the plan's.
    Names the plan does not declare (a P-tuning encoder's parameters) are left to the
    layer that owns them."""
    specs = plan.tensor_specs()
    for name, value in tensors.items():
        spec = specs.get(name)
        shape = tuple(np.shape(value))
        if spec is not None and shape != tuple(spec.shape):
            raise AdapterError(
                f"adapter {adapter_name!r}: tensor {name!r} has shape {shape}, expected {tuple(spec.shape)}; "
                "nothing was written"
            )


@contextlib.contextmanager
def restoring_tensors(peft_model: Any, adapter_name: str) -> Iterator[None]:
    """Inside the block the adapter's tensors (and the base tensors it trains in place)
    may be overwritten; if the block raises, they are put back as they were. An adapter
    built without data (torch's ``meta`` device, ``low_cpu_mem_usage``) cannot be
    exported and has no values to lose: nothing is kept for it."""
    try:
        before: Optional[dict[str, np.ndarray]] = {
            name: np.array(value, copy=True) for name, value in peft_model.export_adapter(adapter_name).items()
        }
    except BackendError:
        before = None
    try:
        yield
    except BaseException:
        if before is not None:
            peft_model.import_adapter(adapter_name, before)
        raise


@contextlib.contextmanager
def restoring_adapter(peft_model: Any, adapter_name: str) -> Iterator[None]:
    """Inside the block the adapter may be rebuilt, baked or replaced; if the block raises,
    the adapter is rebuilt from its config, plan and tensors as they were, with the same
    adapters active."""
    config, plan = peft_model.peft_config[adapter_name], peft_model.plans[adapter_name]
    active, order = list(peft_model.active_adapters), list(peft_model.peft_config)
    before = {name: np.array(value, copy=True) for name, value in peft_model.export_adapter(adapter_name).items()}
    try:
        yield
    except BaseException:
        if adapter_name in peft_model.peft_config:
            peft_model.delete_adapter(adapter_name)
        peft_model.add_adapter(adapter_name, config, plan=plan)
        peft_model.import_adapter(adapter_name, before)
        for table in (peft_model.peft_config, peft_model.plans):  # the adapters' order, as it was
            entries = [(name, table.pop(name)) for name in order if name in table]
            table.update(entries)
        if active:
            peft_model.set_adapter(active)
        raise


@contextlib.contextmanager
def restoring_base_weights(peft_model: Any, paths: Sequence[str]) -> Iterator[None]:
    """Inside the block the base weight matrices at ``paths`` (embedding matrices loaded
    beside an adapter) may be overwritten; if the block raises, they are put back. A
    shell that cannot read base weights cannot write them either: nothing to keep."""
    read = getattr(peft_model, "_base_weights", None)
    before = {p: np.array(v, copy=True) for p, v in read(list(paths)).items()} if paths and callable(read) else {}
    try:
        yield
    except BaseException:
        if before:
            peft_model._set_base_weights(before)
        raise


@contextlib.contextmanager
def restoring_base_tensors(runtime: Any, tensors: Sequence[Any]) -> Iterator[None]:
    """Inside the block the given base tensors (backend tensors) may be overwritten; if
    the block raises, they are put back."""
    before = [(tensor, np.array(runtime.to_numpy(tensor), copy=True)) for tensor in tensors]
    try:
        yield
    except BaseException:
        for tensor, value in before:
            runtime.write(tensor, value)
        raise
