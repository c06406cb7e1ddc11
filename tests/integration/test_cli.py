"""The command line, run as a user would: every invocation the README shows.

One subprocess run (``python -m peftcore ...``) per command checks the real entry
point; the other cases call :func:`peftcore.cli.main` in-process, which is much faster.
``peftcore convert`` is tested in ``test_convert.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftcore.cli import main
from peftcore.cli.tree import build_tree, render_tree
from peftcore.errors import PeftCoreError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.plugins import get_plugin_manager
from peftcore.registry import PeftRegistry
from tests.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m peftcore ARGS`` with this checkout first on the path."""
    env = child_env(ROOT)
    return subprocess.run([sys.executable, "-m", "peftcore", *args], capture_output=True, text=True, cwd=cwd, env=env)


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``peftcore ARGS`` in-process: (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # `--model examples.tiny_models:...` is found from the current directory


# -- plan ------------------------------------------------------------------------------------
def test_plan_dry_run_prints_layers_counts_and_json() -> None:
    out = run("plan", "--model", "examples.tiny_models:tiny_llama", "--set", "r=4", "--set", "target_modules=all-linear")
    assert out.returncode == 0, out.stderr
    assert "layers adapted: 14" in out.stdout
    assert "model.layers.0.self_attn.q_proj" in out.stdout and "lm_head" not in out.stdout.split("plan:")[0]
    plan = json.loads(out.stdout.split("plan:\n", 1)[1])
    assert plan["method"] == "lora" and len(plan["ops"]) == 15
    assert "trainable parameters: 8,704 of 107,328 (8.1097%)" in out.stdout  # 2 x (4 x 512 + 3 x 768)


def test_plan_json_only_and_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["fc1", "fc2"]}))
    status, out, err = cli(capsys, "plan", "--model", "examples.tiny_models:digits_mlp", "--config", str(config), "--json")
    assert status == 0, err
    ops = json.loads(out)["ops"]
    assert [op.get("path") for op in ops] == ["", "fc1", "fc2"]
    assert [op.get("scaling") for op in ops[1:]] == [2.0, 2.0]


def test_plan_errors_are_one_clear_line(capsys: pytest.CaptureFixture) -> None:
    status, _, err = cli(capsys, "plan", "--model", "examples.tiny_models:digits_mlp", "--set", "target_modules=fc3")
    assert status == 2
    assert err.startswith("peftcore: error: LoraConfig: target_modules ['fc3'] matched no layer") and "fc1" in err
    assert len(err.strip().splitlines()) == 1
    status, _, err = cli(capsys, "plan", "--model", "no_such_module:f")
    assert status == 2 and "cannot import 'no_such_module'" in err
    status, _, err = cli(capsys, "plan", "--model", "examples.tiny_models:digits_mlp", "--set", "rank=3")
    assert status == 2 and "no field 'rank'" in err
    status, _, err = cli(capsys, "plan", "--model", "examples.tiny_models", "--set", "r=3")
    assert status == 2 and "MODULE:FACTORY or a model directory" in err


# -- habits every command line has -------------------------------------------------------------
def test_version_and_help_without_a_command(capsys: pytest.CaptureFixture) -> None:
    import peftcore

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"peftcore {peftcore.__version__}"
    out = run()  # no command: the help, not an argparse error
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: peftcore") and "COMMAND" in out.stdout
    for command in ("backends", "inspect", "plan", "convert", "demo"):
        assert f"  {command} " in out.stdout and f"  peftcore {command}" in out.stdout


