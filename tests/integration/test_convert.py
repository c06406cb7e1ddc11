"""``peftcore convert`` and :mod:`peftcore.convert`: adapters between HF PEFT's layout,
peftcore's, and SINGA ``save_states`` checkpoints.

HF PEFT adapters are made by the real ``peft`` package and checked by loading the
result in both libraries. SINGA checkpoints are checked two ways: a zip written here in
SINGA's format (runs everywhere, no SINGA), and a checkpoint from a real SINGA training
run in a SINGA interpreter (``$PEFTCORE_SINGA_PYTHON``, else ``/opt/singa-venv/bin/python``;
skipped, with the reason, where none can import SINGA).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from tests.subprocess_env import child_env

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import peftcore  # noqa: E402
from peftcore.cli import main  # noqa: E402
from peftcore.convert import check_hf_compatible, convert, load_adapter_dir  # noqa: E402
from peftcore.errors import AdapterError  # noqa: E402
from peftcore.io import read_adapter  # noqa: E402
from peftcore.plan import RewritePlan  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore.testing.toys import MLP, lora_deltas, reference_forward  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- helpers -----------------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def env_with_checkout() -> dict[str, str]:
    return child_env(ROOT, ROOT / "backends" / "torch", ROOT / "backends" / "singa")


def tiny_llama() -> Any:
    from examples.tiny_models import tiny_llama as build

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build().eval()


TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(TOKENS).logits.numpy()


@pytest.fixture
def hf_lora(tmp_path: Path) -> Path:
    """A LoRA adapter (q/v, r=4, random B, trained lm_head copy) saved by HF PEFT."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False,
    ))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


# -- HF PEFT <-> peftcore ----------------------------------------------------------------------
def test_hf_to_peftcore_without_a_model(hf_lora: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "peftcore", "convert", str(hf_lora), str(tmp_path / "pc")],
        capture_output=True, text=True, cwd=tmp_path, env=env_with_checkout(),
    )
    assert out.returncode == 0, out.stderr
    assert "(HF PEFT adapter) -> " in out.stdout and "lora adapter 'default': 5 layer op(s), 9 tensors" in out.stdout
    converted = read_adapter(str(tmp_path / "pc"))
    # the plan rebuilt from the file is the one the config gives on the real model
    expected = peftcore.get_peft_model(tiny_llama(), converted.config).plans["default"]
    assert converted.plan == expected
    assert set(converted.tensors) == set(load_file(str(hf_lora / WEIGHTS)))
    hf_model = peft.PeftModel.from_pretrained(tiny_llama(), str(hf_lora))
    ours = peftcore.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pc"))
    assert_close_to_scale(logits(ours), logits(hf_model))


def test_hf_to_peftcore_with_the_model_gives_the_same_plan(
    hf_lora: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    status, out, err = cli(capsys, "convert", hf_lora, tmp_path / "a", "--model", "examples.tiny_models:tiny_llama")
    assert status == 0, err
    status, out, err = cli(capsys, "convert", hf_lora, tmp_path / "b")
    assert status == 0, err
    assert read_adapter(str(tmp_path / "a")).plan == read_adapter(str(tmp_path / "b")).plan


def test_peftcore_to_hf_loads_in_hf_peft(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = peftcore.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="kaiming", modules_to_save=["lm_head"])
    model = peftcore.get_peft_model(tiny_llama(), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "pc")
    status, out, err = cli(capsys, "convert", tmp_path / "pc", tmp_path / "hf", "--to", "hf")
    assert status == 0, err
    assert "(peftcore adapter) -> " in out and "(HF PEFT adapter)" in out
    with safe_open(str(tmp_path / "hf" / WEIGHTS), framework="np") as handle:
        assert handle.metadata() == {"format": "pt"}
    saved = json.loads((tmp_path / "hf" / CONFIG).read_text())
    assert saved["init_lora_weights"] is True  # HF PEFT has no "kaiming" spelling
    hf_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "hf"))
    assert_close_to_scale(logits(hf_model), logits(model))
    assert read_adapter(str(tmp_path / "hf")).plan is None
    status, _, err = cli(capsys, "convert", tmp_path / "hf", tmp_path / "hf", "--to", "hf")
    assert status == 2 and "already holds an adapter" in err and "--force" in err
    status, _, err = cli(capsys, "convert", tmp_path / "hf", tmp_path / "hf", "--to", "hf", "--force")
    assert status == 0, err


