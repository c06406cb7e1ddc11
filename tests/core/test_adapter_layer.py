"""The core's adapter-layer lifecycle over tensor primitives whose writes are not in place.

The primitives here hold numpy arrays and, like JAX, never change an array: every write
returns a new one. A LoRA-like and a BitFit-like layer built on them check that the
lifecycle stores written tensors back, restores merged tensors bit for bit, subtracts
(with a warning) after an edit, and creates and removes a missing base tensor.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Hashable, Optional, Sequence

import numpy as np
import pytest

from peftcore.adapter_layer import AdapterLayerCore, wrap_layer
from peftcore.errors import AdapterError, PlanError
from peftcore.methods.bitfit import TrainBias
from peftcore.methods.lora import AddLora
from peftcore.primitives import TensorPrimitives
from peftcore.testing.numerics import assert_close_to_scale


class ImmutableArrays(TensorPrimitives):
    """Tensors are read-only numpy arrays; a write makes a new one."""

    name = "immutable"

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return np.array(tensor, copy=True)

    def numel(self, tensor: Any) -> int:
        return int(np.size(tensor))

    def dtype_name(self, tensor: Any) -> str:
        return str(np.asarray(tensor).dtype)

    def is_trainable(self, tensor: Any) -> bool:
        return True

    def set_trainable(self, tensor: Any, trainable: bool) -> None:
        return None

    def write(self, tensor: Any, value: Any) -> Any:
        return _frozen(np.asarray(value, dtype=tensor.dtype).reshape(tensor.shape))

    def clone(self, tensor: Any) -> Any:
        return _frozen(tensor)

    def add_into(self, tensor: Any, deltas: Sequence[Any], sign: int) -> Any:
        total = tensor.astype(np.float32)
        for delta in deltas:
            total = total + delta if sign > 0 else total - delta
        return _frozen(total.astype(tensor.dtype))

    def fingerprint(self, tensor: Any) -> Hashable:
        return tensor.dtype.str, tensor.shape, hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()


def _frozen(array: Any) -> np.ndarray:
    out = np.array(array, copy=True)
    out.flags.writeable = False
    return out


class Base:
    """A base layer: a weight ``(out, in)`` and maybe a bias."""

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> None:
        self.tensors: dict[str, Any] = {"weight": _frozen(weight)}
        if bias is not None:
            self.tensors["bias"] = _frozen(bias)


class Layer(AdapterLayerCore):
    primitives = ImmutableArrays()

    def __init__(self, base_layer: Base, path: str) -> None:
        self.base_layer = base_layer
        self.path = path
        self.init_adapter_state()
        for name in (*self.adapter_tensor_names, *self.other_param_names):
            setattr(self, name, {})

    def base_tensor(self, role: str) -> Any:
        return self.base_layer.tensors.get(role)

    def set_base_tensor(self, role: str, tensor: Any) -> None:
        if tensor is None:
            self.base_layer.tensors.pop(role, None)
        else:
            self.base_layer.tensors[role] = tensor


class Lora(Layer):
    adapter_tensor_names = ("lora_A", "lora_B")
    other_param_names = ("scaling",)

    def features(self) -> tuple[int, int]:
        out_features, in_features = self.base_layer.tensors["weight"].shape
        return int(in_features), int(out_features)

    def new_adapter(self, adapter_name: str, op: AddLora) -> dict[str, Any]:
        rng = np.random.default_rng(len(self.adapter_names()))
        a = rng.standard_normal((op.r, op.in_features)).astype(np.float32)
        b = rng.standard_normal((op.out_features, op.r)).astype(np.float32)
        return {"lora_A": _frozen(a), "lora_B": _frozen(b), "scaling": op.scaling}

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        op_tensors = {"lora_A": self.lora_A[adapter_name], "lora_B": self.lora_B[adapter_name]}
        return AddLora(path=self.path, in_features=3, out_features=4, r=2, scaling=self.scaling[adapter_name]).delta(op_tensors)


class Bias(Layer):
    adapter_tensor_names = ("bitfit_bias",)
    canonical_names = {"bitfit_bias": "bias"}
    merge_role = "bias"

    def new_adapter(self, adapter_name: str, op: TrainBias) -> dict[str, Any]:
        bias = self.base_tensor("bias")
        op.check_bias(bias.shape if bias is not None else None)
        return {"bitfit_bias": _frozen(bias if bias is not None else np.zeros(op.size, np.float32))}

    def create_base_tensor(self, role: str) -> Any:
        self.set_base_tensor(role, _frozen(np.zeros(4, np.float32)))
        return self.base_tensor(role)

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        original = self.merge_original() if self.merged_adapters else self.base_tensor("bias")
        return TrainBias(path=self.path, size=4).delta({"bias": self.bitfit_bias[adapter_name]}, original)


def lora_op(**kwargs: Any) -> AddLora:
    return AddLora(**{"path": "fc", "in_features": 3, "out_features": 4, "r": 2, "scaling": 0.5, **kwargs})


def lora_layer() -> Lora:
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    layers: dict[str, Any] = {"": None, "fc": Base(weight)}

    def replace(model: Any, index: dict, path: str, new: Any) -> None:
        index[path] = new

    layer = wrap_layer(replace, None, layers, "fc", Lora)
    assert layers["fc"] is layer and wrap_layer(replace, None, layers, "fc", Lora) is layer
    layer.add("a", lora_op())
    layer.add("b", lora_op())
    layer.active_adapters = ["a", "b"]
    return layer


def test_add_stores_tensors_and_settings_and_refuses_a_duplicate_or_a_misfit() -> None:
    layer = lora_layer()
    assert layer.adapter_names() == ["a", "b"] and layer.scaling == {"a": 0.5, "b": 0.5}
    with pytest.raises(AdapterError, match="already has an adapter named 'a'"):
        layer.add("a", lora_op())
    with pytest.raises(PlanError, match="expects 5 -> 4 features, the layer has 3 -> 4"):
        layer.add("c", lora_op(in_features=5))
    layer.delete("a")
    assert layer.adapter_names() == ["b"] and layer.scaling == {"b": 0.5}


def test_load_stores_the_new_arrays_back_and_checks_every_shape_first() -> None:
    layer = lora_layer()
    exported = layer.export("a")
    new = {name: value + 1 for name, value in exported.items()}
    layer.load("a", new)
    for name, value in layer.export("a").items():
        np.testing.assert_array_equal(value, new[name])
    before = layer.export("b")
    with pytest.raises(AdapterError, match=r"tensor 'lora_B' has shape \(4, 3\), expected \(4, 2\)"):
        layer.load("b", {"lora_A": before["lora_A"] + 1, "lora_B": np.zeros((4, 3), np.float32)})
    np.testing.assert_array_equal(layer.export("b")["lora_A"], before["lora_A"])  # nothing half-written


def test_merge_and_unmerge_restore_the_weight_bit_for_bit_without_in_place_writes() -> None:
    layer = lora_layer()
    original = layer.base_tensor("weight")
    layer.merge(["a"])
    layer.merge(["b"])
    expected = original + layer.delta_weight("a") + layer.delta_weight("b")
    assert_close_to_scale(layer.base_tensor("weight"), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.unmerge()
    assert np.array_equal(layer.base_tensor("weight"), original) and layer.merge_record is None


def test_a_weight_edited_while_merged_is_unmerged_by_subtracting_with_a_warning() -> None:
    layer = lora_layer()
    original = layer.base_tensor("weight")
    layer.merge(["a"])
    layer.set_base_tensor("weight", _frozen(layer.base_tensor("weight") + 0.25))
    with pytest.warns(UserWarning, match="'fc': the base weight changed while adapters \\['a'\\] were merged"):
        layer.unmerge()
    assert_close_to_scale(layer.base_tensor("weight"), original + 0.25)


def test_a_failed_first_merge_leaves_no_record_and_unwrap_leaves_no_merge_state() -> None:
    layer = lora_layer()
    original = layer.base_tensor("weight")
    layer.lora_A["b"] = _frozen(np.zeros((3, 3), np.float32))  # the wrong shape: b @ a fails
    with pytest.raises(ValueError):
        layer.merge(["a", "b"])
    assert layer.merge_record is None and layer.merged_adapters == []
    assert np.array_equal(layer.base_tensor("weight"), original)
    layer.delete("b")
    base = layer.unwrap(merge=True)
    assert layer.merged_adapters == [] and layer.merge_record is None
    assert not np.array_equal(base.tensors["weight"], original)


def test_a_bias_the_merge_created_is_removed_again_and_an_existing_one_restored() -> None:
    layer = Bias(Base(np.ones((4, 3), np.float32)), "fc")
    layer.add("a", TrainBias(path="fc", size=4, added=True))
    layer.active_adapters = ["a"]
    layer.load("a", {"bias": np.arange(4, dtype=np.float32)})
    layer.merge(["a"])
    np.testing.assert_array_equal(layer.base_tensor("bias"), np.arange(4, dtype=np.float32))
    layer.unmerge()
    assert layer.base_tensor("bias") is None

    with_bias = Bias(Base(np.ones((4, 3), np.float32), np.full(4, 0.5, np.float32)), "fc")
    with_bias.add("a", TrainBias(path="fc", size=4))
    with_bias.load("a", {"bias": np.full(4, 2.0, np.float32)})
    with_bias.merge(["a"])
    np.testing.assert_array_equal(with_bias.base_tensor("bias"), np.full(4, 2.0, np.float32))
    with_bias.unmerge()
    np.testing.assert_array_equal(with_bias.base_tensor("bias"), np.full(4, 0.5, np.float32))
    with pytest.raises(AdapterError, match="already has a bias"):
        with_bias.add("b", TrainBias(path="fc", size=4, added=True))
