"""peftcore's streaming safetensors writer gives files the safetensors library and
peftcore's strict reader both load back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import AdapterError
from peftcore.safetensors_reader import read_safetensors
from peftcore.safetensors_writer import safetensors_buffers

safetensors_numpy = pytest.importorskip("safetensors.numpy")

DTYPES = ["<f2", "<f4", "<f8", ">f4", ">f8", "<i8", "<i4", "i1", "u1", "<u2", "?"]


def tensor(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 100
    return values.astype(np.dtype(dtype)) if dtype != "?" else values > 0


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3).map(tuple)),
        min_size=0,
        max_size=6,
    ),
    st.booleans(),
    st.booleans(),
)
def test_written_files_load_back_exactly(specs: list, with_metadata: bool, transposed: bool) -> None:
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        array = tensor(dtype, shape, i)
        tensors[f"t{i}.é"] = array.T if transposed else array  # non-contiguous, non-ASCII names
    metadata = {"format": "pt", "peftcore": '{"x": "ü"}'} if with_metadata else {}
    data = b"".join(bytes(b) for b in safetensors_buffers(tensors, metadata))
    (length,) = np.frombuffer(data[:8], "<u8")
    assert (8 + int(length)) % 8 == 0  # the data section starts aligned
    loaded = safetensors_numpy.load(data)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("=") and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)  # bit-exactness is the claim


def test_the_strict_reader_loads_them_and_tensors_are_aligned(tmp_path: Path) -> None:
    tensors = {"a": np.arange(3, dtype=np.float16), "b": np.ones((2, 3), np.float64), "c": np.zeros(0, np.float32)}
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"".join(bytes(b) for b in safetensors_buffers(tensors, {"format": "pt"})))
    read, metadata = read_safetensors(str(path))
    assert metadata == {"format": "pt"}
    for name, array in tensors.items():
        np.testing.assert_array_equal(read[name], array)
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:  # the library's own reader, memory-mapped
        for name in tensors:
            begin = handle.get_slice(name)
            assert begin.get_shape() == list(tensors[name].shape)


def test_unwritable_dtypes_and_names_are_refused() -> None:
    with pytest.raises(AdapterError, match="complex"):
        safetensors_buffers({"z": np.zeros(2, np.complex64)}, {})
    with pytest.raises(AdapterError, match="__metadata__"):
        safetensors_buffers({"__metadata__": np.zeros(2, np.float32)}, {})
