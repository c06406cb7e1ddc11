"""Prefix tuning (Li & Liang, 2021), with Hugging Face PEFT's config fields and saved keys.

Every attention layer gets ``num_virtual_tokens`` trained key and value vectors in front
of its own keys and values; every query attends to them. All layers' prefixes come from
one table, ``(num_virtual_tokens, num_layers * 2 * token_dim)``, laid out as HF PEFT's
``prompt_embeddings``: for layer ``l`` the keys are columns ``[2l * d, (2l + 1) * d)`` and
the values the next ``d``, where ``d = token_dim`` is the width of one layer's keys (all
key/value heads side by side; smaller than the hidden size under grouped-query
attention). With ``prefix_projection`` the table is computed while training by HF's
reparameterisation, ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(...,
num_layers * 2 * token_dim)`` over ``num_virtual_tokens`` trained vectors.

As in HF PEFT, the real tokens are positioned after the prefix: their positions start at
``num_virtual_tokens`` (the prefix sits in front of them as a key/value cache would).

Encoder-decoder models (``task_type="SEQ_2_SEQ_LM"``, T5 and BART), as HF PEFT does them:
only the decoder's self-attention gets a prefix (the encoder and the cross-attention are
untouched). HF PEFT's table is then read as if it held ``num_layers`` layers of self- and
cross-attention prefixes twice over, so decoder layer ``l`` takes its keys from table
entry ``4l mod 2L`` and its values from the next one (``L = num_layers``, the model's
layer count; the entries HF PEFT reads as cross-attention prefixes go unused);
:attr:`AddPrefixEncoder.key_entries` records this.

Saved file: ``prompt_embeddings`` (the table; with a projection, its current value, which
is what HF PEFT saves and loads), plus with a projection the MLP's own tensors under
``prompt_encoder.*`` so that peftcore can go on training it. An HF PEFT file, which has
only the table, loads as a prefix without projection (HF PEFT's own inference mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

from peftcore.architectures import KEY_NAMES
from peftcore.config import PeftConfig, check, check_type, config_class
from peftcore.errors import ConfigError, PlanError, TargetNotFoundError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.common import (
    effective_modules_to_save,
    modules_to_save_ops,
    planned_virtual_tokens,
    saved_prompt_config,
    validate_modules_to_save,
    validate_virtual_tokens,
)
from peftcore.methods.prompt_tuning import HF_PROMPT_MODULES_PREFIX
from peftcore.methods.unipelt import BLOCK_LAYOUTS, BlockLayout
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan, TensorSpec, register_op
from peftcore.targeting import DEFAULT_LAYERS_PATTERNS

#: The projection's tensors (peftcore names -> names relative to the op's holder).
PROJECTION_TENSORS = (
    "embedding.weight",
    "transform.0.weight",
    "transform.0.bias",
    "transform.2.weight",
    "transform.2.bias",
)
#: Where the holder of the table sits under the op's path (the first attention module).
ENCODER_CHILD = "prefix_encoder"


@register_op
@dataclass(frozen=True)
class AddPrefixEncoder(PlanOp):
    """Prefix tuning's table of key/value prefixes for ``attention_paths`` (in layer order).

    ``path`` is the first attention module (the holder of the table lives under it);
    ``width`` is one layer's key width (HF's ``token_dim``); ``key_paths`` and
    ``key_split`` name each layer's key projection and how many tensors its output holds
    side by side (3 for GPT-2's fused ``c_attn``), checked on loading.
    ``projection_hidden > 0`` adds HF's MLP reparameterisation with that hidden size.
    ``zero_init`` starts the table at zero (with a projection: its last layer), HF's
    ``init_weights="zero"``.
    ``table_layers`` is how many layers the table holds (default: one per attention
    module) and ``key_entries`` the table entry (a ``width``-wide column block) holding
    each attention module's keys, its values being the next entry (default ``2 * i``).
    """

    op: ClassVar[str] = "prefix_encoder"
    mergeable: ClassVar[bool] = False
    num_virtual_tokens: int = 0
    width: int = 0
    attention_paths: Sequence[str] = ()
    key_paths: Sequence[str] = ()
    key_split: int = 1
    projection_hidden: int = 0
    table_layers: int = 0
    key_entries: Sequence[int] = ()
    zero_init: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        where = f"prefix_encoder op on {self.path!r}"
        for name in ("attention_paths", "key_paths"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
                raise PlanError(f"{where}: {name} must be a list of module paths")
            object.__setattr__(self, name, tuple(value))
        if min(self.num_virtual_tokens, self.width, self.key_split) <= 0 or self.projection_hidden < 0:
            raise PlanError(f"{where}: num_virtual_tokens, width and key_split must be positive, projection_hidden >= 0")
        if not self.attention_paths or self.attention_paths[0] != self.path:
            raise PlanError(f"{where}: attention_paths must start with the op's path")
        if self.key_paths and len(self.key_paths) != len(self.attention_paths):
            raise PlanError(f"{where}: key_paths must name one key projection per attention module")
        entries = self.key_entries
        if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in entries
        ):
            raise PlanError(f"{where}: key_entries must be a list of table entries")
        object.__setattr__(self, "key_entries", tuple(entries))
        if not isinstance(self.zero_init, bool):
            raise PlanError(f"{where}: zero_init must be a bool, got {self.zero_init!r}")
        if self.table_layers < 0:
            raise PlanError(f"{where}: table_layers must not be negative")
        if entries and len(entries) != len(self.attention_paths):
            raise PlanError(f"{where}: key_entries must give one table entry per attention module")
        if any(e < 0 or e + 1 >= 2 * self.num_layers for e in entries):
            raise PlanError(f"{where}: key_entries must lie in the table's {2 * self.num_layers} entries")

    @property
    def num_layers(self) -> int:
        """Layers of prefixes the table holds."""
        return self.table_layers or len(self.attention_paths)

    def key_entry(self, index: int) -> int:
        """The table entry holding the keys of attention module ``index`` (values: the next)."""
        return self.key_entries[index] if self.key_entries else 2 * index

    @property
    def table_width(self) -> int:
        """Columns of the table: keys and values of every layer."""
        return self.num_layers * 2 * self.width

    def tensor_specs(self) -> dict[str, TensorSpec]:
        specs = {
            f"{ENCODER_CHILD}.prompt_embeddings": TensorSpec(
                (self.num_virtual_tokens, self.table_width), "prompt_embeddings", True
            )
        }
        if self.projection_hidden:
            n, d, h = self.num_virtual_tokens, self.width, self.projection_hidden
            shapes = dict(zip(PROJECTION_TENSORS, [(n, d), (h, d), (h,), (self.table_width, h), (self.table_width,)]))
            specs.update(
                {f"{ENCODER_CHILD}.{name}": TensorSpec(shape, f"prompt_encoder.{name}", True) for name, shape in shapes.items()}
            )
        return specs

    def num_trainable(self) -> int:
        # with a projection the saved table is the MLP's output, not a trained tensor
        derived = self.num_virtual_tokens * self.table_width if self.projection_hidden else 0
        return super().num_trainable() - derived

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        for path in self.attention_paths:
            if path not in graph:
                return f"the prefix was planned for attention module {path!r}, which this model lacks"
        for path in self.key_paths:
            if path not in graph:
                return f"the prefix was planned with key projection {path!r}, which this model lacks"
            node = graph.get(path)
            if node.kind != "linear" or node.out_features != self.width * self.key_split:
                return f"key projection {path!r} does not produce keys of width {self.width} (the adapter's prefix width)"
        return None


@config_class
class PrefixTuningConfig(PeftConfig):
    """Configure prefix tuning, with HF PEFT's field names.

    - ``num_virtual_tokens``: prefix length (trained key/value vectors per layer).
    - ``prefix_projection``: train the prefixes through HF's two-layer MLP
      (``encoder_hidden_size`` hidden units, default ``token_dim``).
    - ``token_dim``, ``num_layers``, ``num_attention_heads``: read from the model when
      unset (as HF PEFT does; ``token_dim`` is the key width per layer), checked when set.
    - ``attention_module`` and ``key_module`` (peftcore's, relative to a transformer
      block) for a model type without a built-in layout (BERT, GPT-2, Llama and its
      relatives have one).

    - ``init_weights``: ``None`` (random, HF's default) or ``"zero"`` (the table, or with a
      projection the MLP's last layer, starts at zero), as HF PEFT.
    - ``num_transformer_submodules``: HF's; 2 for ``task_type="SEQ_2_SEQ_LM"`` (the prefix
      then goes into the decoder's self-attention only, see the module docstring), else 1.

    Works where the torch backend can reach the attention: transformers models that
    dispatch through the attention interface (BERT, GPT-2, Llama..., and T5 and BART as
    sequence-to-sequence models).
    """

    is_prompt_learning: ClassVar[bool] = True
    method: ClassVar[str] = "prefix_tuning"
    peft_type: ClassVar[str] = PeftType.PREFIX_TUNING
    plan_ops: ClassVar[tuple] = ("freeze_base", "prefix_encoder", "modules_to_save")
    peftcore_fields: ClassVar[tuple] = ("attention_module", "key_module")

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None
    modules_to_save: Optional[list] = None
    attention_module: Optional[str] = None
    key_module: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        sizes = ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size")
        validate_virtual_tokens(name, self, sizes)
        for field_name in sizes:
            value = getattr(self, field_name)
            check(value is None or value > 0, f"{name}.{field_name} must be positive, got {value}")
        submodules = 2 if self.is_seq2seq else 1
        check(
            self.num_transformer_submodules in (None, submodules),
            f"{name}.num_transformer_submodules={self.num_transformer_submodules!r}: task_type "
            f"{self.task_type!r} has {submodules} (2 only for SEQ_2_SEQ_LM, whose decoder gets the prefix)",
        )
        check_type(name, "prefix_projection", self.prefix_projection, (bool,))
        check(
            self.init_weights in (None, "zero"),
            f"{name}.init_weights must be None (random) or 'zero', got {self.init_weights!r}",
        )
        for field_name in ("attention_module", "key_module"):
            check_type(name, field_name, getattr(self, field_name), (str,), allow_none=True)
        validate_modules_to_save(name, self.modules_to_save)

    @property
    def is_seq2seq(self) -> bool:
        """Whether this prefix goes into an encoder-decoder model's decoder (HF's 2 submodules)."""
        return self.task_type == "SEQ_2_SEQ_LM"

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> PrefixTuningConfig:
        """Also the sizes HF PEFT writes (for grouped-query attention, ``token_dim`` and
        ``num_attention_heads`` of the keys and values) and the task's heads."""
        prefixes = [op for op in (plan.ops if plan is not None else ()) if isinstance(op, AddPrefixEncoder)]
        width = prefixes[0].width if prefixes else None
        layers = (prefixes[0].table_layers or len(prefixes[0].attention_paths)) if prefixes else None
        saved: PrefixTuningConfig = saved_prompt_config(self, graph, width, layers, kv_heads=True)
        return saved

    # -- planning -------------------------------------------------------------------
    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        return self._plan(graph, adapter_name, projection=self.prefix_projection)

    def loading_plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        # a file without peftcore's plan (HF PEFT's) holds only the table of prefixes
        return self._plan(graph, adapter_name, projection=False)

    def _plan(self, graph: ModelGraph, adapter_name: str, projection: bool) -> RewritePlan:
        owner = type(self).__name__
        layout = self.layout(graph)
        attentions: list[LayerNode] = []
        keys: list[LayerNode] = []
        for block in self.blocks(graph):
            attentions.append(_node(graph, block, layout.attention, "attention_module", owner))
            key = _node(graph, block, layout.key, "key_module", owner)
            if key.kind != "linear":
                raise TargetNotFoundError(f"{owner}: {key.path!r} is a {key.type_name or key.kind}, not a linear layer (check key_module)")
            keys.append(key)
        widths = {divmod(int(k.out_features or 0), layout.key_split) for k in keys}
        if len(widths) != 1 or next(iter(widths))[1] or next(iter(widths))[0] <= 0:
            raise ConfigError(f"{owner}: the key projections do not all give keys of one width: {sorted(widths)}")
        width = next(iter(widths))[0]
        table_layers = len(attentions)
        if self.is_seq2seq:
            table_layers = len(self.blocks(graph, part="encoder"))
            if table_layers != len(attentions):
                raise ConfigError(
                    f"{owner}: the encoder has {table_layers} layers and the decoder {len(attentions)}; HF PEFT's "
                    f"sequence-to-sequence prefix layout needs as many of each"
                )
        for field_name, actual in (("token_dim", width), ("num_layers", table_layers)):
            given = getattr(self, field_name)
            if given is not None and given != actual:
                raise ConfigError(f"{owner}.{field_name}={given} but the model has {actual}")
        prefix = AddPrefixEncoder(
            path=attentions[0].path,
            num_virtual_tokens=planned_virtual_tokens(owner, self),
            width=width,
            attention_paths=tuple(a.path for a in attentions),
            key_paths=tuple(k.path for k in keys),
            key_split=layout.key_split,
            projection_hidden=int(self.encoder_hidden_size or width) if projection else 0,
            table_layers=table_layers if self.is_seq2seq else 0,
            # HF doubles the table to (self k, self v, cross k, cross v) per decoder layer
            key_entries=tuple(4 * i % (2 * table_layers) for i in range(len(attentions))) if self.is_seq2seq else (),
            zero_init=self.init_weights == "zero",
        )
        ops: list[PlanOp] = [FreezeBase(), prefix]
        saved = effective_modules_to_save(self.task_type, self.modules_to_save)
        ops.extend(modules_to_save_ops(graph, saved, owner, hf_key_prefix=HF_PROMPT_MODULES_PREFIX))
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def layout(self, graph: ModelGraph) -> BlockLayout:
        """Where the attention and its key projection sit in a block of this model: the
        config's ``attention_module``/``key_module``, else the model type's known layout,
        else one read off the model's first block (:func:`derive_layout`)."""
        default = (SEQ2SEQ_LAYOUTS if self.is_seq2seq else BLOCK_LAYOUTS).get(graph.model_type)
        if default is None and (self.attention_module is None or self.key_module is None):
            default = derive_layout(graph, self.blocks(graph)[0])
        attention = self.attention_module or (default.attention if default else None)
        key = self.key_module or (default.key if default else None)
        if attention is None or key is None:
            raise ConfigError(
                f"{type(self).__name__}: there is no default prefix-tuning layout for model type "
                f"{graph.model_type or 'unknown'!r}; set attention_module and key_module (paths relative to a "
                f"transformer block, e.g. 'self_attn' and 'self_attn.k_proj')"
            )
        split = default.key_split if default is not None and self.key_module is None else 1
        return BlockLayout(attention=attention, lora=(), key=key, ffn_output="", key_split=split)

    def blocks(self, graph: ModelGraph, part: Optional[str] = None) -> list[str]:
        """Paths of the transformer blocks that get a prefix, in model order: all of them,
        or for a sequence-to-sequence task the decoder's (``part`` picks another part)."""
        part = part or ("decoder" if self.is_seq2seq else None)
        layers = "|".join(re.escape(p) for p in DEFAULT_LAYERS_PATTERNS)
        within = rf"(?:.*\.)?{part}\." if part else r"(?:.*\.)?"
        regex = re.compile(rf"{within}(?:{layers})\.(\d+)")
        found = [node.path for node in graph if regex.fullmatch(node.path)]
        if not found:
            where = f"a layer named '<...>.{part}.layers.<index>'" if part else "a layer named '<...>.layers.<index>'"
            raise TargetNotFoundError(f"{type(self).__name__}: found no transformer block ({where})")
        if not part and all(any(re.search(rf"(?:^|\.){side}\.", path) for path in found) for side in ("encoder", "decoder")):
            raise ConfigError(
                f"{type(self).__name__}: this is an encoder-decoder model; prefix tuning it needs "
                f"task_type='SEQ_2_SEQ_LM' (the prefix goes into the decoder's self-attention)"
            )
        return found


#: Where the decoder's self-attention and its key projection sit in an encoder-decoder block.
SEQ2SEQ_LAYOUTS: dict[str, BlockLayout] = {
    "t5": BlockLayout("layer.0.SelfAttention", (), "layer.0.SelfAttention.k", ""),
    "mt5": BlockLayout("layer.0.SelfAttention", (), "layer.0.SelfAttention.k", ""),
    "bart": BlockLayout("self_attn", (), "self_attn.k_proj", ""),
}


def derive_layout(graph: ModelGraph, block: str) -> Optional[BlockLayout]:
    """The layout of a block whose model type has none built in: its key projection is
    the first linear layer (in model order) with the earliest name of
    :data:`~peftcore.architectures.KEY_NAMES`, and the attention is that layer's parent.
    ``None`` when the block has no layer of those names."""
    inside = [node for node in graph if node.path.startswith(block + ".") and node.kind == "linear"]
    for name, split in KEY_NAMES:
        for node in inside:
            if node.name == name and "." in node.path[len(block) + 1 :]:
                key = node.path[len(block) + 1 :]
                return BlockLayout(attention=key.rsplit(".", 1)[0], lora=(), key=key, ffn_output="", key_split=split)
    return None


def _node(graph: ModelGraph, block: str, rel: str, field_name: str, owner: str) -> LayerNode:
    path = f"{block}.{rel}"
    if path not in graph:
        raise TargetNotFoundError(f"{owner}: block {block!r} has no module {rel!r} (set {field_name} to its path relative to the block)")
    return graph.get(path)
