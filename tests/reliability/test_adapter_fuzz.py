"""Bounded fuzzing of adapter loading: mutated files and configs give only peftcore errors.

Each example starts from a valid adapter directory, damages it (bytes of the weights
file, entries of its header, the peftcore metadata, the config JSON), and loads it.
Loading may succeed (a damage can be harmless) or raise a ``PeftCoreError``; any other
exception, a crash or a hang is a bug.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftcore import LayerNode, LoraConfig, ModelGraph, PeftCoreError
from peftcore.io import CONFIG_NAME, WEIGHTS_NAME, match_tensors, read_adapter, save_adapter

GRAPH = ModelGraph(
    layers=(
        LayerNode("enc", "linear", "Linear", 4, 3, params={"weight": (3, 4)}),
        LayerNode("head", "linear", "Linear", 3, 2, params={"weight": (2, 3), "bias": (2,)}, has_bias=True),
    )
)
CONFIG = LoraConfig(r=2, target_modules=["enc"], modules_to_save=["head"])
PLAN = CONFIG.plan(GRAPH)
RNG = np.random.default_rng(0)
TENSORS = {name: RNG.standard_normal(spec.shape).astype(np.float32) for name, spec in PLAN.tensor_specs().items()}

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the config saved with")

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def pristine() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(folder, CONFIG, PLAN, TENSORS)
        yield Path(folder)


def load_damaged(pristine: Path, damage: Callable[[Path], None]) -> None:
    """Copy the adapter, damage the copy, load it: success or a PeftCoreError only."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "adapter"
        shutil.copytree(pristine, copy)
        damage(copy)
        try:
            files = read_adapter(str(copy))
            plan = files.plan if files.plan is not None else files.config.plan(GRAPH)
            match_tensors(plan, files.tensors, "fuzz")
        except PeftCoreError:
            pass


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def join(path: Path, header: Any, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


byte_edits = st.lists(
    st.tuples(st.sampled_from(["set", "cut", "insert", "delete"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=byte_edits)
def test_mutated_weight_bytes(pristine: Path, edits: list) -> None:
    def damage(folder: Path) -> None:
        data = bytearray((folder / WEIGHTS_NAME).read_bytes())
        for kind, position, blob in edits:
            at = position % (len(data) + 1)
            if kind == "set":
                data[at : at + len(blob)] = blob
            elif kind == "cut":
                del data[at:]
            elif kind == "insert":
                data[at:at] = blob
            else:
                del data[at : at + len(blob)]
        (folder / WEIGHTS_NAME).write_bytes(bytes(data))

    load_damaged(pristine, damage)


@FUZZ
@given(entry=st.integers(0, 10), field=st.sampled_from(["dtype", "shape", "data_offsets", "new", None]), value=json_values)
def test_mutated_header_entries(pristine: Path, entry: int, field: Any, value: Any) -> None:
    def damage(folder: Path) -> None:
        header, data = split(folder / WEIGHTS_NAME)
        keys = sorted(header)
        key = keys[entry % len(keys)]
        if field is None:
            header[key] = value
        elif isinstance(header[key], dict):
            header[key][field] = value
        join(folder / WEIGHTS_NAME, header, data)

    load_damaged(pristine, damage)


@FUZZ
@given(path=st.lists(st.integers(0, 20), min_size=1, max_size=4), value=json_values)
def test_mutated_plan_metadata(pristine: Path, path: list, value: Any) -> None:
    def damage(folder: Path) -> None:
        header, data = split(folder / WEIGHTS_NAME)
        record = json.loads(header["__metadata__"]["peftcore"])
        replace_somewhere(record, path, value)
        header["__metadata__"]["peftcore"] = json.dumps(record)
        join(folder / WEIGHTS_NAME, header, data)

    load_damaged(pristine, damage)


@FUZZ
@given(path=st.lists(st.integers(0, 20), min_size=0, max_size=3), value=json_values, drop=st.booleans())
def test_mutated_config_json(pristine: Path, path: list, value: Any, drop: bool) -> None:
    def damage(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        if not path:
            config = value
        elif drop:
            config.pop(sorted(config)[path[0] % len(config)], None)
        else:
            replace_somewhere(config, path, value)
        (folder / CONFIG_NAME).write_text(json.dumps(config))

    load_damaged(pristine, damage)


def replace_somewhere(node: Any, path: list, value: Any) -> None:
    """Walk ``path`` (indices taken modulo each container's size) and replace what it reaches."""
    for depth, step in enumerate(path):
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
        elif isinstance(node, list) and node:
            key = step % len(node)
        else:
            return
        if depth == len(path) - 1 or not isinstance(node[key], (dict, list)):
            node[key] = value
            return
        node = node[key]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(path=st.lists(st.integers(0, 20), min_size=1, max_size=4), value=json_values)
def test_mutated_plans_through_the_torch_backend(pristine: Path, path: list, value: Any) -> None:
    """A damaged plan that still parses must be refused by the backend with a peftcore error."""
    torch = pytest.importorskip("torch")
    from peftcore import PeftModel

    def damage(folder: Path) -> None:
        header, data = split(folder / WEIGHTS_NAME)
        record = json.loads(header["__metadata__"]["peftcore"])
        replace_somewhere(record["plan"], path, value)
        header["__metadata__"]["peftcore"] = json.dumps(record)
        join(folder / WEIGHTS_NAME, header, data)

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "adapter"
        shutil.copytree(pristine, copy)
        damage(copy)
        model = torch.nn.Sequential()
        model.add_module("enc", torch.nn.Linear(4, 3))
        model.add_module("head", torch.nn.Linear(3, 2))
        try:
            PeftModel.from_pretrained(model, copy)
        except PeftCoreError:
            pass
