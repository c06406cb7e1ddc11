"""Prompt tuning (Lester et al., 2021) and residual prompt tuning (Razdaibiedina et al., 2023).

Both prepend ``num_virtual_tokens`` trainable vectors to the output of the model's input
embedding layer. Residual prompt tuning passes the prompt through a bottleneck MLP with
a skip connection, ``P + LN(up(act(down(P))))``, while training; :meth:`AddPrompt.baked`
turns it into plain prompt tuning once the MLP's output is stored as the prompt.

Configs and saved tensors use Hugging Face PEFT's names (``PROMPT_TUNING``,
``prompt_embeddings`` at the top level of the file), so plain prompt-tuning adapters load
in HF PEFT and back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

from peftcore.config import PeftConfig, check, check_type, config_class, runtime_field
from peftcore.errors import AdapterError, ConfigError, PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.common import (
    effective_modules_to_save,
    modules_to_save_ops,
    planned_virtual_tokens,
    saved_prompt_config,
    validate_modules_to_save,
    validate_virtual_tokens,
)
from peftcore.methods.prompt_text_init import text_init_token_ids
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan, TensorSpec, register_op

PROMPT_INITS = ("random", "sample_vocab", "token_ids")
#: P-tuning's prompt encoders (HF PEFT's ``encoder_reparameterization_type``, lower case).
PROMPT_ENCODERS = ("mlp", "lstm")
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "identity")
#: The residual MLP's tensors, in the order :meth:`AddPrompt.residual_shapes` lists them.
RESIDUAL_TENSORS = (
    "residual_down_weight",
    "residual_down_bias",
    "residual_up_weight",
    "residual_up_bias",
    "residual_norm_weight",
    "residual_norm_bias",
)
#: Where HF PEFT's prompt-learning adapters keep the modules they train in full.
HF_PROMPT_MODULES_PREFIX = "base_model."
#: Task types whose HF PEFT model drops ``token_type_ids`` from a prompted call (the
#: classification and QA models keep them, with zeros for the virtual tokens).
DROPS_TOKEN_TYPE_IDS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
#: ``prompt_tuning_init`` values (HF PEFT's) and the op ``init`` they become.
_CONFIG_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "sample_vocab", "TEXT": "token_ids"}


@register_op
@dataclass(frozen=True)
class AddPrompt(PlanOp):
    """Prepend ``num_virtual_tokens`` trainable vectors at embedding layer ``path``.

    ``init``: ``"random"`` (standard normal), ``"sample_vocab"`` (rows of the embedding
    table at random token ids) or ``"token_ids"`` (the rows of ``init_token_ids``).
    ``residual_bottleneck > 0`` adds the residual reparameterisation: one MLP shared by
    all tokens, or one per token with ``residual_separate``.
    """

    op: ClassVar[str] = "prompt_embedding"
    mergeable: ClassVar[bool] = False
    num_virtual_tokens: int = 0
    token_dim: int = 0
    num_embeddings: int = 0
    init: str = "random"
    init_token_ids: Sequence[int] = ()
    residual_bottleneck: int = 0
    residual_activation: str = "relu"
    residual_layer_norm: bool = True
    residual_dropout: float = 0.0
    residual_separate: bool = False
    token_mask: Sequence[int] = ()
    piece_mask: Sequence[Sequence[int]] = ()
    num_transformer_submodules: int = 1
    encoder: str = ""
    encoder_hidden: int = 0
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    keep_token_type_ids: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_masks()
        where = f"prompt_embedding op on {self.path!r}"
        if self.encoder:
            if self.encoder not in PROMPT_ENCODERS or self.encoder_hidden <= 0 or self.encoder_num_layers <= 0:
                raise PlanError(f"{where}: encoder must be one of {PROMPT_ENCODERS} with positive hidden size and layers")
            if not 0.0 <= self.encoder_dropout < 1.0:
                raise PlanError(f"{where}: encoder_dropout must be in [0, 1)")
            if self.residual or self.token_mask or self.piece_mask:
                raise PlanError(f"{where}: a P-tuning prompt encoder cannot be combined with a residual MLP or masks")
        if self.num_transformer_submodules not in (1, 2):
            raise PlanError(f"{where}: num_transformer_submodules must be 1 or 2")
        if min(self.num_virtual_tokens, self.token_dim, self.num_embeddings) <= 0:
            raise PlanError(f"{where}: num_virtual_tokens, token_dim and num_embeddings must be positive")
        if self.init not in PROMPT_INITS:
            raise PlanError(f"{where}: unknown init {self.init!r}; expected one of {PROMPT_INITS}")
        ids = self.init_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_embeddings for i in ids
        ):
            raise PlanError(f"{where}: init_token_ids must be token ids below {self.num_embeddings}")
        object.__setattr__(self, "init_token_ids", tuple(ids))
        if (self.init == "token_ids") != bool(ids) or (ids and len(ids) != self.num_virtual_tokens):
            raise PlanError(f"{where}: init 'token_ids' needs exactly num_virtual_tokens init_token_ids, and only it")
        if self.residual_bottleneck < 0 or self.residual_activation not in ACTIVATIONS:
            raise PlanError(f"{where}: residual_bottleneck must be >= 0 and residual_activation one of {ACTIVATIONS}")
        if not 0.0 <= self.residual_dropout < 1.0:
            raise PlanError(f"{where}: residual_dropout must be in [0, 1)")

    def _check_masks(self) -> None:
        """XPrompt's masks: ``token_mask`` (1 = kept) over the prompt before pruning, whose
        kept tokens are this op's ``num_virtual_tokens``; ``piece_mask``, one row of 0/1 per
        kept token, one entry per piece of the token vector."""
        where = f"prompt_embedding op on {self.path!r}"
        for name in ("token_mask", "piece_mask"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise PlanError(f"{where}: {name} must be a list")
        if not all(m in (0, 1) and not isinstance(m, bool) for m in self.token_mask):
            raise PlanError(f"{where}: token_mask entries must be 0 or 1")
        object.__setattr__(self, "token_mask", tuple(self.token_mask))
        if self.token_mask and sum(self.token_mask) != self.num_virtual_tokens:
            raise PlanError(f"{where}: token_mask keeps {sum(self.token_mask)} tokens, num_virtual_tokens is {self.num_virtual_tokens}")
        rows = [tuple(row) if isinstance(row, Sequence) and not isinstance(row, (str, bytes)) else None for row in self.piece_mask]
        if rows:
            width = len(rows[0] or ())
            ok = len(rows) == self.num_virtual_tokens and 0 < width <= self.token_dim and all(
                row is not None and len(row) == width and all(m in (0, 1) and not isinstance(m, bool) for m in row)
                for row in rows
            )
            if not ok:
                raise PlanError(
                    f"{where}: piece_mask must have num_virtual_tokens rows of 0/1, all with the same number "
                    f"of pieces (at most token_dim)"
                )
            if self.residual:
                raise PlanError(f"{where}: a residual prompt cannot be masked; bake() it first")
        object.__setattr__(self, "piece_mask", tuple(rows))

    def element_mask(self) -> Optional[list[list[float]]]:
        """``piece_mask`` spread over the stored table: ``(num_virtual_tokens *
        num_transformer_submodules, token_dim)`` of 0.0/1.0 (each block of rows, HF's
        decoder block too, masked alike), or None when the prompt is not masked. Piece
        ``j`` of ``k`` covers entries ``[j * dim // k, (j + 1) * dim // k)``."""
        if not self.piece_mask:
            return None
        pieces = len(self.piece_mask[0])
        bounds = [j * self.token_dim // pieces for j in range(pieces + 1)]
        block = [
            [float(row[j]) for j in range(pieces) for _ in range(bounds[j + 1] - bounds[j])]
            for row in self.piece_mask
        ]
        return [list(row) for _ in range(self.num_transformer_submodules) for row in block]

    @property
    def residual(self) -> bool:
        return self.residual_bottleneck > 0

    def residual_shapes(self) -> dict[str, tuple]:
        """Shapes of the residual MLP's tensors (stacked over tokens; 1 when shared)."""
        if not self.residual:
            return {}
        m, b, d = (self.num_virtual_tokens if self.residual_separate else 1), self.residual_bottleneck, self.token_dim
        shapes = {
            "residual_down_weight": (m, b, d),
            "residual_down_bias": (m, b),
            "residual_up_weight": (m, d, b),
            "residual_up_bias": (m, d),
        }
        if self.residual_layer_norm:
            shapes.update({"residual_norm_weight": (m, d), "residual_norm_bias": (m, d)})
        return shapes

    def num_trainable(self) -> int:
        # with P-tuning's encoder the saved prompt is the encoder's output, not trained itself
        derived = self.num_virtual_tokens * self.num_transformer_submodules * self.token_dim if self.encoder else 0
        return super().num_trainable() - derived

    def encoder_shapes(self) -> dict[str, tuple]:
        """Shapes of P-tuning's encoder tensors (HF PEFT's module names), none without one."""
        if not self.encoder:
            return {}
        d, h = self.token_dim, self.encoder_hidden
        shapes: dict[str, tuple] = {"embedding.weight": (self.num_virtual_tokens * self.num_transformer_submodules, d)}
        if self.encoder == "mlp":
            dims = [(h, d), (h, h), (d, h)]
            for index, (out, inp) in zip((0, 2, 4), dims):
                shapes[f"mlp_head.{index}.weight"] = (out, inp)
                shapes[f"mlp_head.{index}.bias"] = (out,)
            return shapes
        for layer in range(self.encoder_num_layers):
            for suffix in ("", "_reverse"):
                shapes[f"lstm_head.weight_ih_l{layer}{suffix}"] = (4 * h, d if layer == 0 else 2 * h)
                shapes[f"lstm_head.weight_hh_l{layer}{suffix}"] = (4 * h, h)
                shapes[f"lstm_head.bias_ih_l{layer}{suffix}"] = (4 * h,)
                shapes[f"lstm_head.bias_hh_l{layer}{suffix}"] = (4 * h,)
        shapes.update({
            "mlp_head.0.weight": (2 * h, 2 * h), "mlp_head.0.bias": (2 * h,),
            "mlp_head.2.weight": (d, 2 * h), "mlp_head.2.bias": (d,),
        })
        return shapes

    def residual_init_bound(self, name: str) -> float:
        """How residual-MLP tensor ``name`` starts: uniform within ``+-bound``, or all
        zeros for a bound of 0. The residual branch starts at zero (the LayerNorm's scale,
        or without LayerNorm the up projection, is zero), so the prompt the model first
        sees is exactly the one the init chose (a TEXT init is not drowned by the MLP)."""
        if name.startswith("residual_norm") or (name.startswith("residual_up") and not self.residual_layer_norm):
            return 0.0
        fan_in = self.token_dim if name.startswith("residual_down") else self.residual_bottleneck
        return 1.0 / math.sqrt(fan_in)

    def check_table(self, shape: tuple) -> None:
        """An :class:`AdapterError` unless the embedding table's (native) shape is
        ``(num_embeddings, token_dim)``, the one this op was planned for."""
        if tuple(shape) != (self.num_embeddings, self.token_dim):
            raise AdapterError(
                f"embedding {self.path!r} is {tuple(shape)}, the plan expects ({self.num_embeddings}, {self.token_dim})"
            )

    def tensor_specs(self) -> dict[str, TensorSpec]:
        # HF PEFT's layout: with 2 submodules (an encoder-decoder model) the table has a
        # second block of rows, which its prompt tuning stores but never puts in the model
        rows = self.num_virtual_tokens * self.num_transformer_submodules
        specs = {"prompt_embeddings": TensorSpec((rows, self.token_dim), "prompt_embeddings", True)}
        # P-tuning's encoder: saved under peftcore's own keys (HF PEFT saves and loads only
        # its output, ``prompt_embeddings``); its names follow HF's modules
        specs.update(
            {f"encoder.{name}": TensorSpec(shape, f"prompt_encoder.{name}", True) for name, shape in self.encoder_shapes().items()}
        )
        specs.update({name: TensorSpec(shape, name, True) for name, shape in self.residual_shapes().items()})
        return specs

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        node = graph.get(self.path)
        if node.kind != "embedding":
            return f"layer {self.path!r} is a {node.kind}; prompt tuning needs the input embedding layer"
        if (node.num_embeddings, node.embedding_dim) != (self.num_embeddings, self.token_dim):
            return (
                f"embedding {self.path!r} is {node.num_embeddings} x {node.embedding_dim}, the adapter was "
                f"trained for {self.num_embeddings} x {self.token_dim}"
            )
        return None

    def baked(self) -> AddPrompt:
        """The same prompt without its residual MLP (its tensors hold the MLP's output)."""
        return dataclasses.replace(self, residual_bottleneck=0, init="random", init_token_ids=())


@config_class
class PromptTuningConfig(PeftConfig):
    """Configure prompt tuning, with HF PEFT's field names.

    - ``num_virtual_tokens``: how many trainable vectors are prepended to the input.
    - ``prompt_tuning_init``: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` (copies of random rows of
      the embedding table) or ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text``,
      tokenised, repeated or cut to length).
    - ``tokenizer_name_or_path`` / ``tokenizer_kwargs``: the tokenizer for TEXT, loaded as HF
      PEFT loads it, ``transformers.AutoTokenizer.from_pretrained(name, **kwargs)``: a local
      directory, or a hub name where your environment lets transformers download.
    - ``tokenizer``: a tokenizer object to use instead (any callable returning
      ``{"input_ids": [...]}`` or a list of ids); used only to plan, never saved.
    - ``embedding_layer``: path of the embedding layer to prompt; by default the model's
      input embedding (or its only embedding layer).
    - ``token_dim``: checked against the embedding width when set.
    - ``num_transformer_submodules``: 2 for an encoder-decoder model (the default with
      ``task_type="SEQ_2_SEQ_LM"``, as in HF PEFT), else 1. As in HF PEFT, the prompt goes
      in front of the encoder's input only; with 2 the saved table has ``2 *
      num_virtual_tokens`` rows (HF's layout), the second block unused.
    """

    is_prompt_learning: ClassVar[bool] = True
    method: ClassVar[str] = "prompt_tuning"
    peft_type: ClassVar[str] = PeftType.PROMPT_TUNING
    plan_ops: ClassVar[tuple] = ("freeze_base", "prompt_embedding", "modules_to_save")
    hf_unsupported_fields: ClassVar[Mapping[str, Any]] = {}

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    modules_to_save: Optional[list] = None
    embedding_layer: Optional[str] = runtime_field()
    tokenizer: Any = runtime_field()

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        validate_virtual_tokens(name, self, ("token_dim", "num_attention_heads", "num_layers"))
        check(
            self.num_transformer_submodules in (None, 1, 2),
            f"{name}.num_transformer_submodules must be 1 or 2 (or None), got {self.num_transformer_submodules!r}",
        )
        self.prompt_tuning_init = str(self.prompt_tuning_init)  # a PromptTuningInit member -> its string
        check(
            self.prompt_tuning_init in _CONFIG_INITS,
            f"{name}.prompt_tuning_init must be one of {sorted(_CONFIG_INITS)}, got {self.prompt_tuning_init!r}",
        )
        check_type(name, "prompt_tuning_init_text", self.prompt_tuning_init_text, (str,), allow_none=True)
        if self.prompt_tuning_init == "TEXT":
            check(bool(self.prompt_tuning_init_text), f"{name}: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        check_type(name, "embedding_layer", self.embedding_layer, (str,), allow_none=True)
        validate_modules_to_save(name, self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        # A TEXT init from a tokenizer object only is saved as RANDOM: HF PEFT refuses TEXT
        # without tokenizer_name_or_path, and the saved prompt replaces any initial value.
        data = super().to_dict()
        if data.get("prompt_tuning_init") == "TEXT" and not data.get("tokenizer_name_or_path"):
            data["prompt_tuning_init"] = "RANDOM"
        return data

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> PromptTuningConfig:
        """Also the sizes HF PEFT writes (``token_dim``, ``num_layers``, ...) and the task's heads."""
        prompts = [op for op in (plan.ops if plan is not None else ()) if isinstance(op, AddPrompt)]
        saved: PromptTuningConfig = saved_prompt_config(self, graph, prompts[0].token_dim if prompts else None)
        return saved

    # -- planning -------------------------------------------------------------------
    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        return self._plan(graph, adapter_name, for_loading=False)

    def loading_plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        # the saved prompt replaces any initial value, so no tokenizer is needed
        return self._plan(graph, adapter_name, for_loading=True)

    def _plan(self, graph: ModelGraph, adapter_name: str, for_loading: bool) -> RewritePlan:
        node = self.embedding_node(graph)
        if self.token_dim is not None and self.token_dim != node.embedding_dim:
            raise ConfigError(
                f"{type(self).__name__}.token_dim={self.token_dim} but embedding {node.path!r} is "
                f"{node.embedding_dim} wide"
            )
        init = "random" if for_loading else _CONFIG_INITS[self.prompt_tuning_init]
        token_ids = self.init_token_ids(int(node.num_embeddings or 0)) if init == "token_ids" else ()
        prompt = AddPrompt(
            path=node.path,
            num_virtual_tokens=planned_virtual_tokens(type(self).__name__, self),
            token_dim=int(node.embedding_dim or 0),
            num_embeddings=int(node.num_embeddings or 0),
            init=init,
            init_token_ids=token_ids,
            num_transformer_submodules=self.transformer_submodules(),
            keep_token_type_ids=self.task_type not in DROPS_TOKEN_TYPE_IDS,
            **self.residual_fields(),
        )
        ops: list[PlanOp] = [FreezeBase(), prompt]
        saved = effective_modules_to_save(self.task_type, self.modules_to_save)
        ops.extend(modules_to_save_ops(graph, saved, type(self).__name__, hf_key_prefix=HF_PROMPT_MODULES_PREFIX))
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def transformer_submodules(self) -> int:
        """``num_transformer_submodules``, defaulting as HF PEFT does: 2 for ``SEQ_2_SEQ_LM``."""
        if self.num_transformer_submodules is not None:
            return int(self.num_transformer_submodules)
        return 2 if self.task_type == "SEQ_2_SEQ_LM" else 1

    def residual_fields(self) -> dict[str, Any]:
        """The ``residual_*`` fields of the prompt op (none for plain prompt tuning)."""
        return {}

    def embedding_node(self, graph: ModelGraph) -> LayerNode:
        """The embedding layer the prompt goes in front of."""
        owner = type(self).__name__
        path = self.embedding_layer or graph.input_embedding
        if path is None:
            embeddings = graph.of_kind("embedding")
            if len(embeddings) != 1:
                found = ", ".join(repr(n.path) for n in embeddings) or "none"
                raise PlanError(
                    f"{owner}: cannot tell which embedding layer takes the input tokens (embedding layers: "
                    f"{found}); set embedding_layer to its path"
                )
            return embeddings[0]
        if path not in graph:
            raise PlanError(f"{owner}: the model has no layer {path!r} for prompt tuning")
        node = graph.get(path)
        if node.kind != "embedding":
            raise PlanError(f"{owner}: layer {path!r} is a {node.kind}, prompt tuning needs an embedding layer")
        return node

    def init_token_ids(self, vocab_size: int) -> tuple[int, ...]:
        """Token ids of ``prompt_tuning_init_text``, repeated or cut to ``num_virtual_tokens``."""
        return text_init_token_ids(
            type(self).__name__, str(self.prompt_tuning_init_text), self.tokenizer, self.tokenizer_name_or_path,
            self.tokenizer_kwargs, int(self.num_virtual_tokens or 0), vocab_size,
        )


@config_class
class ResidualPromptTuningConfig(PromptTuningConfig):
    """Prompt tuning whose prompt passes through a residual bottleneck MLP while training.

    ``P' = P + LN(up(act(down(dropout?(P)))))``: ``bottleneck_size`` hidden units,
    ``activation`` (relu, gelu, tanh, sigmoid, identity), ``layer_norm`` on the MLP
    output, ``dropout`` on the hidden layer, and ``separate_mlps`` for one MLP per
    virtual token instead of one shared MLP. ``PeftModel.bake()`` stores ``P'`` as a
    plain prompt and drops the MLP, for inference at prompt-tuning cost.
    """

    method: ClassVar[str] = "residual_prompt_tuning"
    peft_type: ClassVar[str] = PeftType.RESIDUAL_PROMPT_TUNING

    bottleneck_size: int = 64
    activation: str = "relu"
    layer_norm: bool = True
    dropout: float = 0.0
    separate_mlps: bool = False

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_type(name, "bottleneck_size", self.bottleneck_size, (int,))
        check(self.bottleneck_size > 0, f"{name}.bottleneck_size must be positive, got {self.bottleneck_size}")
        check(self.activation in ACTIVATIONS, f"{name}.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        check_type(name, "layer_norm", self.layer_norm, (bool,))
        check_type(name, "separate_mlps", self.separate_mlps, (bool,))
        check_type(name, "dropout", self.dropout, (int, float))
        check(0.0 <= self.dropout < 1.0, f"{name}.dropout must be in [0, 1), got {self.dropout}")

    def residual_fields(self) -> dict[str, Any]:
        return {
            "residual_bottleneck": self.bottleneck_size,
            "residual_activation": self.activation,
            "residual_layer_norm": self.layer_norm,
            "residual_dropout": float(self.dropout),
            "residual_separate": self.separate_mlps,
        }

    def baked(self) -> PromptTuningConfig:
        """The plain prompt-tuning config a baked adapter is saved with."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(PromptTuningConfig)}
        return PromptTuningConfig(**{**shared, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None})
