"""torch backend behaviour beyond the shared conformance suite."""

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import AdapterError, LoraConfig, PeftModel, PlanError, UnsupportedLayerError  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch.lora import LoraEmbedding, LoraLinear  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(20, 16))
    model.add_module("fc1", nn.Linear(16, 32))
    model.add_module("act", nn.ReLU())
    model.add_module("norm", nn.LayerNorm(32))
    model.add_module("fc2", nn.Linear(32, 4))
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapters_live_on_the_base_device_and_dtype(device: str, dtype: Any, autocast: bool) -> None:
    """Adapters sit on the base layer's device; as in HF PEFT, a half-precision model's
    adapters are float32 unless ``autocast_adapter_dtype=False`` keeps the base dtype."""
    model = mlp().to(device=device, dtype=dtype)
    peft_model = peftcore.get_peft_model(
        model, LoraConfig(r=4, target_modules=["emb", "fc1", "fc2"]), autocast_adapter_dtype=autocast
    )
    expected = torch.float32 if autocast else dtype
    names = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert len(names) == 6
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.device.type == device and param.dtype == expected, name
    tokens = torch.randint(0, 20, (3, 5), device=device)
    if dtype == torch.float16 and device == "cpu" and not autocast:
        return  # LayerNorm in float16 on CPU is not what this test is about
    out = peft_model(tokens)
    assert out.shape == (3, 5, 4) and out.dtype == dtype
    with peft_model.disable_adapter():
        base_out = peft_model(tokens)
    torch.testing.assert_close(out, base_out)  # B starts at zero: the new adapter changes nothing yet
    # merging a float32 adapter into a half-precision weight keeps the weight's dtype
    peft_model.merge_adapter()
    assert peft_model.base_model.model.fc1.base_layer.weight.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_training_lowers_loss_and_touches_only_lora(device: str) -> None:
    model = mlp().to(device)
    original = copy.deepcopy(model.state_dict())
    peft_model = peftcore.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["fc1", "fc2"]))
    tokens = torch.randint(0, 20, (16, 5), device=device)
    target = torch.randint(0, 4, (16,), device=device)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(peft_model(tokens).mean(dim=1), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    for key, value in peft_model.model.state_dict().items():
        if "lora_" not in key:
            base_key = key.replace(".base_layer", "")
            assert torch.equal(value, original[base_key]), key
    merged_in_eval = peft_model.eval()(tokens)
    peft_model.merge_adapter()
    assert_close_to_scale(peft_model(tokens), merged_in_eval)


def test_dropout_only_in_train_mode_and_skipped_at_zero() -> None:
    peft_model = peftcore.get_peft_model(mlp(), LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False, target_modules=["fc1"]))
    layer = peft_model.model.fc1
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    x = torch.randn(8, 16)
    peft_model.eval()
    assert torch.equal(layer(x), layer(x))
    peft_model.train()
    assert not torch.equal(layer(x), layer(x))
    no_dropout = peftcore.get_peft_model(mlp(), LoraConfig(r=4, target_modules=["fc1"]))
    assert isinstance(no_dropout.model.fc1.lora_dropout["default"], nn.Identity)


def test_gaussian_init_and_unload_types() -> None:
    peft_model = peftcore.get_peft_model(mlp(), LoraConfig(r=8, init_lora_weights="gaussian", target_modules=["emb", "fc1"]))
    assert isinstance(peft_model.model.emb, LoraEmbedding) and isinstance(peft_model.model.fc1, LoraLinear)
    a = peft_model.model.fc1.lora_A["default"].weight
    assert abs(float(a.std()) - 1 / 8) < 0.03 and float(peft_model.model.fc1.lora_B["default"].weight.abs().sum()) == 0.0
    plain = peft_model.unload()
    assert type(plain.emb) is nn.Embedding and type(plain.fc1) is nn.Linear
    assert not any("lora" in name for name, _ in plain.named_parameters())


