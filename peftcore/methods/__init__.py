"""Built-in PEFT methods. Importing this package registers them."""

from __future__ import annotations

from peftcore.methods.lora import LoraConfig

__all__ = ["LoraConfig"]
