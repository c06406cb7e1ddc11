"""P-tuning (Liu et al., 2021): virtual tokens computed by a small trained prompt encoder.

As with prompt tuning, ``num_virtual_tokens`` vectors go in front of the input embedding's
output, but each is the output of a prompt encoder over trained input vectors, with
Hugging Face PEFT's two encoders (``encoder_reparameterization_type``):

- ``"MLP"``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``;
- ``"LSTM"``: a bidirectional LSTM (``encoder_num_layers`` layers, ``encoder_dropout``
  between them) then ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``.

The plan is the prompt-tuning op with an ``encoder``. Saved file: ``prompt_embeddings``,
the encoder's output (which is all HF PEFT saves and loads), plus the encoder's own
tensors under ``prompt_encoder.*`` so peftcore can go on training. An HF PEFT file loads as
a plain prompt (HF PEFT's inference mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

from peftcore.config import PeftConfig, check, check_type, config_class, runtime_field
from peftcore.errors import ConfigError, PlanError
from peftcore.graph import ModelGraph
from peftcore.methods.common import (
    effective_modules_to_save,
    modules_to_save_ops,
    planned_virtual_tokens,
    saved_prompt_config,
    validate_modules_to_save,
    validate_virtual_tokens,
)
from peftcore.methods.prompt_tuning import (
    DROPS_TOKEN_TYPE_IDS,
    HF_PROMPT_MODULES_PREFIX,
    PROMPT_ENCODERS,
    AddPrompt,
    PromptTuningConfig,
)
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan, register_op

ENCODER_TYPES = ("MLP", "LSTM")


@register_op
@dataclass(frozen=True)
class AddPromptEncoder(AddPrompt):
    """A prompt computed by P-tuning's encoder (``encoder`` set): the prompt-tuning op under
    its own kind, so that a backend shows P-tuning only where it builds the encoder."""

    op: ClassVar[str] = "prompt_encoder"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.encoder:
            raise PlanError(f"prompt_encoder op on {self.path!r}: encoder must be one of {PROMPT_ENCODERS}")


@config_class
class PromptEncoderConfig(PeftConfig):
    """Configure P-tuning, with HF PEFT's field names (``PromptEncoderConfig``).

    - ``num_virtual_tokens``; ``encoder_reparameterization_type`` (``"MLP"`` or ``"LSTM"``);
      ``encoder_hidden_size`` (default: the embedding width); ``encoder_num_layers`` (LSTM
      layers; HF's MLP always has its fixed 3 layers); ``encoder_dropout`` (LSTM).
    - ``num_transformer_submodules``: as for prompt tuning (2 for ``SEQ_2_SEQ_LM``).
    - ``embedding_layer`` (peftcore's): the embedding to prompt, by default the input one.
    """

    is_prompt_learning: ClassVar[bool] = True
    method: ClassVar[str] = "p_tuning"
    peft_type: ClassVar[str] = PeftType.P_TUNING
    plan_ops: ClassVar[tuple] = ("freeze_base", "prompt_encoder", "modules_to_save")
    hf_unsupported_fields: ClassVar[Mapping[str, Any]] = {}

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    modules_to_save: Optional[list] = None
    embedding_layer: Optional[str] = runtime_field()

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        validate_virtual_tokens(name, self, ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"))
        check(
            self.num_transformer_submodules in (None, 1, 2),
            f"{name}.num_transformer_submodules must be 1 or 2 (or None), got {self.num_transformer_submodules!r}",
        )
        # a PromptEncoderReparameterizationType member -> its string
        self.encoder_reparameterization_type = kind = str(self.encoder_reparameterization_type)
        check(
            isinstance(kind, str) and kind.upper() in ENCODER_TYPES,
            f"{name}.encoder_reparameterization_type must be one of {ENCODER_TYPES}, got {kind!r}",
        )
        self.encoder_reparameterization_type = str(kind).upper()
        check_type(name, "encoder_num_layers", self.encoder_num_layers, (int,))
        check(self.encoder_num_layers > 0, f"{name}.encoder_num_layers must be positive")
        check(self.encoder_hidden_size is None or self.encoder_hidden_size > 0, f"{name}.encoder_hidden_size must be positive")
        check_type(name, "encoder_dropout", self.encoder_dropout, (int, float))
        check(0.0 <= self.encoder_dropout < 1.0, f"{name}.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        check_type(name, "embedding_layer", self.embedding_layer, (str,), allow_none=True)
        validate_modules_to_save(name, self.modules_to_save)

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> PromptEncoderConfig:
        """Also the sizes HF PEFT writes (``token_dim``, ``encoder_hidden_size``, ...) and the task's heads."""
        prompts = [op for op in (plan.ops if plan is not None else ()) if isinstance(op, AddPrompt)]
        saved: PromptEncoderConfig = saved_prompt_config(self, graph, prompts[0].token_dim if prompts else None)
        return saved

    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        return self._plan(graph, adapter_name, with_encoder=True)

    def loading_plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        # a file without peftcore's plan (HF PEFT's) holds only the encoder's output
        return self._plan(graph, adapter_name, with_encoder=False)

    def _plan(self, graph: ModelGraph, adapter_name: str, with_encoder: bool) -> RewritePlan:
        prompt_config = PromptTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens,
            num_transformer_submodules=self.num_transformer_submodules,
            task_type=self.task_type,
            embedding_layer=self.embedding_layer,
        )
        node = prompt_config.embedding_node(graph)
        width = int(node.embedding_dim or 0)
        if self.token_dim is not None and self.token_dim != width:
            raise ConfigError(f"{type(self).__name__}.token_dim={self.token_dim} but embedding {node.path!r} is {width} wide")
        encoder = self.encoder_reparameterization_type.lower() if with_encoder else ""
        op_type = AddPromptEncoder if encoder else AddPrompt
        prompt = op_type(
            path=node.path,
            num_virtual_tokens=planned_virtual_tokens(type(self).__name__, self),
            token_dim=width,
            num_embeddings=int(node.num_embeddings or 0),
            num_transformer_submodules=prompt_config.transformer_submodules(),
            encoder=encoder,
            encoder_hidden=int(self.encoder_hidden_size or width) if encoder else 0,
            encoder_num_layers=int(self.encoder_num_layers) if encoder else 2,
            encoder_dropout=float(self.encoder_dropout) if encoder else 0.0,
            keep_token_type_ids=self.task_type not in DROPS_TOKEN_TYPE_IDS,
        )
        ops: list[PlanOp] = [FreezeBase(), prompt]
        saved = effective_modules_to_save(self.task_type, self.modules_to_save)
        ops.extend(modules_to_save_ops(graph, saved, type(self).__name__, hf_key_prefix=HF_PROMPT_MODULES_PREFIX))
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))
