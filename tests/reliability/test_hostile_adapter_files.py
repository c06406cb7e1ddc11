"""Hostile adapter directories: every defect is an AdapterError naming the file and entry.

The core-level cases run on numpy alone; the torch cases check that a rejected load
leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from peftcore import AdapterError, LayerNode, LoraConfig, ModelGraph
from peftcore.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_subdir,
    check_adapter_name,
    match_tensors,
    read_adapter,
    save_adapter,
)

GRAPH = ModelGraph(layers=(LayerNode("fc", "linear", "Linear", 3, 2, params={"weight": (2, 3)}),))
CONFIG = LoraConfig(r=2, target_modules=["fc"])
PLAN = CONFIG.plan(GRAPH)
TENSORS = {"fc.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.lora_B": np.full((2, 2), 0.5, np.float32)}
KEY_A = "base_model.model.fc.lora_A.weight"
KEY_B = "base_model.model.fc.lora_B.weight"


def saved(tmp_path: Path) -> Path:
    save_adapter(str(tmp_path), CONFIG, PLAN, TENSORS)
    return tmp_path


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """The safetensors file's header (as JSON) and data section."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def join(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def rewrite_header(directory: Path, change: Callable[[dict[str, Any]], None], data_change: Callable[[bytes], bytes] = lambda d: d) -> None:
    weights = directory / WEIGHTS_NAME
    header, data = split(weights)
    change(header)
    join(weights, header, data_change(data))


def rejected(directory: Path, *patterns: str) -> str:
    """Read ``directory`` (and match its tensors); it must fail with every pattern in the message."""
    with pytest.raises(AdapterError) as info:
        files = read_adapter(str(directory))
        match_tensors(files.plan, files.tensors, str(directory / WEIGHTS_NAME))
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


# -- the safetensors file ----------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1])
def test_truncated_file_is_rejected_naming_it(tmp_path: Path, keep: int) -> None:
    weights = saved(tmp_path) / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    rejected(tmp_path, str(weights))


def test_truncated_data_names_the_tensor_cut_off(tmp_path: Path) -> None:
    saved(tmp_path)
    header, _ = split(tmp_path / WEIGHTS_NAME)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    rewrite_header(tmp_path, lambda h: None, lambda d: d[:-4])
    rejected(tmp_path, WEIGHTS_NAME, repr(last), "truncated")


def test_header_that_is_not_json_or_not_an_object(tmp_path: Path) -> None:
    weights = saved(tmp_path) / WEIGHTS_NAME
    weights.write_bytes(struct.pack("<Q", 4) + b"{no}")
    rejected(tmp_path, str(weights), "not valid JSON")
    weights.write_bytes(struct.pack("<Q", 2) + b"[]")
    rejected(tmp_path, "header is a list")
    weights.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    rejected(tmp_path, "header length")


@pytest.mark.parametrize(
    "lie, message",
    [
        (lambda h: h[KEY_A].update(data_offsets=[0, 20]), "needs 24 bytes"),  # size does not match shape
        (lambda h: h[KEY_A].update(data_offsets=[24, 0]), "run backwards"),
        (lambda h: h[KEY_A].update(data_offsets=[0, 10**9]), "data section has only"),
        (lambda h: h[KEY_A].update(data_offsets=[-8, 16]), "two non-negative integers"),
        (lambda h: h[KEY_A].update(data_offsets=[0]), "two non-negative integers"),
        (lambda h: h[KEY_A].update(shape=[3, 2, 1, -1]), "shape must be"),
        (lambda h: h[KEY_A].update(shape="2x3"), "shape must be"),
        (lambda h: h[KEY_A].update(dtype="F8_E4M3"), "unsupported dtype 'F8_E4M3'"),
        (lambda h: h[KEY_A].update(extra=1), "header entry must have exactly"),
    ],
)
def test_header_entries_that_lie_name_the_tensor(tmp_path: Path, lie: Callable[[dict], None], message: str) -> None:
    saved(tmp_path)
    rewrite_header(tmp_path, lie)
    rejected(tmp_path, WEIGHTS_NAME, repr(KEY_A), message)


def test_overlapping_and_gapped_offsets_name_the_tensor(tmp_path: Path) -> None:
    saved(tmp_path)
    header, data = split(tmp_path / WEIGHTS_NAME)
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[second]["data_offsets"] = [header[second]["data_offsets"][0] - 4, header[second]["data_offsets"][1] - 4]
    join(tmp_path / WEIGHTS_NAME, header, data[:-4])
    rejected(tmp_path, repr(second), "overlaps")
    header, data = split(tmp_path / WEIGHTS_NAME)
    header[second]["data_offsets"] = [header[second]["data_offsets"][0] + 8, header[second]["data_offsets"][1] + 8]
    join(tmp_path / WEIGHTS_NAME, header, data + bytes(12))
    rejected(tmp_path, repr(second), "gap")