def test_every_option_has_help_and_every_command_an_example() -> None:
    import argparse

    from peftcore.cli import make_parser

    parser = make_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == ["backends", "convert", "demo", "inspect", "plan"]
    for name, command in [("peftcore", parser), *subparsers.choices.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        text = command.format_help()
        assert "examples:\n  peftcore " in text, f"{name} --help shows no example"
    assert "--seed N" in subparsers.choices["demo"].format_help()


# -- backends --------------------------------------------------------------------------------
def test_backends_table() -> None:
    out = run("backends")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["backend", "framework", "available", "version", "methods"]
    torch_row = next(line for line in lines if line.startswith("torch "))
    assert "PyTorch" in torch_row and " yes " in torch_row and "lora" in torch_row
    singa = get_plugin_manager().backends()["singa"].info
    singa_row = next(line for line in lines if line.startswith("singa "))
    if singa.available:
        assert " yes " in singa_row and "lora" in singa_row
    else:  # the reason is printed below the table
        assert " no " in singa_row
        assert f"singa: unavailable: {singa.reason}" in out.stdout


def test_backends_json_derives_methods_from_ops(capsys: pytest.CaptureFixture) -> None:
    status, out, err = cli(capsys, "backends", "--json")
    assert status == 0, err
    records = {r["name"]: r for r in json.loads(out)["backends"]}
    torch = records["torch"]
    assert torch["available"] and torch["version"] and set(PeftRegistry.ops_of("lora")) <= set(torch["ops"])
    assert "lora" in torch["methods"]
    for method in PeftRegistry.names():  # every method is either buildable or listed with what it lacks
        assert (method in torch["methods"]) != (method in torch["missing"])
        assert set(torch["missing"].get(method, ())) == set(PeftRegistry.ops_of(method)) - set(torch["ops"])


def test_backends_notes_say_why_a_method_is_missing_or_limited() -> None:
    from peftcore.cli.backends import render_backends

    record = {
        "name": "fake", "framework": "Fake", "available": True, "reason": "", "version": "1", "ops": [],
        "methods": ["lora", "prompt_tuning"], "missing": {"prefix_tuning": ["prefix_encoder"]},
        "limitations": {
            "prefix_tuning": "no attention", "prompt_tuning": "one submodule only", "ia3": "unused",
            "dora": "no magnitude vector",
        },
    }
    lines = render_backends([record], [])
    assert lines[1].split()[-2:] == ["lora,", "prompt_tuning"]
    assert lines[3:] == [
        "fake: cannot build prefix_tuning (no builder for prefix_encoder): no attention",
        "fake: prompt_tuning is limited: one submodule only",
        "fake: cannot build dora: no magnitude vector",  # a form of a method (LoraConfig(use_dora=True))
    ]


def test_methods_declare_their_ops() -> None:
    assert PeftRegistry.ops_of("lora") == ("freeze_base", "lora", "lora_conv", "base_bias", "modules_to_save")
    assert PeftRegistry.missing_ops(["freeze_base"])["lora"] == ["base_bias", "lora", "lora_conv", "modules_to_save"]
    assert PeftRegistry.missing_ops(PeftRegistry.ops_of("lora"))["lora"] == []
    # other tests register throwaway methods in this process; check the shipped ones
    for method in ("lora", "bitfit", "prompt_tuning", "residual_prompt_tuning", "unipelt", "ia3"):
        assert PeftRegistry.ops_of(method), f"method {method!r} declares no plan ops and defines none"


# -- inspect ---------------------------------------------------------------------------------
def test_inspect_marks_targets_with_counts() -> None:
    out = run("inspect", "--model", "examples.tiny_models:digits_mlp", "--set", "r=8", "--set", "target_modules=fc1,fc2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["layer", "type", "shape", "params", "adapter", "trainable"]
    fc1 = next(line for line in lines if "fc1" in line)
    assert "Linear" in fc1 and "64 -> 256" in fc1 and "16,640" in fc1 and "* lora r=8" in fc1 and "+2,560" in fc1
    act = next(line for line in lines if "act" in line)
    assert "ReLU" in act and "*" not in act
    assert "adapter 'default' (lora): * 2 layers, +4,688 trainable parameters" in out.stdout
    assert "trainable: 4,688 of 23,898 parameters (19.6167%)" in out.stdout


def test_inspect_tree_nests_by_path_and_folds_deep_layers(capsys: pytest.CaptureFixture) -> None:
    args = ["inspect", "--model", "examples.tiny_models:tiny_llama", "--set", "r=4", "--set", "target_modules=q_proj,v_proj"]
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    q_proj = [line for line in out.splitlines() if line.lstrip("│├└─ ").startswith("q_proj")]
    assert len(q_proj) == 2 and all("* lora r=4" in line and "+512" in line for line in q_proj)
    assert q_proj[0].index("q_proj") > out.splitlines()[1].index("LlamaForCausalLM") + 8  # indented 4 levels
    status, folded, err = cli(capsys, *args, "--max-depth", "2")
    assert status == 0, err
    assert "q_proj" not in folded
    layers = next(line for line in folded.splitlines() if "layers (+" in line)
    assert "* 4 adapted inside" in layers and "+2,048" in layers
    assert folded.splitlines()[-1] == out.splitlines()[-1]  # same totals


def test_inspect_json_and_without_config(capsys: pytest.CaptureFixture) -> None:
    status, out, err = cli(capsys, "inspect", "--model", "examples.tiny_models:digits_mlp", "--method", "lora",
                           "--set", "target_modules=fc2", "--set", "r=2", "--json")
    assert status == 0, err
    data = json.loads(out)
    assert data["model"] == "Sequential" and data["backend"] == "torch"
    fc2 = next(layer for layer in data["layers"] if layer["path"] == "fc2")
    assert fc2["ops"] == [{"op": "lora", "trainable": 532, "tensors": {"lora_A": [2, 256], "lora_B": [10, 2]}}]
    assert data["totals"] == {"base_params": 19210, "trainable_params": 532, "layers_adapted": 1}
    status, out, err = cli(capsys, "inspect", "--model", "examples.tiny_models:digits_mlp")
    assert status == 0, err
    assert "*" not in out and "no config given" in out and "19,210 parameters" in out


def test_inspect_a_transformers_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from examples.tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    status, out, err = cli(capsys, "inspect", "--model", str(tmp_path / "llama"), "--set", "target_modules=all-linear")
    assert status == 0, err
    assert out.splitlines()[1].startswith("LlamaForCausalLM")  # the class config.json names, so paths match adapters
    assert "* 14 layers" in out


def _tiny_bert_folder_and_seq_cls_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A MiniLM-like folder saved as a plain ``BertModel`` (its config.json names no head)
    and a SEQ_CLS LoRA adapter trained on ``BertForSequenceClassification`` (classifier saved)."""
    transformers = pytest.importorskip("transformers")
    import peftcore

    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "minilm")
    classifier = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "minilm")
    peft_model = peftcore.get_peft_model(
        classifier, peftcore.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "minilm", tmp_path / "adapter"


def test_a_seq_cls_adapter_on_a_plain_encoder_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, adapter = _tiny_bert_folder_and_seq_cls_adapter(tmp_path)
    config = str(adapter / "adapter_config.json")
    # the adapter's task_type picks the class: the classifier head is there, and saved in full
    status, out, err = cli(capsys, "inspect", "--model", str(folder), "--config", config)
    assert status == 0, err
    assert out.splitlines()[1].startswith("BertForSequenceClassification")
    assert "classifier" in out
    # --model-class overrides it; the class config.json names is the default without a task type
    status, out, err = cli(capsys, "inspect", "--model", str(folder), "--model-class", "BertForTokenClassification",
                           "--config", config)
    assert status == 0, err
    assert out.splitlines()[1].startswith("BertForTokenClassification")
    status, out, err = cli(capsys, "inspect", "--model", str(folder))
    assert status == 0, err
    assert out.splitlines()[1].startswith("BertModel")
    status, out, err = cli(capsys, "inspect", "--model", str(folder), "--model-class", "NoSuchModel")
    assert status == 2 and "'NoSuchModel' is not a transformers model class" in err
    # convert reads the task type from the adapter it converts
    status, out, err = cli(capsys, "convert", str(adapter), str(tmp_path / "hf"), "--to", "hf", "--model", str(folder))
    assert status == 0, err
    assert (tmp_path / "hf" / "adapter_model.safetensors").is_file()
    assert "classifier" in out


def test_inspect_ascii_tree_and_bad_depth(capsys: pytest.CaptureFixture) -> None:
    graph = ModelGraph(layers=(
        LayerNode("enc", "container"),
        LayerNode("enc.fc", "linear", "Linear", in_features=3, out_features=2, params={"weight": (2, 3)}),
        LayerNode("head", "linear", "Linear", in_features=2, out_features=1, params={"weight": (1, 2)}),
    ))
    lines = render_tree(build_tree(graph, None, "Toy"), ascii_only=True)
    assert [line.split()[0] for line in lines[1:]] == ["Toy", "|--", "|", "`--"]
    assert all(line.isascii() for line in lines)
    status, _, err = cli(capsys, "inspect", "--model", "examples.tiny_models:digits_mlp", "--max-depth", "-1")
    assert status == 2 and "--max-depth" in err


# -- demo ------------------------------------------------------------------------------------
def test_demo_plot_without_matplotlib_fails_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from peftcore.demo import run_demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(PeftCoreError, match="--plot needs matplotlib"):
        run_demo(epochs=1, plot=str(tmp_path / "loss.png"))
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.slow
def test_demo_lora_beats_the_base_model_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = run("demo", "--epochs", "10", "--plot", str(tmp_path / "loss.png"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    before = float(next(line for line in lines if "base model" in line).rsplit(" ", 1)[1])
    after = float(next(line for line in lines if "after LoRA" in line).rsplit(" ", 1)[1])
    assert before < 0.6 and after > 0.9, out.stdout
    assert "trainable parameters:" in out.stdout and f"loss curve saved to {tmp_path / 'loss.png'}" in out.stdout
    image: Any = __import__("matplotlib.image", fromlist=["imread"]).imread(tmp_path / "loss.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 600  # 7 x 3.8 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas
