"""Layers a SINGA model calls but does not register in ``_layers``.

SINGA registers a layer only when it is assigned as an attribute (``self.fc = Linear(..)``)
or given to ``register_layers``. Models in SINGA's own examples also keep layers where
``_layers`` does not see them, and their forward still calls them:

* **in a plain Python list or tuple** (``examples/trans``: ``self.layers = []`` then
  ``self.layers.append(EncoderLayer(..))``): described at ``<attr>.<index>``, so
  ``encoder.layers.0.enc_self_attn.W_Q``, as torch names a ``ModuleList``;
* **straight in the instance ``__dict__``** (``sonnx.SONNXModel`` puts each ONNX node's
  layer there, under the node name, e.g. ``/0/Gemm``): described under that name, with
  ``.`` replaced by ``_`` (a path separator here).

These are described and adapted as registered layers are. Replacing one puts the adapter
layer where the old one was (the list slot or the attribute), and also in a plain object
the parent holds whose ``__dict__`` referenced the old layer (sonnx's ``SingaRep``, whose
``run`` looks each node's layer up there). Layers held any other way (in a dict, a nested
list, an object the model holds) are not walked: :func:`unreached_layers` names them for
the error a target that matched nothing raises, with how to register them. SINGA's own
``get_params``/``save_states`` never see unregistered layers (so neither the base tensors
nor the adapters under them are in a ``save_states`` checkpoint); ``save_pretrained``
writes the adapters.
"""

from __future__ import annotations

from typing import Any, Iterator

from peftcore.errors import PlanError

#: How to make a layer visible to SINGA (and so to peftcore), for messages.
HOW_TO_REGISTER = (
    "assign each layer as an attribute of a layer (setattr(self, f'block{i}', block)) or pass them to "
    "self.register_layers(*blocks) in __init__"
)


def _is_layer(value: Any) -> bool:
    from singa import layer

    return isinstance(value, layer.Layer)


def held_children(node: Any) -> list[tuple[str, Any]]:
    """Layers ``node`` holds outside ``_layers`` that its forward can call: public
    attributes that are layers, and layers in public list/tuple attributes."""
    registered = {id(child) for child in node._layers.values()}
    found: list[tuple[str, Any]] = []
    for attr, value in vars(node).items():
        if attr.startswith("_") or attr in node._layers:
            continue
        key = attr.replace(".", "_")
        if _is_layer(value):
            if id(value) not in registered:
                found.append((key, value))
        elif isinstance(value, (list, tuple)):
            found.extend(
                (f"{key}.{i}", item) for i, item in enumerate(value) if _is_layer(item) and id(item) not in registered
            )
    return found


def _locations(parent: Any, old: Any) -> Iterator[tuple[Any, Any]]:
    """Where ``parent`` (or a plain object it holds) refers to ``old``: ``(container, key)``
    pairs, a container being a dict (an object's ``__dict__`` too) or a list."""
    own = parent.__dict__
    for attr, value in list(own.items()):
        if attr in ("_parent", "_layers"):
            continue
        if value is old:
            yield own, attr
        elif isinstance(value, list):
            yield from ((value, i) for i, item in enumerate(value) if item is old)
        elif isinstance(value, dict):
            yield from ((value, k) for k, item in list(value.items()) if item is old)
        elif not _is_layer(value) and hasattr(value, "__dict__") and not isinstance(value, type):
            inner = vars(value)
            yield from ((inner, k) for k, item in list(inner.items()) if item is old)


def replace_held(parent: Any, old: Any, new: Any, path: str) -> None:
    """Put ``new`` wherever ``parent`` holds the unregistered layer ``old``."""
    places = list(_locations(parent, old))
    tuples = [attr for attr, value in vars(parent).items() if isinstance(value, tuple) and any(v is old for v in value)]
    if not places and not tuples:
        raise PlanError(f"layer {path!r} is not held by its parent any more; describe the model again")
    for container, key in places:
        container[key] = new
    for attr in tuples:
        parent.__dict__[attr] = tuple(new if item is old else item for item in getattr(parent, attr))
    new.__dict__["_parent"] = old.__dict__.get("_parent")
    new.__dict__["name"] = old.name


def unreached_layers(walked: list[tuple[str, Any]], model: Any) -> list[str]:
    """Layers reachable from the model's layers only through a dict, a nested container or
    another object (not described): one line each, with how to register them."""
    seen = {id(node) for _, node in walked} | {id(model)}
    notes: list[str] = []
    for path, node in [("", model), *walked]:
        for attr, value in vars(node).items():
            if attr.startswith("_"):
                continue
            where = f"{path}.{attr}" if path else attr
            for place, item in _nested_layers(value, where):
                if id(item) not in seen:
                    seen.add(id(item))
                    notes.append(f"{type(item).__name__} at {place}")
    if not notes:
        return []
    shown = ", ".join(notes[:6]) + (f" and {len(notes) - 6} more" if len(notes) > 6 else "")
    return [f"layers the model holds where SINGA does not register them, not searched: {shown}; {HOW_TO_REGISTER}"]


def _nested_layers(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Layers inside a dict, or inside a list/tuple nested in a list/tuple (one level)."""
    if isinstance(value, dict):
        for k, item in value.items():
            if _is_layer(item):
                yield f"{where}[{k!r}] (a dict)", item
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, (list, tuple, dict)):
                for j, inner in enumerate(item.values() if isinstance(item, dict) else item):
                    if _is_layer(inner):
                        yield f"{where}[{i}][{j}] (a nested container)", inner