def test_methods_hf_peft_lacks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from examples.tiny_models import digits_mlp

    model = peftcore.get_peft_model(digits_mlp(), peftcore.BitFitConfig(target_modules=["fc1"]))
    model.save_pretrained(tmp_path / "bitfit")
    status, _, err = cli(capsys, "convert", tmp_path / "bitfit", tmp_path / "hf", "--to", "hf")
    assert status == 2 and "HF PEFT has no 'BITFIT' method" in err
    assert not (tmp_path / "hf").exists()  # nothing half-written
    status, _, err = cli(capsys, "convert", tmp_path / "bitfit", tmp_path / "copy")
    assert status == 0, err  # peftcore -> peftcore just re-checks and copies
    residual = peftcore.ResidualPromptTuningConfig(num_virtual_tokens=4)
    with pytest.raises(AdapterError, match=r"bake it first \(PeftModel.bake\(\)\)"):
        check_hf_compatible(residual)


def test_damaged_hf_adapters_name_the_problem(hf_lora: Path, tmp_path: Path) -> None:
    tensors = load_file(str(hf_lora / WEIGHTS))
    config = json.loads((hf_lora / CONFIG).read_text())

    def variant(name: str, tensors: Mapping[str, np.ndarray], **changes: Any) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        save_file(dict(tensors), str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps({**config, **changes}))
        return folder

    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight' has shape \(4, 64\), expected \(8, 64\)"):
        load_adapter_dir(variant("rank", tensors, r=8))
    with pytest.raises(AdapterError, match="'model.norm.weight' is neither a LoRA tensor nor under a modules_to_save"):
        load_adapter_dir(variant("stray", {**tensors, "base_model.model.model.norm.weight": np.ones(64, np.float32)}))
    with pytest.raises(AdapterError, match="unexpected tensor.*v_proj"):
        load_adapter_dir(variant("untargeted", tensors, target_modules=["q_proj"]))
    lone_a = {k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(AdapterError, match=r"'model.layers.1.self_attn.q_proj' has LoRA tensors \['lora_A.weight'\]"):
        load_adapter_dir(variant("lone", lone_a))
    with pytest.raises(AdapterError, match="missing does not exist"):
        convert(tmp_path / "missing", tmp_path / "out")


def test_prompt_tuning_hf_adapter_needs_the_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.save_pretrained(tmp_path / "hf")
    status, _, err = cli(capsys, "convert", tmp_path / "hf", tmp_path / "pc")
    assert status == 2 and "can only be planned against its model (pass --model" in err
    monkeypatch.chdir(ROOT)
    status, out, err = cli(capsys, "convert", tmp_path / "hf", tmp_path / "pc", "--model", "examples.tiny_models:tiny_llama")
    assert status == 0, err
    assert read_adapter(str(tmp_path / "pc")).plan.method == "prompt_tuning"


# -- SINGA checkpoints, written here in SINGA's format ----------------------------------------
def write_singa_checkpoint(path: Path, model_states: Mapping[str, np.ndarray], aux_states: Mapping = {}) -> None:
    """A zip laid out as SINGA's ``Model.save_states`` writes it."""
    buffer = io.BytesIO()
    np.savez(buffer, **{**model_states, **aux_states})
    attrs = {name: {"state_type": 0, "shape": list(a.shape), "dtype": 0} for name, a in model_states.items()}
    attrs.update({name: {"state_type": 1, "shape": list(a.shape), "dtype": 0} for name, a in aux_states.items()})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("tensor_dict.npz", buffer.getvalue())
        archive.writestr("states_attr.json", json.dumps(attrs))


TWIN_FACTORY = """
import numpy as np
from peftcore.testing.toys import MLP
from peftcore_torch.toys import build_toy

def mlp():
    return build_toy(MLP, MLP.random_weights(np.random.default_rng(0)))
"""


@pytest.fixture
def singa_like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A SINGA-format checkpoint of the MLP toy with adapters 'default' and 'second'
    (LoRA on fc1 and block.fc2, head trained in full), plus what it must convert to."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twin_models.py").write_text(TWIN_FACTORY)
    rng = np.random.default_rng(3)
    weights = MLP.random_weights(np.random.default_rng(0))
    config = peftcore.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    (tmp_path / CONFIG).write_text(config.to_json())
    twin = peftcore.get_peft_model(mlp_twin(weights), config)
    plan = twin.plans["default"]
    (tmp_path / "plan.json").write_text(plan.to_json())
    states = {f"{k.rsplit('.', 1)[0]}.{'W' if k.endswith('weight') else 'b'}": v for k, v in weights.items()}
    expected: dict[str, dict[str, np.ndarray]] = {}
    for adapter in ("default", "second"):
        canonical = {name: rng.standard_normal(spec.shape).astype(np.float32) for name, spec in plan.tensor_specs().items()}
        expected[adapter] = canonical
        for name, value in canonical.items():
            path, _, tensor = name.rpartition(".")
            if tensor in ("lora_A", "lora_B"):  # stored transposed: A (in, r), B (r, out)
                states[f"{path}.{tensor}.{adapter}"] = value.T.copy()
            elif tensor == "weight":  # head.weight: layer.Linear W is (in, out)
                states[f"head.modules_to_save.{adapter}.W"] = value.T.copy()
            else:
                states[f"head.modules_to_save.{adapter}.b"] = value
    write_singa_checkpoint(tmp_path / "ckpt.zip", states, {"epoch": np.array([3.0], np.float32)})
    return {"dir": tmp_path, "weights": weights, "plan": plan, "expected": expected, "states": states}


