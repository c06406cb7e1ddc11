"""More of HF PEFT's PeftModel API on the core's state machine: ``set_requires_grad``
and the rule that prompt-learning adapters have no ``unload`` (a mixin of
:class:`peftcore.PeftModel`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import numpy as np

from peftcore.errors import AdapterError, MethodOperationError, PromptLearningUnloadError


class HFModelApiMixin:
    """``set_requires_grad``, and the checks of ``set_adapter`` and ``unload`` (see the module docstring)."""

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the adapters ``adapter_names`` on (or off), their
        ``modules_to_save`` copies included, whether or not they are active (HF PEFT's
        method). Prompt-learning adapters refuse, as in HF PEFT (a ``TypeError``)."""
        pm: Any = self
        active = pm.active_peft_config
        if active.is_prompt_learning:
            raise MethodOperationError(
                f"Setting `requires_grad` is not supported for prompt learning methods like {active.peft_type}."
            )
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            pm._require(name)
        for name in names:
            pm._set_trainable(name, bool(requires_grad))

    def _add_weighted_scales(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """HF PEFT's ``add_weighted_adapter`` for (IA)^3: a new adapter over the layers any
        of ``adapters`` scales, each vector the weighted sum of theirs (a layer an adapter
        does not scale adds nothing), feed-forward where theirs are; frozen, as in HF."""
        pm: Any = self
        scaled: dict[str, Any] = {}
        for name in adapters:
            for op in pm.plans[name].ops:
                if op.op == "ia3_scale":
                    if op.path in scaled and scaled[op.path].is_feedforward != op.is_feedforward:
                        raise AdapterError(f"adapters disagree on whether {op.path!r} is a feed-forward layer")
                    scaled.setdefault(op.path, op)
        paths = sorted(scaled)
        config = dataclasses.replace(
            pm.peft_config[adapters[0]],
            target_modules=paths,
            feedforward_modules=[path for path in paths if scaled[path].is_feedforward],
            exclude_modules=None,
            inference_mode=True,
        )
        tensors = {name: pm.export_adapter(name) for name in adapters}
        pm.add_adapter(adapter_name, config)
        try:
            initial = pm.export_adapter(adapter_name)
            combined = {}
            for path in paths:
                key = f"{path}.ia3_l"
                parts = [float(w) * np.asarray(tensors[n][key], dtype=np.float64) for n, w in zip(adapters, weights) if key in tensors[n]]
                combined[key] = np.sum(parts, axis=0).astype(initial[key].dtype)
            pm.import_adapter(adapter_name, {**initial, **combined})
        except BaseException:
            pm.delete_adapter(adapter_name)
            raise

    def _refuse_shared_modules_to_save(self, names: Sequence[str]) -> None:
        """Several active adapters cannot each run their own copy of one module (the
        module computes one thing), so HF PEFT refuses them; so does peftcore. Adapters
        that train the same rows of one table (trainable tokens) are refused likewise;
        disjoint rows run together."""
        pm: Any = self
        saved = [op.path for name in names for op in pm.plans[name].ops if op.op == "modules_to_save"]
        shared = sorted({path for path in saved if saved.count(path) > 1})
        if shared:
            raise AdapterError(
                f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {list(names)} each "
                f"train their own copy of {', '.join(repr(p) for p in shared)}"
            )
        rows: dict[str, set] = {}
        for name in names:
            for op in pm.plans[name].ops:
                if op.op == "trainable_tokens" and not op.tied_to:
                    if rows.setdefault(op.path, set()) & set(op.token_indices):
                        raise AdapterError(
                            f"Only one adapter can be set at a time for TrainableTokensWrapper when their rows "
                            f"overlap: adapters {list(names)} train rows {sorted(rows[op.path] & set(op.token_indices))} "
                            f"of {op.path!r}"
                        )
                    rows[op.path] |= set(op.token_indices)

    def _refuse_prompt_learning_unload(self, prompt_learning: bool) -> None:
        """HF PEFT's prompt-learning models have no ``unload`` (an ``AttributeError``);
        peftcore can remove a prompt anyway when asked with ``prompt_learning=True``."""
        pm: Any = self
        prompts = [name for name, config in pm.peft_config.items() if config.is_prompt_learning]
        if prompts and not prompt_learning:
            kind = pm.peft_config[prompts[0]].peft_type
            raise PromptLearningUnloadError(
                f"unload() is not available for prompt-learning adapters ({prompts[0]!r} is {kind}), as in HF PEFT: "
                "the prompt is not part of the model's layers. To remove it anyway and get the plain model "
                "back, call unload(prompt_learning=True)"
            )
