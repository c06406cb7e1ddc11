"""peftcore's Apache SINGA backend.

Importing this package does not import singa; :mod:`peftcore_singa.plugin` is the
pluggy plugin (entry point ``singa`` in the ``peftcore`` group) and documents what a
SINGA user must know (lazy layers, graph mode, freezing, tensor names). The adapter
layer classes live in :mod:`peftcore_singa.layers`, :mod:`peftcore_singa.lora` and
:mod:`peftcore_singa.modules_to_save`; :mod:`peftcore_singa.compat` holds the shims
SINGA 5.x needs on Python >= 3.10 and numpy >= 1.24.
"""
