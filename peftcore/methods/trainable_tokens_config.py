"""HF PEFT's ``TrainableTokensConfig``: trainable tokens as a method of their own.

The same rows as LoRA's ``trainable_token_indices`` (:mod:`peftcore.methods.trainable_tokens`),
with HF PEFT's fields and files: ``token_indices``, ``target_modules`` (the input
embedding when unset) and ``init_weights``; the file keys have no ``token_adapter.``
part (``model.embed_tokens.trainable_tokens_delta``), and a head tied to the embedding
is saved too, as HF PEFT saves it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from peftcore.config import PeftConfig, check_type, config_class
from peftcore.errors import ConfigError
from peftcore.graph import ModelGraph
from peftcore.methods.trainable_tokens import check_token_indices, trainable_token_ops
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan
from peftcore.targeting import Targets, select_layers, validate_targets


@config_class
class TrainableTokensConfig(PeftConfig):
    """Train only rows ``token_indices`` of an embedding table (HF PEFT's method).

    - ``token_indices``: the token ids whose rows train (new special tokens, say).
    - ``target_modules``: the tables (names, dotted suffixes or a regex); ``None`` is the
      model's input embedding, and a head tied to it uses the same rows.
    - ``init_weights``: ``True`` starts the rows at the table's values (the model is
      unchanged until trained); ``False`` at random values, for tests.
    """

    method: ClassVar[str] = "trainable_tokens"
    peft_type: ClassVar[str] = PeftType.TRAINABLE_TOKENS
    plan_ops: ClassVar[tuple] = ("freeze_base", "trainable_tokens")

    token_indices: list = dataclasses.field(default_factory=list)
    target_modules: Targets = None
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if isinstance(self.token_indices, tuple):
            self.token_indices = list(self.token_indices)
        check_token_indices(name, "token_indices", self.token_indices)
        self.target_modules = validate_targets(name, "target_modules", self.target_modules)
        check_type(name, "init_weights", self.init_weights, (bool,))

    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        owner = type(self).__name__
        if self.target_modules is None:
            tables: dict[str, list] = {}
            if graph.input_embedding is None:
                raise ConfigError(f"{owner}: the model reports no input embedding; name the table in target_modules")
            tables[graph.input_embedding] = list(self.token_indices)
        else:
            nodes = select_layers(graph, self.target_modules, owner=owner, supported_kinds=("embedding", "linear"))
            tables = {node.path: list(self.token_indices) for node in nodes}
        ops: list[PlanOp] = [FreezeBase()]
        ops.extend(trainable_token_ops(graph, tables, owner, init=self.init_weights, hf_prefix=""))
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> TrainableTokensConfig:
        """With the input embedding's path as ``target_modules`` when unset, as HF PEFT writes it."""
        if self.target_modules is None and graph is not None and graph.input_embedding is not None:
            return self.replace(inference_mode=True, target_modules=graph.input_embedding)
        return self.replace(inference_mode=True)