def mlp_twin(weights: Mapping[str, np.ndarray]) -> Any:
    from peftcore_torch.toys import build_toy

    return build_toy(MLP, weights)


def test_singa_checkpoint_to_canonical_layout(singa_like: dict, capsys: pytest.CaptureFixture) -> None:
    folder = singa_like["dir"]
    common = ["--config", folder / CONFIG, "--adapter-name", "default"]
    status, out, err = cli(capsys, "convert", folder / "ckpt.zip", folder / "from_model", "--model", "twin_models:mlp", *common)
    assert status == 0, err
    assert "(SINGA checkpoint) -> " in out and "lora adapter 'default': 3 layer op(s), 6 tensors" in out
    status, out, err = cli(capsys, "convert", folder / "ckpt.zip", folder / "from_plan", "--plan", folder / "plan.json", *common)
    assert status == 0, err
    for name in ("from_model", "from_plan"):
        converted = read_adapter(str(folder / name))
        assert converted.plan == singa_like["plan"]
        loaded = peftcore.PeftModel.from_pretrained(mlp_twin(singa_like["weights"]), str(folder / name))
        tensors = loaded.export_adapter("default")
        for key, value in singa_like["expected"]["default"].items():
            np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    # the converted adapter computes what the SINGA model did: W + scaling * B @ A, head replaced
    x = MLP.random_inputs(np.random.default_rng(5))
    expected = singa_like["expected"]["default"]
    weights = {**singa_like["weights"], "head.weight": expected["head.weight"], "head.bias": expected["head.bias"]}
    reference = reference_forward(MLP, weights, x, [lora_deltas(singa_like["plan"], expected)])
    assert_close_to_scale(loaded.backend.conformance_kit().forward(loaded.model, x), reference)


def test_singa_checkpoint_adapter_choice_and_hf_output(singa_like: dict, capsys: pytest.CaptureFixture) -> None:
    folder = singa_like["dir"]
    base = ["convert", folder / "ckpt.zip"]
    status, _, err = cli(capsys, *base, folder / "x", "--config", folder / CONFIG, "--plan", folder / "plan.json")
    assert status == 2 and "several adapters of this plan in the checkpoint (found: 'default', 'second')" in err
    assert "--adapter-name" in err
    status, _, err = cli(capsys, *base, folder / "x", "--config", folder / CONFIG, "--plan", folder / "plan.json",
                         "--adapter-name", "third")
    assert status == 2 and "no adapter 'third'" in err
    status, _, err = cli(capsys, *base, folder / "x", "--config", folder / CONFIG)
    assert status == 2 and "needs the adapter's plan" in err
    status, _, err = cli(capsys, *base, folder / "x", "--plan", folder / "plan.json")
    assert status == 2 and "needs the adapter's config" in err
    status, out, err = cli(capsys, *base, folder / "hf", "--to", "hf", "--config", folder / CONFIG,
                           "--plan", folder / "plan.json", "--adapter-name", "second")
    assert status == 0, err
    hf_model = peft.PeftModel.from_pretrained(mlp_twin(singa_like["weights"]), str(folder / "hf"))
    x = MLP.random_inputs(np.random.default_rng(6))
    expected = singa_like["expected"]["second"]
    weights = {**singa_like["weights"], "head.weight": expected["head.weight"], "head.bias": expected["head.bias"]}
    reference = reference_forward(MLP, weights, x, [lora_deltas(singa_like["plan"], expected)])
    with torch.no_grad():
        assert_close_to_scale(hf_model(torch.from_numpy(x)).numpy(), reference)


