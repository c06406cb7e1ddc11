"""The model card (``README.md``) ``save_pretrained`` writes beside the adapters.

The text only: :meth:`~peftcore.adapter_files.AdapterFilesMixin.save_pretrained` reads an
existing card through the save directory's writer (never through a link, never more than
:data:`MAX_CARD_BYTES`) before any file is written, and writes the new card with the
adapter files, all or nothing (:mod:`peftcore.save_dir`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

#: Name of the model card in a save directory.
CARD_NAME = "README.md"
#: Largest existing model card merged with a new one (real cards are kilobytes).
MAX_CARD_BYTES = 16 * 1024 * 1024


def model_card_text(existing_card: Optional[str], model: Any) -> str:
    """The ``README.md`` to save, as HF PEFT writes it: YAML front matter naming the base
    model (when the model has a config naming it, as transformers models do),
    ``library_name: peft`` and the adapters' tags, then a short card body.
    ``existing_card`` (the card already in the save directory, or None) keeps its text;
    only missing front-matter entries are added."""
    configs = list(getattr(model, "peft_config", {}).values())
    # HF PEFT names the base model only from the model's own config (a transformers model)
    get_base_model = getattr(model, "get_base_model", None)
    base_config = getattr(get_base_model() if callable(get_base_model) else model, "config", None)
    base = getattr(base_config, "_name_or_path", None) or getattr(base_config, "name_or_path", None)
    base = base if isinstance(base, str) and base else None
    tags = ["peftcore", *sorted({c.method for c in configs if c.method})]
    header = {"library_name": "peft", "tags": tags}
    if base:
        header["base_model"] = base
    text = existing_card or ""
    body, existing = text, ""
    if text.startswith("---\n") and "\n---" in text[4:]:
        end = text.index("\n---", 4)
        existing, body = text[4:end], text[end + 4 :].lstrip("\n")
    present = {line.split(":", 1)[0].strip() for line in existing.splitlines() if ":" in line and not line.startswith(" ")}
    lines = [line for line in existing.splitlines() if line.strip()]
    for key, value in header.items():
        if key in present:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {item}" for item in value)
        else:
            lines.append(f"{key}: {value}")
    if not body:
        body = model_card_body(getattr(model, "peft_config", {}), base)
    return "---\n" + "\n".join(lines) + "\n---\n\n" + body


#: Config fields a model card lists for each adapter, where the config has them.
_CARD_FIELDS = (
    "task_type", "target_modules", "r", "lora_alpha", "lora_dropout", "use_rslora", "modules_to_save",
    "num_virtual_tokens", "feedforward_modules",
)


def model_card_body(configs: Mapping[str, Any], base: Optional[str]) -> str:
    """The text of a new adapter model card: what the adapters are, how to load them in
    peftcore and in Hugging Face PEFT, and headings for the owner to fill in."""
    lines = ["# Model card", ""]
    lines.append(
        f"Parameter-efficient adapters{' for `' + base + '`' if base else ''}, saved by peftcore in Hugging Face "
        "PEFT's file layout (`adapter_config.json` and `adapter_model.safetensors`). Only the adapter weights are "
        "here; the base model is loaded separately."
    )
    lines += ["", "## Adapters", ""]
    for name, config in configs.items():
        settings = ", ".join(
            f"{field}={getattr(config, field)!r}" for field in _CARD_FIELDS
            if getattr(config, field, None) not in (None, [], ())
        )
        lines.append(f"- `{name}`: {getattr(config, 'method', type(config).__name__)}" + (f" ({settings})" if settings else ""))
    model_line = f'base = AutoModel.from_pretrained("{base}")' if base else "base = ...  # the model the adapter was trained on"
    lines += [
        "",
        "## How to use",
        "",
        "With peftcore (PyTorch):",
        "",
        "```python",
        "from peftcore import PeftModel",
        *(["from transformers import AutoModel"] if base else []),
        "",
        model_line,
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "With Hugging Face PEFT, for the methods it has (LoRA, prompt tuning, prefix tuning, P-tuning): the same "
        "two lines with `from peft import PeftModel`. peftcore also loads the folder into the same architecture "
        "built with another framework it has a backend for (Apache SINGA), since tensors are stored by canonical "
        "layer path; `peftcore inspect <folder>` prints what the adapter changes.",
        "",
        "## Training",
        "",
        "- Data: (describe the training data)",
        "- Procedure and hyper-parameters: (describe them)",
        "- Evaluation: (results, and on what)",
        "",
        "## Limitations",
        "",
        "(Known limitations and intended uses of this adapter.)",
        "",
        "## Framework versions",
        "",
        f"- peftcore {_peftcore_version()}",
        "",
    ]
    return "\n".join(lines)


def _peftcore_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("peftcore")
    except metadata.PackageNotFoundError:
        return "(not installed as a distribution)"