def test_trailing_bytes_and_duplicate_header_keys(tmp_path: Path) -> None:
    weights = saved(tmp_path) / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes() + b"\0" * 8)
    rejected(tmp_path, "8 bytes after the last tensor")
    header, data = split(saved(tmp_path) / WEIGHTS_NAME)
    text = json.dumps(header)
    doubled = text[:-1] + ", " + json.dumps(KEY_A) + ": " + json.dumps(header[KEY_A]) + "}"
    weights.write_bytes(struct.pack("<Q", len(doubled)) + doubled.encode() + data)
    rejected(tmp_path, f"key {KEY_A!r} appears twice")


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    saved(tmp_path)
    rewrite_header(tmp_path, lambda h: h["__metadata__"].update(format=5))
    rejected(tmp_path, "'__metadata__' must be an object of strings")


def test_wrong_dtype_and_shape_name_the_entry(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    saved(tmp_path)
    metadata = split(tmp_path / WEIGHTS_NAME)[0]["__metadata__"]
    save_file({KEY_A: TENSORS["fc.lora_A"].astype(np.int32), KEY_B: TENSORS["fc.lora_B"]}, str(tmp_path / WEIGHTS_NAME), metadata)
    rejected(tmp_path, WEIGHTS_NAME, repr(KEY_A), "dtype int32")
    save_file({KEY_A: TENSORS["fc.lora_A"].T.copy(), KEY_B: TENSORS["fc.lora_B"]}, str(tmp_path / WEIGHTS_NAME), metadata)
    rejected(tmp_path, repr(KEY_A), "has shape (3, 2), expected (2, 3)")


def test_missing_and_unexpected_keys_strict_by_default(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    saved(tmp_path)
    metadata = split(tmp_path / WEIGHTS_NAME)[0]["__metadata__"]
    save_file({KEY_A: TENSORS["fc.lora_A"]}, str(tmp_path / WEIGHTS_NAME), metadata)
    rejected(tmp_path, WEIGHTS_NAME, "missing tensor(s)", repr(KEY_B))
    extra = {KEY_A: TENSORS["fc.lora_A"], KEY_B: TENSORS["fc.lora_B"], "base_model.model.other.weight": np.ones(2, np.float32)}
    save_file(extra, str(tmp_path / WEIGHTS_NAME), metadata)
    rejected(tmp_path, "unexpected tensor(s) 'base_model.model.other.weight'", "strict=False")
    files = read_adapter(str(tmp_path))
    assert set(match_tensors(files.plan, files.tensors, "f", strict=False)) == set(TENSORS)


def test_the_same_tensor_stored_twice_is_rejected(tmp_path: Path) -> None:
    tensors = {KEY_A: TENSORS["fc.lora_A"], KEY_B: TENSORS["fc.lora_B"], "fc.lora_A.weight": TENSORS["fc.lora_A"]}
    with pytest.raises(AdapterError, match="stored twice"):
        match_tensors(PLAN, tensors, "f")


def test_bf16_tensors_are_read_exactly(tmp_path: Path) -> None:
    """HF PEFT adapters of bf16 models store BF16; numpy has no such type, so they widen to float32."""
    saved(tmp_path)
    values = np.array([1.0, -2.5, 3.140625, 0.0, 2.0**-10, -65536.0], np.float32)
    words = (values.view(np.uint32) >> 16).astype("<u2")  # these values are exact in bf16

    def to_bf16(header: dict[str, Any]) -> None:
        header[KEY_A].update(dtype="BF16", data_offsets=[0, 12])
        header[KEY_B].update(data_offsets=[12, 28])

    rewrite_header(tmp_path, to_bf16, lambda data: words.tobytes() + data[24:])
    files = read_adapter(str(tmp_path))
    assert files.tensors[KEY_A].dtype == np.float32
    np.testing.assert_array_equal(files.tensors[KEY_A].ravel(), values)
    np.testing.assert_array_equal(files.tensors[KEY_B], TENSORS["fc.lora_B"])


# -- the config and the peftcore metadata -------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "must be a JSON object"),
        ('"lora"', "must be a JSON object"),
        ("{not json", "not a readable JSON file"),
        (b"\xff\xfe{}", "not a readable JSON file"),
        ("[" * 100000 + "]" * 100000, "not a readable JSON file"),
        ('{"peft_type": "LORA", "r": "8"}', "r must be int"),
        ('{"peft_type": "LORA", "r": 2.5}', "r must be int"),
        ('{"peft_type": "LORA", "lora_alpha": NaN}', "NaN is not valid JSON"),
        ('{"peft_type": "LORA", "lora_alpha": 1e999}', "out of range"),
        ('{"peft_type": "LORA", "target_modules": 5}', "target_modules"),
        ('{"peft_type": "LORA", "rank_pattern": []}', "rank_pattern must be a dict"),
        ('{"peft_type": "LORA", "not_a_field": 1}', "has no field 'not_a_field'"),
        ('{"peft_type": "NO_SUCH_METHOD"}', "unknown PEFT method 'NO_SUCH_METHOD'"),
        ('{"r": 8}', "no valid 'peft_type'"),
        ('{"peft_type": ["LORA"]}', "no valid 'peft_type'"),
    ],
)
def test_bad_config_json_names_the_file(tmp_path: Path, content: Any, message: str) -> None:
    saved(tmp_path)
    path = tmp_path / CONFIG_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rejected(tmp_path, str(path), message)


