"""Tiny local stand-ins for the hub models HF PEFT's model-level test files download.

HF's tests load models by hub id (``peft-internal-testing/tiny-random-OPTForCausalLM``
...). Here each id is a small model of the same class, built from a config of our own
with seeded random weights, saved once under a local folder with a word-level tokenizer;
while the tests run, transformers' ``from_pretrained`` (models, auto classes, configs,
tokenizers) is redirected from the id to that folder. Both libraries' runs load the same
files, so the comparison stays fair; nothing is downloaded.

Ids whose models are not built here (multimodal Gemma 4, Llama 4, GPT-OSS, hub adapters)
stay unresolved: their cases fail in both runs and so count in neither pass rate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

VOCAB = 1000
#: Version of the recipes below: a change rebuilds the folder.
RECIPE_VERSION = 1
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=256)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _recipes() -> dict[str, tuple[str, str, Callable[[], dict]]]:
    """hub id -> (transformers config class, model class, config keywords)."""
    decoder = lambda **extra: {**_SMALL, **_IDS, **extra}  # noqa: E731
    encoder = lambda **extra: {**_SMALL, "type_vocab_size": 2, "pad_token_id": 0, **extra}  # noqa: E731
    opt = lambda: dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,  # noqa: E731
                       word_embed_proj_dim=32, max_position_embeddings=256, **_IDS)
    gpt2 = lambda: dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, **_IDS)  # noqa: E731
    t5 = lambda: dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,  # noqa: E731
                      num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    bart = lambda: dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,  # noqa: E731
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                        decoder_start_token_id=2, forced_eos_token_id=None, **_IDS)
    return {
        "peft-internal-testing/tiny-random-OPTForCausalLM": ("OPTConfig", "OPTForCausalLM", opt),
        "peft-internal-testing/tiny-random-GPT2LMHeadModel": ("GPT2Config", "GPT2LMHeadModel", gpt2),
        "hf-internal-testing/tiny-random-gpt2": ("GPT2Config", "GPT2LMHeadModel", gpt2),
        "peft-internal-testing/tiny-random-GPTJForCausalLM": (
            "GPTJConfig", "GPTJForCausalLM", lambda: dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                          n_positions=256, **_IDS)),
        "trl-internal-testing/tiny-random-LlamaForCausalLM": (
            "LlamaConfig", "LlamaForCausalLM", lambda: decoder(num_key_value_heads=2)),
        "peft-internal-testing/tiny-dummy-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda: decoder(num_key_value_heads=2)),
        "trl-internal-testing/tiny-Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", lambda: decoder(num_key_value_heads=2)),
        "hf-internal-testing/tiny-random-Gemma3ForCausalLM": (
            "Gemma3TextConfig", "Gemma3ForCausalLM", lambda: decoder(num_key_value_heads=2, head_dim=8)),
        "hf-internal-testing/tiny-random-MistralForCausalLM": (
            "MistralConfig", "MistralForCausalLM", lambda: decoder(num_key_value_heads=2)),
        "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": (
            "T5Config", "T5ForConditionalGeneration", t5),
        "peft-internal-testing/tiny-random-BartForConditionalGeneration": (
            "BartConfig", "BartForConditionalGeneration", bart),
        "peft-internal-testing/tiny-random-BertModel": ("BertConfig", "BertModel", encoder),
        "peft-internal-testing/tiny-random-RobertaModel": ("RobertaConfig", "RobertaModel", lambda: encoder(pad_token_id=1)),
        "peft-internal-testing/tiny-random-DebertaModel": ("DebertaConfig", "DebertaModel", encoder),
        "peft-internal-testing/tiny-random-DebertaV2Model": ("DebertaV2Config", "DebertaV2Model", encoder),
        "peft-internal-testing/tiny-random-BertForSequenceClassification": (
            "BertConfig", "BertForSequenceClassification", lambda: encoder(num_labels=2)),
        "peft-internal-testing/tiny-random-RobertaForSequenceClassification": (
            "RobertaConfig", "RobertaForSequenceClassification", lambda: encoder(num_labels=2, pad_token_id=1)),
        "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": (
            "LlamaConfig", "LlamaForSequenceClassification", lambda: decoder(num_key_value_heads=2, num_labels=2)),
    }


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer of :data:`VOCAB` entries (special tokens first), saved as a
    transformers fast tokenizer, so that ``AutoTokenizer.from_pretrained`` finds one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    common = ("the a an this is of and to in it for on with as be at by test prompt good bad movie "
              "i you he she we they what how why classify sentiment review text label positive negative").split()
    words = specials + common + [f"w{i}" for i in range(VOCAB - len(specials) - len(common))]
    model = models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(directory))


def prepare(root: Path) -> dict[str, str]:
    """Build every model of :func:`_recipes` under ``root`` (once; kept between runs) and
    return ``{hub id: local folder}``."""
    import torch
    import transformers

    stamp = root / "recipes.json"
    recipes = _recipes()
    wanted = {"version": RECIPE_VERSION, "ids": sorted(recipes)}
    folders = {model_id: str(root / model_id) for model_id in recipes}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return folders
    for index, (model_id, (config_name, model_name, keywords)) in enumerate(sorted(recipes.items())):
        directory = root / model_id
        config = getattr(transformers, config_name)(**keywords())
        torch.manual_seed(index)
        model = getattr(transformers, model_name)(config)
        model.save_pretrained(str(directory))
        _tokenizer(directory)
    stamp.write_text(json.dumps(wanted))
    return folders


_INSTALLED: dict[str, str] = {}
#: ``from_pretrained`` keywords about where a hub download comes from: meaningless for a folder.
_HUB_KEYWORDS = ("revision", "subfolder", "cache_dir", "token", "force_download")


def _redirect(owner: Any, name: str = "from_pretrained") -> None:
    bound = owner.__dict__.get(name)
    if not isinstance(bound, classmethod):
        return
    original = bound.__func__

    def from_pretrained(cls: Any, path: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(path, str) and path in _INSTALLED):
            return original(cls, path, *args, **kwargs)
        for key in _HUB_KEYWORDS:
            kwargs.pop(key, None)
        loaded = original(cls, _INSTALLED[path], *args, **kwargs)
        _name_as_hub(loaded, path)
        return loaded

    setattr(owner, name, classmethod(from_pretrained))


def _name_as_hub(loaded: Any, model_id: str) -> None:
    """Give a loaded model, config or tokenizer the name a hub load gives it (the id,
    not the local folder), as HF's tests compare saved configs with it."""
    config = getattr(loaded, "config", None)
    for holder in (config, loaded):
        if holder is not None and hasattr(holder, "_name_or_path"):
            holder._name_or_path = model_id
    if hasattr(loaded, "name_or_path"):  # a model's (an attribute of its own) or a tokenizer's
        try:
            loaded.name_or_path = model_id
        except AttributeError:  # a read-only property: nothing to rename
            pass


def install(folders: dict[str, str]) -> None:
    """Redirect transformers' loaders from each hub id of ``folders`` to its folder."""
    import transformers
    from transformers.models.auto import auto_factory

    _INSTALLED.update(folders)
    owners: list[Optional[Any]] = [
        auto_factory._BaseAutoModelClass, transformers.PreTrainedModel, transformers.AutoTokenizer,
        transformers.AutoConfig, getattr(transformers, "PreTrainedConfig", None), getattr(transformers, "PretrainedConfig", None),
        transformers.PreTrainedTokenizerBase,
    ]
    autos: list[Any] = [auto_factory._BaseAutoModelClass]
    while autos:  # the auto classes define their own from_pretrained (a wrapped copy)
        owner = autos.pop()
        owners.append(owner)
        autos.extend(owner.__subclasses__())
    for owner in dict.fromkeys(o for o in owners if o is not None):
        _redirect(owner)


def default_root() -> Path:
    """Where the models are kept: ``$PEFTCORE_HF_SUITE_MODELS`` or a folder in the temp dir."""
    return Path(os.environ.get("PEFTCORE_HF_SUITE_MODELS") or Path(os.environ.get("TMPDIR", "/tmp")) / "peftcore-hf-suite-models")