def test_singa_square_saved_weight_needs_the_layer_type(tmp_path: Path) -> None:
    from peftcore.graph import ModelGraph
    from peftcore_singa.checkpoint import singa_adapter_tensors

    weights = MLP.random_weights(np.random.default_rng(0))
    twin = peftcore.get_peft_model(mlp_twin(weights), peftcore.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["block"]))
    plan, graph = twin.plans["default"], twin.model_graph
    rng = np.random.default_rng(1)
    a, b, square = (rng.standard_normal(s).astype(np.float32) for s in ((2, 12), (16, 2), (16, 16)))
    write_singa_checkpoint(tmp_path / "sq.zip", {
        "fc1.lora_A.default": a.T.copy(), "fc1.lora_B.default": b.T.copy(), "block.modules_to_save.default.fc2.W": square,
    })
    with pytest.raises(AdapterError, match="'block.modules_to_save.default.fc2.W' is a square weight.*--model"):
        singa_adapter_tensors(str(tmp_path / "sq.zip"), plan, None, None)

    def as_singa(type_name: str) -> ModelGraph:
        layers = [dataclasses.replace(n, type_name=type_name) if n.path == "block.fc2" else n for n in graph.layers]
        return dataclasses.replace(graph, layers=tuple(layers), backend="singa")

    _, linear = singa_adapter_tensors(str(tmp_path / "sq.zip"), plan, None, as_singa("Linear"))
    np.testing.assert_array_equal(linear["block.fc2.weight"], square.T)  # layer.Linear stores (in, out)
    _, gemm = singa_adapter_tensors(str(tmp_path / "sq.zip"), plan, None, as_singa("Gemm"))
    np.testing.assert_array_equal(gemm["block.fc2.weight"], square)
    np.testing.assert_array_equal(gemm["fc1.lora_A"], a)


def test_singa_bitfit_checkpoint(tmp_path: Path) -> None:
    weights = MLP.random_weights(np.random.default_rng(0))
    config = peftcore.BitFitConfig(target_modules=["fc1", "head"])
    plan = peftcore.get_peft_model(mlp_twin(weights), config).plans["default"]
    biases = {"fc1": np.arange(16, dtype=np.float32), "head": np.arange(5, dtype=np.float32) / 5}
    write_singa_checkpoint(tmp_path / "bitfit.zip", {f"{k}.bitfit_bias.default": v for k, v in biases.items()})
    adapter = convert(tmp_path / "bitfit.zip", tmp_path / "out", config=config, plan=plan)
    assert adapter.plan == plan and set(adapter.tensors) == {"fc1.bias", "head.bias"}
    for layer, value in biases.items():
        np.testing.assert_array_equal(read_adapter(str(tmp_path / "out")).tensors[f"base_model.model.{layer}.bias"], value)


def test_bad_singa_checkpoints_are_refused_without_unpickling(tmp_path: Path, singa_like: dict) -> None:
    config = peftcore.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    plan = singa_like["plan"]
    states = dict(singa_like["states"])
    buffer = io.BytesIO()
    np.savez(buffer, **{**states, "fc1.lora_A.default": np.array([object()], dtype=object)})
    with zipfile.ZipFile(tmp_path / "pickled.zip", "w") as archive:
        archive.writestr("tensor_dict.npz", buffer.getvalue())
    with pytest.raises(AdapterError, match="tensor_dict.npz: tensor 'fc1.lora_A.default': holds Python objects"):
        convert(tmp_path / "pickled.zip", tmp_path / "out", config=config, plan=plan, adapter_name="default")
    write_singa_checkpoint(tmp_path / "int.zip", {**states, "fc1.lora_B.second": np.ones((2, 16), np.int32)})
    with pytest.raises(AdapterError, match="'fc1.lora_B.second' has dtype int32"):
        convert(tmp_path / "int.zip", tmp_path / "out", config=config, plan=plan, adapter_name="second")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(AdapterError, match=r"neither an adapter directory nor a checkpoint format a backend reads \(SINGA save_states"):
        convert(tmp_path / "notes.txt", tmp_path / "out", config=config, plan=plan)
    assert not (tmp_path / "out").exists()