def test_is_trainable_and_inference_mode(tmp_path: Any) -> None:
    peft_model = peftcore.get_peft_model(mlp(), LoraConfig(r=2, target_modules=["fc1"]))
    peft_model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(mlp(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 16 + 32 * 2


def test_modules_to_save_trains_a_copy(tmp_path: Any) -> None:
    model = mlp()
    original_head = model.fc2.weight.detach().clone()
    peft_model = peftcore.get_peft_model(model, LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"]))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 2 * 16 + 32 * 2 + 32 * 4 + 4
    with torch.no_grad():
        peft_model.model.fc2.modules_to_save["default"].weight.add_(1.0)
    tokens = torch.randint(0, 20, (2, 3))
    out = peft_model(tokens)
    with peft_model.disable_adapter():
        assert not torch.allclose(peft_model(tokens), out)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(loaded(tokens), out)
    assert torch.equal(peft_model.unload().fc2.weight, original_head)


def test_multiple_adapters_save_in_subfolders(tmp_path: Any) -> None:
    peft_model = peftcore.get_peft_model(mlp(), LoraConfig(r=2, init_lora_weights=False, target_modules=["fc1"]))
    peft_model.add_adapter("second", LoraConfig(r=3, init_lora_weights=False, target_modules=["fc2"]))
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "second" / "adapter_config.json").exists()
    tokens = torch.randint(0, 20, (2, 3))
    peft_model.set_adapter("second")
    expected = peft_model(tokens)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter("second")
    torch.testing.assert_close(loaded(tokens), expected)
    with pytest.raises(AdapterError, match="already exists"):
        loaded.add_adapter("second", LoraConfig(target_modules=["fc1"]))
    with pytest.raises(AdapterError, match="no adapter named 'thrid'"):
        loaded.set_adapter("thrid")


def test_errors_leave_the_model_untouched() -> None:
    model = mlp()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(UnsupportedLayerError, match=r"'norm' \(LayerNorm\)"):
        peftcore.get_peft_model(model, LoraConfig(target_modules=["fc1", "norm"]))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())

    peft_model = peftcore.get_peft_model(model, LoraConfig(r=2, target_modules=["fc1"]))
    bad_plan = peftcore.RewritePlan("lora", "bad", (peftcore.methods.lora.AddLora(path="fc2", in_features=5, out_features=4),))
    with pytest.raises(PlanError, match="expects 5 -> 4 features, the layer has 32 -> 4"):
        peft_model.add_adapter("bad", peft_model.peft_config["default"], plan=bad_plan)
    assert type(peft_model.model.fc2) is nn.Linear and "bad" not in peft_model.peft_config


def test_adapter_for_another_architecture_is_refused(tmp_path: Any) -> None:
    peftcore.get_peft_model(mlp(), LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(tmp_path)
    other = nn.Sequential()
    other.add_module("fc1", nn.Linear(8, 32))
    with pytest.raises(AdapterError, match="maps 8 -> 32 features, the adapter was trained for 16 -> 32"):
        PeftModel.from_pretrained(other, tmp_path)
    renamed = nn.Sequential()
    renamed.add_module("lin", nn.Linear(16, 32))
    with pytest.raises(AdapterError, match="adapts layer 'fc1', which this model does not have"):
        PeftModel.from_pretrained(renamed, tmp_path)


def test_print_trainable_parameters(capsys: Any) -> None:
    peftcore.get_peft_model(mlp(), LoraConfig(r=2, target_modules=["fc1"])).print_trainable_parameters()
    assert "trainable params: 96 || all params:" in capsys.readouterr().out


def test_peft_model_is_a_module_that_reaches_the_model() -> None:
    peft_model = peftcore.get_peft_model(mlp(), LoraConfig(r=2, target_modules=["fc1"]))
    assert peft_model.get_base_model() is peft_model.model is peft_model.base_model.model
    assert peft_model.training is True and peft_model.eval() is peft_model
    assert not peft_model.model.training and not peft_model.model.fc1.training
    assert peft_model.fc2 is peft_model.model.fc2  # unknown attributes come from the model
    assert peft_model.active_adapter == "default"
