"""The command line and the demo, run as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "peftcore", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_plan_dry_run_prints_layers_counts_and_json() -> None:
    out = run("plan", "--model", "examples.tiny_models:tiny_llama", "--set", "r=4", "--set", "target_modules=all-linear")
    assert out.returncode == 0, out.stderr
    assert "layers adapted: 14" in out.stdout
    assert "model.layers.0.self_attn.q_proj" in out.stdout and "lm_head" not in out.stdout.split("plan:")[0]
    plan = json.loads(out.stdout.split("plan:\n", 1)[1])
    assert plan["method"] == "lora" and len(plan["ops"]) == 15
    assert "trainable parameters: " in out.stdout


def test_plan_json_only_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["fc1", "fc2"]}))
    out = run("plan", "--model", "examples.tiny_models:digits_mlp", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    ops = json.loads(out.stdout)["ops"]
    assert [op.get("path") for op in ops] == ["", "fc1", "fc2"]


def test_plan_errors_are_one_clear_line() -> None:
    out = run("plan", "--model", "examples.tiny_models:digits_mlp", "--set", "target_modules=fc3")
    assert out.returncode == 2
    assert out.stderr.startswith("peftcore: error: LoraConfig: target_modules ['fc3'] matched no layer") and "fc1" in out.stderr
    out = run("plan", "--model", "no_such_module:f")
    assert out.returncode == 2 and "cannot import 'no_such_module'" in out.stderr
    out = run("plan", "--model", "examples.tiny_models:digits_mlp", "--set", "rank=3")
    assert out.returncode == 2 and "no field 'rank'" in out.stderr


def test_backends_command() -> None:
    out = run("backends")
    assert out.returncode == 0 and "torch (PyTorch): available" in out.stdout and "singa" in out.stdout


@pytest.mark.slow
def test_demo_lora_beats_the_base_model(tmp_path: Path) -> None:
    out = run("demo", "--epochs", "10")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    before = float(next(l for l in lines if "base model" in l).rsplit(" ", 1)[1])
    after = float(next(l for l in lines if "after LoRA" in l).rsplit(" ", 1)[1])
    assert before < 0.6 and after > 0.9, out.stdout
    assert "trainable parameters:" in out.stdout