# -- a real SINGA run ---------------------------------------------------------------------------
SINGA_RUN = r"""
import contextlib, sys
import numpy as np
from peftcore_singa.compat import import_singa
import_singa()
from singa import opt, tensor
import peftcore
from peftcore.cli import main
from peftcore.testing.toys import MLP
from peftcore_singa.toys import build_toy, toy_forward

from peftcore.testing.toys import TOKEN_MODEL

rng = np.random.default_rng(7)
x, y = MLP.random_inputs(rng), rng.standard_normal((7, 5)).astype(np.float32)
batches = {MLP: (x, y), TOKEN_MODEL: (TOKEN_MODEL.random_inputs(rng), rng.standard_normal((4, 3)).astype(np.float32))}

def trained(adapters, spec=MLP):
    x, y = batches[spec]
    model = build_toy(spec, spec.random_weights(np.random.default_rng(0)))
    model.set_optimizer(opt.SGD(lr=0.1))
    peft = None
    for name, config in adapters:
        if peft is None:
            peft = peftcore.get_peft_model(model, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
        peft.set_adapter(name)
        tx = tensor.from_numpy(x)
        tx.requires_grad = False
        model.train()
        model(tx, tensor.from_numpy(y))  # one SGD step on this adapter
    return model, peft

def save(model, peft, name):
    model.save_states(f"{name}.zip")
    peft.save_pretrained(f"{name}_ref")
    for adapter, plan in peft.plans.items():
        with open(f"{name}_{adapter}_plan.json", "w") as handle:
            handle.write(plan.to_json())

model, peft = trained([
    ("default", peftcore.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                                    init_lora_weights=False)),
    ("second", peftcore.LoraConfig(r=3, target_modules=["fc1"], modules_to_save=["head"], init_lora_weights=False)),
])
save(model, peft, "two")
peft.set_adapter("default")
np.save("two_default_out.npy", toy_forward(model, x))
np.save("inputs.npy", x)

model, peft = trained([("default", peftcore.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"]))])
save(model, peft, "square")
with open("singa_models.py", "w") as handle:
    handle.write("import numpy as np\nfrom peftcore.testing.toys import MLP\nfrom peftcore_singa.toys import build_toy\n"
                 "def mlp():\n    return build_toy(MLP, MLP.random_weights(np.random.default_rng(0)))\n")
model, peft = trained([("default", peftcore.BitFitConfig(target_modules=["fc1", "head"]))])
save(model, peft, "bitfit")
model, peft = trained([
    ("default", peftcore.PromptTuningConfig(num_virtual_tokens=3)),
    ("residual", peftcore.ResidualPromptTuningConfig(num_virtual_tokens=2, bottleneck_size=4)),
], spec=TOKEN_MODEL)
save(model, peft, "prompt")

with open("square_cli_plan.json", "w") as handle, contextlib.redirect_stdout(handle):
    assert main(["plan", "--model", "singa_models:mlp", "--config", "square_ref/adapter_config.json", "--json"]) == 0
sys.exit(main(["convert", "square.zip", "square_via_singa_model", "--model", "singa_models:mlp",
               "--config", "square_ref/adapter_config.json"]))
"""


def singa_python() -> str:
    """An interpreter that can import SINGA, or skip saying why there is none."""
    candidates = [os.environ.get("PEFTCORE_SINGA_PYTHON", ""), "/opt/singa-venv/bin/python", sys.executable]
    probe = "from peftcore_singa.plugin import peftcore_backend as i; info = i().info(); print(info.available, info.reason)"
    reasons = []
    for python in dict.fromkeys(c for c in candidates if c):
        if not os.path.exists(python):
            reasons.append(f"{python}: not found")
            continue
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env_with_checkout(), timeout=120)
        if done.returncode == 0 and done.stdout.startswith("True"):
            return python
        reasons.append(f"{python}: {(done.stdout or done.stderr).strip().splitlines()[-1:]}")
    pytest.skip("no Python here can import SINGA (" + "; ".join(reasons) + ")")


