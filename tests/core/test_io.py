"""Adapter files through the core alone (numpy), no framework."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from peftcore import AdapterError, LayerNode, LoraConfig, ModelGraph
from peftcore.io import WEIGHTS_NAME, adapter_subdir, match_tensors, read_adapter, save_adapter

GRAPH = ModelGraph(layers=(LayerNode("fc", "linear", "Linear", 3, 2, params={"weight": (2, 3)}),))
CONFIG = LoraConfig(r=2, target_modules=["fc"])
PLAN = CONFIG.plan(GRAPH)
TENSORS = {"fc.lora_A": np.ones((2, 3), np.float32), "fc.lora_B": np.full((2, 2), 0.5, np.float32)}


def test_save_then_read(tmp_path: Path) -> None:
    save_adapter(str(tmp_path), CONFIG, PLAN, TENSORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == {"base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"}
    files = read_adapter(str(tmp_path))
    assert files.config == CONFIG and files.plan == PLAN
    matched = match_tensors(files.plan, files.tensors, "x")
    np.testing.assert_array_equal(matched["fc.lora_B"], TENSORS["fc.lora_B"])


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "", "a\\b"])
def test_adapter_names_cannot_escape(tmp_path: Path, name: str) -> None:
    with pytest.raises(AdapterError, match="adapter name"):
        adapter_subdir(str(tmp_path), name)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(str(tmp_path / "nope"))
    with pytest.raises(AdapterError, match="adapter_config.json: file is missing"):
        read_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(CONFIG.to_dict()))
    with pytest.raises(AdapterError, match="adapter_model.safetensors: file is missing"):
        read_adapter(str(tmp_path))


def test_bad_config_json(tmp_path: Path) -> None:
    save_adapter(str(tmp_path), CONFIG, PLAN, TENSORS)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="adapter_config.json: adapter config must be a JSON object"):
        read_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not a readable JSON file"):
        read_adapter(str(tmp_path))


def test_truncated_weights(tmp_path: Path) -> None:
    save_adapter(str(tmp_path), CONFIG, PLAN, TENSORS)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        read_adapter(str(tmp_path))


def test_missing_unexpected_wrong_shape_and_dtype(tmp_path: Path) -> None:
    hf = {"base_model.model.fc.lora_A.weight": TENSORS["fc.lora_A"], "base_model.model.fc.lora_B.weight": TENSORS["fc.lora_B"]}
    with pytest.raises(AdapterError, match="missing tensor.*fc.lora_B.weight"):
        match_tensors(PLAN, {k: v for k, v in hf.items() if "lora_A" in k}, "f")
    with pytest.raises(AdapterError, match="unexpected tensor.*extra"):
        match_tensors(PLAN, {**hf, "extra": np.ones(1, np.float32)}, "f")
    assert set(match_tensors(PLAN, {**hf, "extra": np.ones(1, np.float32)}, "f", strict=False)) == set(TENSORS)
    with pytest.raises(AdapterError, match=r"fc.lora_A.weight' has shape \(3, 2\), expected \(2, 3\)"):
        match_tensors(PLAN, {**hf, "base_model.model.fc.lora_A.weight": np.ones((3, 2), np.float32)}, "f")
    with pytest.raises(AdapterError, match="dtype int32"):
        match_tensors(PLAN, {**hf, "base_model.model.fc.lora_A.weight": np.ones((2, 3), np.int32)}, "f")
    # keys without HF PEFT's prefix are accepted too
    assert set(match_tensors(PLAN, {k.replace("base_model.model.", ""): v for k, v in hf.items()}, "f")) == set(TENSORS)


def test_bad_plan_metadata(tmp_path: Path) -> None:
    save_adapter(str(tmp_path), CONFIG, PLAN, TENSORS)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"peftcore": "{\"plan\": {\"ops\": 3}}"})
    with pytest.raises(AdapterError, match="bad 'peftcore' metadata"):
        read_adapter(str(tmp_path))


def test_save_rejects_tensors_that_do_not_match_plan(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="do not match the plan"):
        save_adapter(str(tmp_path), CONFIG, PLAN, {"fc.lora_A": TENSORS["fc.lora_A"]})
    assert not (tmp_path / WEIGHTS_NAME).exists()
