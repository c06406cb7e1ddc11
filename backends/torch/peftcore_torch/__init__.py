"""peftcore's PyTorch backend.

Importing this package does not import torch; :mod:`peftcore_torch.plugin` is the
pluggy plugin (entry point ``torch`` in the ``peftcore`` group). The adapter layer
classes live in :mod:`peftcore_torch.layers`, :mod:`peftcore_torch.lora` and
:mod:`peftcore_torch.modules_to_save`.
"""