@pytest.mark.filterwarnings("ignore:.*differs from the config saved with")
@pytest.mark.parametrize("field, value", [("inference_mode", "yes"), ("base_model_name_or_path", 5)])
def test_shared_config_fields_with_wrong_types(tmp_path: Path, field: str, value: Any) -> None:
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**CONFIG.to_dict(), field: value}))
    rejected(tmp_path, str(tmp_path / CONFIG_NAME), field)


def test_oversized_config_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peftcore.io

    saved(tmp_path)
    monkeypatch.setattr(peftcore.io, "MAX_CONFIG_BYTES", 64)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**CONFIG.to_dict(), "base_model_name_or_path": "x" * 100}))
    rejected(tmp_path, "larger than 64 bytes")


@pytest.mark.parametrize(
    "record, message",
    [
        ("[]", "no 'plan' entry"),
        ('{"plan": {"ops": 3}}', "missing"),
        ('{"plan": {"method": "lora", "adapter_name": "a", "ops": [{"op": "rm -rf"}]}}', "unknown plan op 'rm -rf'"),
        ('{"plan": {"method": "lora", "adapter_name": "a", "ops": [{"op": "lora", "r": "2"}]}}', "field 'r' must be int"),
        ('{"format_version": 99, "plan": {}}', "newer than this peftcore"),
        ('{"format_version": "1", "plan": {}}', "format_version must be an integer"),
        ('{"plan": {}, "config": [1]}', "'config' must be an object"),
        ("[" * 50000, "bad 'peftcore' metadata"),
    ],
)
def test_bad_peftcore_metadata_names_the_file(tmp_path: Path, record: str, message: str) -> None:
    saved(tmp_path)
    rewrite_header(tmp_path, lambda h: h["__metadata__"].update(peftcore=record))
    rejected(tmp_path, WEIGHTS_NAME, "bad 'peftcore' metadata", message)


def test_config_saved_with_the_weights_wins_over_a_stale_json(tmp_path: Path) -> None:
    """The state a save leaves if killed between its two renames: new JSON, old weights."""
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(CONFIG.replace(r=4, lora_alpha=16).to_dict()))
    with pytest.warns(UserWarning, match="differs from the config saved with"):
        files = read_adapter(str(tmp_path))
    assert files.config == CONFIG
    # the same config, merely re-formatted, is no conflict
    (tmp_path / CONFIG_NAME).write_text(json.dumps(CONFIG.to_dict(), indent=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_adapter(str(tmp_path)).config == CONFIG


# -- names cannot escape the save directory -----------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "..", ".", "/abs/path", "a/b", "a\\b", "c:evil", "x\0y", CONFIG_NAME, WEIGHTS_NAME, "", 3])
def test_adapter_names_cannot_escape(tmp_path: Path, name: Any) -> None:
    with pytest.raises(AdapterError, match="adapter name"):
        check_adapter_name(name)
    with pytest.raises(AdapterError, match="adapter name"):
        adapter_subdir(str(tmp_path), name)


def test_plain_names_stay_inside(tmp_path: Path) -> None:
    for name in ["default", "my-adapter", "v1.2", "..hidden", "a..b"]:
        path = Path(adapter_subdir(str(tmp_path), name)).resolve()
        assert path == tmp_path.resolve() or path.parent == tmp_path.resolve()


# -- through the torch backend: a rejected load changes nothing -------------------------------
def test_torch_rejected_loads_leave_the_model_untouched(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import peftcore

    def model() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    trained = peftcore.get_peft_model(model(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    trained.save_pretrained(tmp_path / "good")
    peft_model = peftcore.get_peft_model(model(), LoraConfig(r=2, target_modules=["0"]))
    before = {k: v.clone() for k, v in peft_model.model.state_dict().items()}
    modules_before = [type(m).__name__ for m in peft_model.model.modules()]

    def check_untouched() -> None:
        assert list(peft_model.peft_config) == ["default"]
        assert [type(m).__name__ for m in peft_model.model.modules()] == modules_before
        after = peft_model.model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)

    bad = tmp_path / "bad"
    for damage, message in [
        (lambda h: h["base_model.model.2.lora_B.weight"].update(shape=[3, 4], data_offsets=h["base_model.model.2.lora_B.weight"]["data_offsets"]), "needs"),
        (lambda h: h["base_model.model.0.lora_A.weight"].update(dtype="I32"), "dtype int32"),
    ]:
        trained.save_pretrained(bad)
        rewrite_header(bad, damage)
        with pytest.raises(AdapterError, match=message):
            peft_model.load_adapter(bad, "other")
        check_untouched()
    for name in ["../escape", "/tmp/abs"]:
        with pytest.raises(AdapterError, match="adapter name"):
            peft_model.load_adapter(tmp_path / "good", name)
        check_untouched()
    with pytest.raises(AdapterError, match="adapter name"):
        peft_model.add_adapter("../x", LoraConfig(r=2, target_modules=["2"]))
    check_untouched()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good"]
    peft_model.load_adapter(tmp_path / "good", "other")  # the intact adapter still loads