def test_checkpoint_of_a_real_singa_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    python = singa_python()
    done = subprocess.run([python, "-c", SINGA_RUN], capture_output=True, text=True, cwd=tmp_path,
                          env=env_with_checkout(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    def same(converted_dir: Path, reference_dir: Path) -> None:
        converted, reference = read_adapter(str(converted_dir)), read_adapter(str(reference_dir))
        assert converted.plan == reference.plan and converted.config == reference.config
        assert set(converted.tensors) == set(reference.tensors)
        for key, value in reference.tensors.items():
            np.testing.assert_array_equal(converted.tensors[key], value, err_msg=key)

    # with SINGA's own layer types (--model, in the SINGA run): square saved weights too
    same(tmp_path / "square_via_singa_model", tmp_path / "square_ref")
    cli_plan = RewritePlan.from_json((tmp_path / "square_cli_plan.json").read_text())  # `peftcore plan --json`
    assert cli_plan == RewritePlan.from_json((tmp_path / "square_default_plan.json").read_text())
    # here, without SINGA: the plan comes from a file
    for adapter, reference in (("default", tmp_path / "two_ref"), ("second", tmp_path / "two_ref" / "second")):
        status, _, err = cli(capsys, "convert", tmp_path / "two.zip", tmp_path / f"two_{adapter}",
                             "--config", reference / CONFIG, "--plan", tmp_path / f"two_{adapter}_plan.json",
                             "--adapter-name", adapter)
        assert status == 0, err
        same(tmp_path / f"two_{adapter}", reference)
    # the other methods the SINGA backend builds (their tensors are stored in canonical layout)
    for name, adapter, reference in (("bitfit", "default", tmp_path / "bitfit_ref"),
                                     ("prompt", "default", tmp_path / "prompt_ref"),
                                     ("prompt", "residual", tmp_path / "prompt_ref" / "residual")):
        status, _, err = cli(capsys, "convert", tmp_path / f"{name}.zip", tmp_path / f"{name}_{adapter}",
                             "--config", reference / CONFIG, "--plan", tmp_path / f"{name}_{adapter}_plan.json",
                             "--adapter-name", adapter)
        assert status == 0, err
        same(tmp_path / f"{name}_{adapter}", reference)
    status, _, err = cli(capsys, "convert", tmp_path / "square.zip", tmp_path / "square", "--config",
                         tmp_path / "square_ref" / CONFIG, "--plan", tmp_path / "square_default_plan.json")
    assert status == 2 and "square weight" in err
    # the SINGA-trained adapter, written for HF PEFT, gives SINGA's outputs in torch
    status, _, err = cli(capsys, "convert", tmp_path / "two.zip", tmp_path / "two_hf", "--to", "hf", "--config",
                         tmp_path / "two_ref" / CONFIG, "--plan", tmp_path / "two_default_plan.json", "--adapter-name", "default")
    assert status == 0, err
    hf_model = peft.PeftModel.from_pretrained(mlp_twin(MLP.random_weights(np.random.default_rng(0))), str(tmp_path / "two_hf"))
    with torch.no_grad():
        out = hf_model(torch.from_numpy(np.load(tmp_path / "inputs.npy"))).numpy()
    assert_close_to_scale(out, np.load(tmp_path / "two_default_out.npy"))


def test_a_plugins_checkpoint_format_is_read_by_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Framework checkpoint layouts come from plugins (the SINGA one included): a third
    party's format is recognised and read the same way."""
    from peftcore import hookimpl
    from peftcore.plugins import get_plugin_manager, reset_plugin_manager

    config = peftcore.LoraConfig(r=2, target_modules=["fc1"])
    weights = MLP.random_weights(np.random.default_rng(0))
    plan = peftcore.get_peft_model(mlp_twin(weights), config).plans["default"]
    canonical = {name: np.full(spec.shape, 0.5, np.float32) for name, spec in plan.tensor_specs().items()}

    class TextFormat:
        name, description = "text", "text checkpoint (*.txtckpt)"

        def recognises(self, path: Any) -> bool:
            return str(path).endswith(".txtckpt")

        def adapter_tensors(self, path: str, plan: RewritePlan, adapter_name: Any, graph: Any) -> Any:
            return adapter_name or "default", dict(canonical)

    class TextPlugin:
        @hookimpl
        def peftcore_checkpoint_formats(self) -> Any:
            return [TextFormat()]

    reset_plugin_manager()
    try:
        get_plugin_manager().register(TextPlugin(), "text-format")
        (tmp_path / "model.txtckpt").write_text("anything")
        adapter = convert(tmp_path / "model.txtckpt", tmp_path / "out", "peftcore", config=config, plan=plan)
        assert adapter.layout == "text"
        loaded = peftcore.PeftModel.from_pretrained(mlp_twin(weights), str(tmp_path / "out")).export_adapter("default")
        for key, value in canonical.items():
            np.testing.assert_array_equal(loaded[key], value)
        (tmp_path / "other.bin").write_bytes(b"\0")
        with pytest.raises(AdapterError, match=r"neither an adapter directory nor a checkpoint format.*text checkpoint"):
            convert(tmp_path / "other.bin", tmp_path / "out2", "peftcore", config=config, plan=plan)
    finally:
        reset_plugin_manager()
