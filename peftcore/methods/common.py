"""Planning pieces several methods share."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

from peftcore.config import check, check_type
from peftcore.errors import ConfigError, PeftWarning, TargetNotFoundError, caller_stacklevel, closest
from peftcore.graph import LayerNode, ModelGraph
from peftcore.pattern_keys import component_suffixes
from peftcore.plan import SaveModule

#: Heads HF PEFT trains in full for a task type; kept so HF configs mean the same here.
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def effective_modules_to_save(task_type: Optional[str], modules: Optional[Sequence[str]]) -> Optional[list[str]]:
    """``modules`` plus the heads HF PEFT adds for ``task_type`` (e.g. ``SEQ_CLS``)."""
    extra = TASK_MODULES_TO_SAVE.get(task_type or "", ())
    if not extra:
        return list(modules) if modules is not None else None
    return list(dict.fromkeys([*(modules or ()), *extra]))


def validate_virtual_tokens(owner: str, config: Any, optional_ints: Sequence[str]) -> None:
    """The fields every prompt-learning config shares: ``num_virtual_tokens`` a positive int
    or None (as HF PEFT, a config may be built without it; planning then asks for it, see
    :func:`planned_virtual_tokens`), and each of ``optional_ints`` an int or None."""
    count = config.num_virtual_tokens
    check_type(owner, "num_virtual_tokens", count, (int,), allow_none=True)
    check(count is None or count > 0, f"{owner}.num_virtual_tokens must be positive, got {count}")
    for field_name in optional_ints:
        check_type(owner, field_name, getattr(config, field_name), (int,), allow_none=True)


def planned_virtual_tokens(owner: str, config: Any) -> int:
    """``config.num_virtual_tokens`` for planning; a :class:`ConfigError` when it is unset."""
    count = config.num_virtual_tokens
    if count is None:
        raise ConfigError(f"{owner}.num_virtual_tokens is not set; give the number of virtual tokens to train")
    return int(count)


def validate_modules_to_save(owner: str, modules: Optional[Sequence[str]]) -> None:
    """``modules_to_save`` is None or a list of non-empty layer names."""
    if modules is None:
        return
    check(
        isinstance(modules, (list, tuple)) and all(isinstance(m, str) and m for m in modules),
        f"{owner}.modules_to_save must be a list of layer names, got {modules!r}",
    )


def validate_layers_to_transform(owner: str, layers: object) -> None:
    """``layers_to_transform`` is None, an int or a list of ints."""
    if layers is None:
        return
    items = [layers] if isinstance(layers, int) else layers
    check(
        isinstance(items, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in items),
        f"{owner}.layers_to_transform must be an int or a list of ints, got {layers!r}",
    )


#: Most names a ``layers_pattern`` list may hold (each is searched for in every layer path).
MAX_LAYERS_PATTERNS = 64


def validate_layers_pattern(owner: str, patterns: object) -> None:
    """``layers_pattern`` is None, a name, or a list of at most :data:`MAX_LAYERS_PATTERNS` names."""
    if patterns is None:
        return
    items = [patterns] if isinstance(patterns, str) else patterns
    check(
        isinstance(items, list) and all(isinstance(p, str) and p for p in items),
        f"{owner}.layers_pattern must be a name or a list of names, got {patterns!r}",
    )
    assert isinstance(items, list)
    check(
        len(items) <= MAX_LAYERS_PATTERNS,
        f"{owner}.layers_pattern lists {len(items)} names; at most {MAX_LAYERS_PATTERNS}",
    )


def modules_to_save_ops(
    graph: ModelGraph, modules: Optional[Sequence[str]], owner: str, hf_key_prefix: str = ""
) -> list[SaveModule]:
    """One :class:`SaveModule` op per layer named (exact name or dotted suffix) in ``modules``.

    A name that matches nothing is an error; the op records the shapes of every
    parameter under the module so loading can check them. ``hf_key_prefix`` is passed
    to the ops (see :class:`SaveModule`).
    """
    ops: list[SaveModule] = []
    unmatched: list[str] = []
    named: dict[str, list[LayerNode]] = {}  # every name a layer answers to -> the layers, in model order
    for node in graph if modules else ():
        for suffix in component_suffixes(node.path):
            named.setdefault(suffix, []).append(node)
    for name in dict.fromkeys(modules or ()):
        found = named.get(name, [])
        # keep only the outermost matches (a nested match would be saved twice)
        found_paths = {n.path for n in found}
        outer = [n for n in found if not any(prefix in found_paths for prefix in _component_prefixes(n.path))]
        if not outer:
            unmatched.append(name)
            continue
        for node in outer:
            if all(op.path != node.path for op in ops):
                ops.append(SaveModule(path=node.path, param_shapes=graph.subtree_params(node.path), hf_key_prefix=hf_key_prefix))
    # HF PEFT's rule: an error only when no entry matches. Its task types add both
    # "classifier" and "score" to every SEQ_CLS config, and a model has one of them.
    if unmatched and not ops:
        name = unmatched[0]
        hints = closest(name, graph.paths)
        hint = f"; closest layer names: {', '.join(hints)}" if hints else ""
        raise TargetNotFoundError(f"{owner}: modules_to_save entry {name!r} matched no layer{hint}")
    # the heads a task type adds are alternatives (a model has one of them): no warning
    task_heads = {head for heads in TASK_MODULES_TO_SAVE.values() for head in heads}
    unmatched = [name for name in unmatched if name not in task_heads]
    if unmatched:
        listed = ", ".join(repr(name) for name in unmatched[:10]) + (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else "")
        warnings.warn(f"{owner}: modules_to_save entries {listed} matched no layer and are ignored", stacklevel=3)
    return ops


def _component_prefixes(path: str) -> list[str]:
    """The paths of the modules that contain ``path`` (``a.b.c``: ``a``, ``a.b``)."""
    return [path[:i] for i, char in enumerate(path) if char == "."]


def _first(sizes: Mapping[str, int], *keys: str) -> Optional[int]:
    return next((int(sizes[k]) for k in keys if k in sizes), None)


def hf_prompt_sizes(config: Any, graph: Optional[ModelGraph], kv_heads: bool = False) -> dict[str, int]:
    """The sizes Hugging Face PEFT fills into a prompt-learning config it saves, from the
    model's config (``graph.model_config``), for the fields ``config`` leaves unset:
    ``num_layers``, ``token_dim``, ``num_attention_heads``, ``num_transformer_submodules``
    and (where the config has it) ``encoder_hidden_size``. ``kv_heads``: prefix tuning's
    rule for grouped-query attention (``token_dim`` and heads of the keys and values).
    A size the model's config does not give is left out."""
    sizes = dict(graph.model_config) if graph is not None else {}
    filled: dict[str, int] = {}
    layers = config.num_layers if config.num_layers is not None else _first(sizes, "num_hidden_layers", "num_layers", "n_layer")
    token_dim = config.token_dim if config.token_dim is not None else _first(sizes, "hidden_size", "n_embd", "d_model")
    heads = config.num_attention_heads
    if heads is None:
        heads = _first(sizes, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if kv_heads and "num_key_value_heads" in sizes and token_dim and heads:
        head_dim = sizes.get("head_dim") or token_dim // heads
        heads = sizes["num_key_value_heads"]
        token_dim = head_dim * heads
    for name, value in (("num_layers", layers), ("token_dim", token_dim), ("num_attention_heads", heads)):
        if value is not None and getattr(config, name) is None:
            filled[name] = value
    if config.num_transformer_submodules is None:
        filled["num_transformer_submodules"] = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None and token_dim is not None:
        filled["encoder_hidden_size"] = token_dim
    return filled


def saved_prompt_config(
    config: Any, graph: Optional[ModelGraph], plan_width: Optional[int], plan_layers: Optional[int] = None,
    kv_heads: bool = False,
) -> Any:
    """A prompt-learning config as HF PEFT saves it (see :func:`hf_prompt_sizes`); the
    plan's own ``token_dim`` (and ``num_layers``) win where the model's config says
    otherwise, so the file always describes its tensors."""
    changes: dict[str, Any] = {"inference_mode": True, **hf_prompt_sizes(config, graph, kv_heads)}
    if config.token_dim is None and plan_width:
        changes["token_dim"] = plan_width
        if "encoder_hidden_size" in changes:
            changes["encoder_hidden_size"] = plan_width
    if config.num_layers is None and plan_layers:
        changes["num_layers"] = plan_layers
    modules = effective_modules_to_save(config.task_type, config.modules_to_save)
    if modules != config.modules_to_save:
        changes["modules_to_save"] = modules
    return config.replace(**changes)



#: The task types whose heads HF PEFT trains and saves, by the head's name.
_TASKS_OF_HEAD = {"classifier": "'SEQ_CLS' or 'TOKEN_CLS'", "score": "'SEQ_CLS' or 'TOKEN_CLS'", "qa_outputs": "'QUESTION_ANS'"}


def warn_untrained_head(config: Any, graph: ModelGraph, plan: Any) -> None:
    """Warn when a task head (``classifier``, ``score``, ``qa_outputs``) of a transformers
    model is neither trained nor saved by a new adapter because its config has no
    ``task_type``: the head stays as the model was built (often freshly initialised) and
    is lost on saving, silently in HF PEFT."""
    if config.task_type is not None or not graph.model_type:
        return
    for head, tasks in _TASKS_OF_HEAD.items():
        if head not in graph:
            continue
        covered = any(op.path == head or op.path.startswith(head + ".") for op in plan.ops if op.path)
        if not covered:
            warnings.warn(
                f"{type(config).__name__} has no task_type, so the model's head {head!r} is neither trained nor "
                f"saved with the adapter (it keeps the weights the model was built with); pass task_type={tasks} "
                f"as for this model, or add {head!r} to modules_to_save",
                PeftWarning,
                stacklevel=caller_stacklevel(),
            )
