"""LoRA: a trainable low-rank delta ``(alpha / r) * B @ A`` beside frozen weights."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union, cast

import numpy as np

from peftcore.config import PeftConfig, check, check_type, config_class
from peftcore.errors import ConfigError, PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.common import (
    effective_modules_to_save,
    modules_to_save_ops,
    validate_layers_pattern,
    validate_layers_to_transform,
    validate_modules_to_save,
)
from peftcore.methods.lora_init import is_weight_init
from peftcore.methods.lora_params import AddParamLora, param_lora_ops, validate_target_parameters
from peftcore.methods.trainable_tokens import trainable_token_ops, validate_trainable_token_indices
from peftcore.pattern_keys import MAX_REGEX_KEYS, PatternKeys, literal_form
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan, TensorSpec, op_types, register_op
from peftcore.targeting import ALL_LINEAR, Targets, check_regex, default_target_modules, select_layers, validate_targets

#: The op name of LoRA on a convolution (:class:`peftcore.methods.lora_conv.AddLoraConv`).
CONV_LORA_OP = "lora_conv"

#: ``init_lora_weights`` values and the op ``init`` they become.
_INITS = {True: "kaiming", "kaiming": "kaiming", "gaussian": "gaussian", False: "random"}


def op_init(init_lora_weights: Union[bool, str], layer_kind: str) -> str:
    """The op ``init`` of ``init_lora_weights`` on a layer of ``layer_kind``: PiSSA, OLoRA
    and orthogonal (:mod:`peftcore.methods.lora_init`) are for linear layers; an embedding
    gets the default init with them, as in HF PEFT."""
    if isinstance(init_lora_weights, str) and is_weight_init(init_lora_weights):
        return init_lora_weights if layer_kind == "linear" else "kaiming"
    return _INITS[init_lora_weights]


def valid_init(init_lora_weights: Any) -> bool:
    """Whether ``init_lora_weights`` is a value LoRA takes."""
    if isinstance(init_lora_weights, str) and is_weight_init(init_lora_weights):
        return True
    return isinstance(init_lora_weights, (bool, str)) and init_lora_weights in _INITS


@register_op
@dataclasses.dataclass(frozen=True)
class AddLora(PlanOp):
    """Add a low-rank delta ``scaling * B @ A`` to a linear or embedding layer.

    ``A`` is ``(r, in_features)`` and ``B`` is ``(out_features, r)``; for an embedding,
    ``in_features`` is the vocabulary size and ``out_features`` the embedding width.
    ``init`` is ``"kaiming"`` (A kaiming-uniform, B zero), ``"gaussian"`` (A normal
    with std 1/r, B zero) or ``"random"`` (both random: the output changes at once,
    for tests). For an embedding, ``"kaiming"`` and ``"gaussian"`` both make A zero
    and B unit normal, as HF PEFT and the original LoRA code initialise embeddings. A
    linear layer also takes ``"pissa"``, ``"pissa_niter_K"``, ``"olora"`` and
    ``"orthogonal"`` (:mod:`peftcore.methods.lora_init`; PiSSA and OLoRA also change
    the base weight).

    ``use_dora`` makes it DoRA (Liu et al., 2024): the adapter also has a magnitude
    vector ``m`` of ``out_features`` (HF PEFT's ``lora_magnitude_vector``), and the layer
    computes with ``m / ||W + scaling * B @ A|| * (W + scaling * B @ A)``, the norm taken
    per output over every other axis of the canonical weight (:func:`dora_merged`).
    """

    op: ClassVar[str] = "lora"
    merge_target: ClassVar[Optional[str]] = "weight"
    layer_kind: str = "linear"
    in_features: int = 0
    out_features: int = 0
    r: int = 8
    lora_alpha: float = 8.0
    scaling: float = 1.0
    dropout: float = 0.0
    init: str = "kaiming"
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_kind not in ("linear", "embedding"):
            raise PlanError(f"lora op on {self.path!r}: layer_kind must be 'linear' or 'embedding', got {self.layer_kind!r}")
        if self.init not in ("kaiming", "gaussian", "random") and not (self.layer_kind == "linear" and is_weight_init(self.init)):
            raise PlanError(f"lora op on {self.path!r}: unknown init {self.init!r}")
        if min(self.r, self.in_features, self.out_features) <= 0 or not 0.0 <= self.dropout < 1.0:
            raise PlanError(f"lora op on {self.path!r}: r, in_features and out_features must be positive, dropout in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Without ``use_dora`` when it is off: a plain LoRA plan reads as before DoRA."""
        data = super().to_dict()
        if not self.use_dora:
            del data["use_dora"]
        return data

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        node = graph.get(self.path)
        if node.kind != self.layer_kind:
            return f"layer {self.path!r} is a {node.kind}, the adapter expects a {self.layer_kind}"
        if node.kind == "embedding":
            dims = (node.num_embeddings, node.embedding_dim)
        else:
            dims = (node.in_features, node.out_features)
        if dims != (self.in_features, self.out_features):
            return (
                f"layer {self.path!r} maps {dims[0]} -> {dims[1]} features, the adapter was "
                f"trained for {self.in_features} -> {self.out_features}"
            )
        return None

    def delta(self, tensors: Mapping[str, Any], base: Any = None) -> Any:
        """``scaling * B @ A``, the change to the weight in canonical layout: ``(out, in)``
        for a linear layer, transposed to the table's ``(num_embeddings, dim)`` for an
        embedding. DoRA's change is the merged weight minus ``base`` (the base weight, in
        the same layout), so it is None without ``base``."""
        a, b = tensors["lora_A"], tensors["lora_B"]
        change = (b @ a) * b.dtype.type(self.scaling)
        if self.use_dora:
            if base is None:
                return None
            weight = base.T if self.layer_kind == "embedding" else base
            change = dora_merged(weight, change, tensors[MAGNITUDE]) - weight
        return change.T if self.layer_kind == "embedding" else change

    def tensor_specs(self) -> dict[str, TensorSpec]:
        if self.layer_kind == "embedding":
            specs = {
                "lora_A": TensorSpec((self.r, self.in_features), "lora_embedding_A"),
                "lora_B": TensorSpec((self.out_features, self.r), "lora_embedding_B"),
            }
        else:
            specs = {
                "lora_A": TensorSpec((self.r, self.in_features), "lora_A.weight"),
                "lora_B": TensorSpec((self.out_features, self.r), "lora_B.weight"),
            }
        if self.use_dora:  # HF PEFT's file key has no ".weight", though its module holds one
            specs[MAGNITUDE] = TensorSpec((self.out_features,), MAGNITUDE)
        return specs


#: The canonical (and HF PEFT's saved) name of DoRA's magnitude vector.
MAGNITUDE = "lora_magnitude_vector"


def dora_weight_norm(weight: Any) -> Any:
    """The L2 norm of a canonical weight (output axis first: ``(out, in)``, a
    convolution's ``(out, in, *kernel)``) per output, over every other axis."""
    return np.sqrt(np.sum(np.square(weight), axis=tuple(range(1, weight.ndim))))


def dora_merged(weight: Any, lora_delta: Any, magnitude: Any) -> Any:
    """DoRA's weight: ``m / ||W + dW|| * (W + dW)`` per output (canonical layout, output
    axis first; ``lora_delta`` is ``scaling * B @ A`` reshaped like ``weight``). A zero
    norm (an output whose weights are all zero) leaves that output zero."""
    combined = weight + lora_delta.reshape(weight.shape)
    norm = dora_weight_norm(combined)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(norm > 0, magnitude / norm, 0).astype(combined.dtype)
    return combined * factor.reshape((-1,) + (1,) * (weight.ndim - 1))


@register_op
@dataclasses.dataclass(frozen=True)
class TrainBaseBias(PlanOp):
    """Train the bias of layer ``path`` itself, in place (LoRA's ``bias="all"`` or
    ``"lora_only"``, as HF PEFT does): no copy is made, so the trained bias stays in the
    model when the adapter is disabled or deleted, and only one adapter may use it.

    ``size`` is the bias length; ``wrapped`` says whether the plan also puts a LoRA on the
    layer, which makes HF PEFT's file key ``<path>.base_layer.bias`` instead of ``<path>.bias``.
    """

    op: ClassVar[str] = "base_bias"
    trains_base_in_place: ClassVar[bool] = True
    size: int = 0
    wrapped: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size <= 0:
            raise PlanError(f"base_bias op on {self.path!r}: size must be positive, got {self.size}")

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return {"bias": TensorSpec((self.size,), "base_layer.bias" if self.wrapped else "bias")}

    def base_tensors(self) -> dict[str, str]:
        return {"bias": "bias"}

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        shape = graph.get(self.path).params.get("bias")
        if shape is None or math.prod(shape) != self.size:
            return f"layer {self.path!r} has {'no bias' if shape is None else f'a bias of shape {shape}'}, the adapter trains one of {self.size}"
        return None


#: LoRA's ``bias`` values (HF PEFT's).
BIAS_CHOICES = ("none", "all", "lora_only")


@config_class
class LoraConfig(PeftConfig):
    """Configure LoRA (Hu et al., 2021), with HF PEFT's field names.

    - ``r``: rank of the update; ``lora_alpha``: scale numerator (scaling = alpha / r,
      or alpha / sqrt(r) with ``use_rslora``).
    - ``target_modules``: list (exact name or dotted suffix), regex string, or
      ``"all-linear"``; ``None`` uses a per-model-type default. A named convolution gets
      LoRA's conv form (:mod:`peftcore.methods.lora_conv`); ``"all-linear"`` takes none.
    - ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``: narrow the targets.
    - ``rank_pattern`` / ``alpha_pattern``: per-layer overrides, keyed by a name or
      regex matched against the end of the layer path.
    - ``init_lora_weights``: ``True`` (A kaiming-uniform, B zero), ``"gaussian"``,
      ``False`` (B random too, so the adapter changes the output at once; for tests),
      ``"pissa"``/``"pissa_niter_K"``/``"olora"`` (from the base weight, which keeps the
      rest) or ``"orthogonal"`` (see :mod:`peftcore.methods.lora_init`).
    - ``bias``: ``"none"`` (HF PEFT's default), ``"all"`` (train every bias of the model
      in place) or ``"lora_only"`` (the biases of the LoRA layers), as in HF PEFT: those
      biases are the base model's own, so disabling or deleting the adapter keeps them
      trained, and a model with such an adapter takes no second adapter.
    - ``modules_to_save``: modules trained in full (a copy per adapter) and saved; as in
      HF PEFT, ``task_type="SEQ_CLS"`` / ``"TOKEN_CLS"`` adds the ``classifier`` / ``score``
      head and ``"QUESTION_ANS"`` the ``qa_outputs`` head.
    - ``target_parameters``: parameters (not layers) to put LoRA on, by full name or
      dotted suffix (``["experts.gate_up_proj", "experts.down_proj"]``: a mixture-of-experts
      block's stacked expert weights get a rank-``r`` delta per expert); see
      :mod:`peftcore.methods.lora_params`. As in HF PEFT, without ``target_modules`` only
      these parameters are adapted, and ``lora_dropout`` must be 0.
    - ``trainable_token_indices``: rows of the input embedding to train alone (a list of
      token ids), or a dict of module name -> token ids; a head tied to the embedding
      uses the same rows. See :mod:`peftcore.methods.trainable_tokens`.
    - ``use_dora``: DoRA (weight-decomposed LoRA): a trainable magnitude per output
      beside A and B (see :class:`AddLora`), saved as HF PEFT saves it.
    """

    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = PeftType.LORA
    tensor_prefix: ClassVar[str] = "lora_"
    # the ops of target_parameters and trainable_token_indices ("param_lora",
    # "trainable_tokens") are left out: a backend without their builders still builds the
    # rest of LoRA, and a plan with them is refused by the missing builder before anything
    # is built (the backend's "lora" limitation says why)
    plan_ops: ClassVar[tuple] = ("freeze_base", "lora", CONV_LORA_OP, "base_bias", "modules_to_save")
    hf_unsupported_fields: ClassVar[Mapping[str, Any]] = {
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "layer_replication": None,
        "lora_bias": False,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "monteclora_config": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
        "runtime_config": None,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Targets = None
    exclude_modules: Targets = None
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Union[int, list, None] = None
    layers_pattern: Union[str, list, None] = None
    # saved as {} (never null): HF PEFT calls .keys() on them
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    modules_to_save: Optional[list] = None
    bias: str = "none"
    target_parameters: Optional[list] = None
    trainable_token_indices: Union[list, dict, None] = None
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check(self.bias in BIAS_CHOICES, f"{name}.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        check_type(name, "r", self.r, (int,))
        check(self.r > 0, f"{name}.r must be a positive integer, got {self.r}")
        check_type(name, "lora_alpha", self.lora_alpha, (int, float))
        check(self.lora_alpha > 0, f"{name}.lora_alpha must be positive, got {self.lora_alpha}")
        check_type(name, "lora_dropout", self.lora_dropout, (int, float))
        check(0.0 <= self.lora_dropout < 1.0, f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_type(name, "use_rslora", self.use_rslora, (bool,))
        check_type(name, "fan_in_fan_out", self.fan_in_fan_out, (bool,))
        check_type(name, "use_dora", self.use_dora, (bool,))
        if not valid_init(self.init_lora_weights):
            raise ConfigError(
                f"{name}.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora' "
                f"or 'orthogonal', got {self.init_lora_weights!r}"
            )
        self.target_modules = validate_targets(name, "target_modules", self.target_modules)
        self.exclude_modules = validate_targets(name, "exclude_modules", self.exclude_modules)
        validate_layers_to_transform(name, self.layers_to_transform)
        validate_layers_pattern(name, self.layers_pattern)
        # HF PEFT's rules (and its words): a regex names the layers itself, and a pattern
        # without indices would be silently ignored
        regex = isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR
        for field_name in ("layers_to_transform", "layers_pattern"):
            check(
                not (regex and getattr(self, field_name) is not None),
                f"`{field_name}` cannot be used when `target_modules` is a str. ({name}: put the layer indices "
                "into the regular expression instead)",
            )
        check(
            self.layers_pattern is None or self.layers_to_transform is not None,
            f"When `layers_pattern` is specified, `layers_to_transform` must also be specified. ({name})",
        )
        for field_name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, field_name)
            if pattern is None:
                setattr(self, field_name, {})
                continue
            check(isinstance(pattern, dict), f"{name}.{field_name} must be a dict, got {pattern!r}")
            for key in pattern:
                check(isinstance(key, str) and bool(key), f"{name}.{field_name} keys must be non-empty strings, got {key!r}")
            regex_keys = [key for key in pattern if literal_form(key) is None]  # a literal name needs no check
            check(
                len(regex_keys) <= MAX_REGEX_KEYS,
                f"{name}.{field_name} has {len(regex_keys)} keys that are regular expressions; at most "
                f"{MAX_REGEX_KEYS} (literal layer names, e.g. 'model.layers.0.self_attn.q_proj', are not limited)",
            )
            for key in regex_keys:
                check_regex(f"{name}.{field_name} key", key)
            for key, value in pattern.items():
                check_type(name, f"{field_name}[{key!r}]", value, (int,) if field_name == "rank_pattern" else (int, float))
                check(value > 0, f"{name}.{field_name}[{key!r}] must be positive, got {value}")
        validate_modules_to_save(name, self.modules_to_save)
        validate_target_parameters(self)
        validate_trainable_token_indices(name, self.trainable_token_indices)

    # -- planning -------------------------------------------------------------------
    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha for layer ``path``, after ``rank_pattern``/``alpha_pattern``."""
        return self.layer_settings([path])[path]

    def layer_settings(self, paths: Sequence[str]) -> dict[str, tuple[int, float]]:
        """:meth:`rank_and_alpha` of every path in ``paths``, in work linear in the number
        of keys plus layers (see :mod:`peftcore.pattern_keys`)."""
        ranks, alphas = self._pattern_keys("rank_pattern", paths), self._pattern_keys("alpha_pattern", paths)
        return {
            path: (
                self.rank_pattern[ranks[path]] if ranks[path] is not None else self.r,
                self.alpha_pattern[alphas[path]] if alphas[path] is not None else self.lora_alpha,
            )
            for path in paths
        }

    def _pattern_keys(self, field: str, paths: Sequence[str]) -> dict[str, Optional[str]]:
        """Each path's first matching key of ``rank_pattern``/``alpha_pattern`` (or None)."""
        pattern = getattr(self, field) or {}
        if not pattern:
            return dict.fromkeys(paths)
        return PatternKeys(pattern, f"{type(self).__name__}.{field}").first_matches(paths)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def scalar_source(self, path: str, field: str) -> str:
        """The config entries that give layer ``path`` its ``field`` (of its ``lora`` op),
        for error messages: ``alpha_pattern['q_proj']=1e+308 with r=8 (alpha / r)``."""
        r_key, alpha_key = self._pattern_keys("rank_pattern", [path])[path], self._pattern_keys("alpha_pattern", [path])[path]
        r_entry = f"rank_pattern[{r_key!r}]={self.rank_pattern[r_key]!r}" if r_key is not None else f"r={self.r!r}"
        alpha_entry = (
            f"alpha_pattern[{alpha_key!r}]={self.alpha_pattern[alpha_key]!r}" if alpha_key is not None
            else f"lora_alpha={self.lora_alpha!r}"
        )
        if field == "lora_alpha":
            return alpha_entry
        if field == "scaling":
            return f"{alpha_entry} with {r_entry} ({'alpha / sqrt(r), use_rslora' if self.use_rslora else 'alpha / r'})"
        return "lora_dropout" if field == "dropout" else field

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> LoraConfig:
        """Also the default ``target_modules`` of the model type and the task's heads in
        ``modules_to_save``, as HF PEFT writes them."""
        changes: dict[str, Any] = {"inference_mode": True}
        if self.target_modules is None and graph is not None and not self.target_parameters:
            default = default_target_modules(graph)
            if default is not None:
                changes["target_modules"] = default if isinstance(default, str) else sorted(set(default))
        modules = effective_modules_to_save(self.task_type, self.modules_to_save)
        if modules != self.modules_to_save:
            changes["modules_to_save"] = modules
        # HF PEFT turns fan_in_fan_out on for a transposed (GPT-2 Conv1D) target; peftcore's
        # layers read the layout from the layer itself, so the field only matters in the file
        adapted = [op.path for op in (plan.ops if plan is not None else ()) if isinstance(op, AddLora)]
        if graph is not None and any(p in graph and graph.get(p).type_name == "Conv1D" for p in adapted):
            changes["fan_in_fan_out"] = True
        return self.replace(**changes)

    def variants(self) -> tuple[str, ...]:
        """``("dora",)`` with ``use_dora``: a backend may list DoRA as a limitation."""
        return ("dora",) if self.use_dora else ()

    def plan_disagreement(self, plan: RewritePlan) -> Optional[str]:
        """Each LoRA layer's rank, alpha and scaling in ``plan`` must be what this config
        gives that layer: a reader of the config alone (HF PEFT) would compute those."""
        if plan.method != "lora":
            return None
        lora_ops: list[Any] = [op for op in plan.ops if isinstance(op, (AddLora, AddParamLora))]
        # every layer's settings at once: linear in keys plus layers, bounded (see peftcore.pattern_keys)
        keys = [f"{op.path}.{op.parameter_name}" if isinstance(op, AddParamLora) else op.path for op in lora_ops]
        settings = self.layer_settings(keys)
        for key, op in zip(keys, lora_ops):
            r, alpha = settings[key]
            expected = float(self.scaling(r, alpha))
            if isinstance(op, AddLora) and op.use_dora != self.use_dora:
                return f"the stored plan's entry for layer {op.path!r} has use_dora={op.use_dora}, the config {self.use_dora}"
            if op.r != r or not _close(op.lora_alpha, float(alpha)) or not _close(op.scaling, expected):
                return (
                    f"the stored plan's entry for layer {op.path!r} (r={op.r}, lora_alpha={op.lora_alpha}, "
                    f"scaling={op.scaling}) disagrees with the config (r={r}, lora_alpha={alpha}, scaling={expected})"
                )
        return None

    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        param_ops = self._param_ops(graph)
        # HF PEFT: with target_parameters and no target_modules, only the named parameters
        layers = [] if param_ops and not self.target_modules else select_layers(
            graph,
            self.target_modules,
            owner=type(self).__name__,
            supported_kinds=("linear", "embedding", "conv"),
            exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
        )
        ops: list[PlanOp] = [FreezeBase()]
        settings = self.layer_settings([node.path for node in layers])
        ops.extend(self._lora_op(node, *settings[node.path]) for node in layers)
        ops.extend(param_ops)
        saved = effective_modules_to_save(self.task_type, self.modules_to_save)
        saved_ops = modules_to_save_ops(graph, saved, type(self).__name__)
        ops.extend(self._bias_ops(graph, [node.path for node in layers], [op.path for op in saved_ops]))
        if self.trainable_token_indices is not None:
            ops.extend(trainable_token_ops(graph, self.trainable_token_indices, type(self).__name__, modules_to_save=saved))
        ops.extend(saved_ops)
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def _param_ops(self, graph: ModelGraph) -> list[AddParamLora]:
        """The ops of ``target_parameters`` (none when it is unset)."""
        if not self.target_parameters:
            return []
        init = op_init(self.init_lora_weights, "parameter")
        return param_lora_ops(graph, self.target_parameters, self.layer_settings, self.scaling, init, type(self).__name__)

    def _bias_ops(self, graph: ModelGraph, lora_paths: list[str], saved_paths: list[str]) -> list[TrainBaseBias]:
        """The biases ``bias`` trains in place: every layer's (``"all"``) or the LoRA
        layers' (``"lora_only"``), except inside modules trained in full anyway."""
        if self.bias == "none":
            return []
        chosen = [node for node in graph if self.bias == "all" or node.path in lora_paths]
        return [
            TrainBaseBias(path=node.path, size=math.prod(node.params["bias"]), wrapped=node.path in lora_paths)
            for node in chosen
            if "bias" in node.params
            and not any(node.path == s or node.path.startswith(s + ".") for s in saved_paths)
        ]

    def check_beside(self, others: Mapping[str, PeftConfig]) -> None:
        """As HF PEFT: an adapter that trains base biases (``bias`` not ``"none"``) cannot
        share a model with another adapter, since both would train the same biases."""
        biased = [name for name, config in others.items() if getattr(config, "bias", "none") != "none"]
        if others and (self.bias != "none" or biased):
            raise ConfigError(
                "LoRA supports only 1 adapter with bias: an adapter with bias='all' or 'lora_only' trains the "
                f"base model's own biases, which another adapter would share (adapters with bias: "
                f"{biased + (['the new one'] if self.bias != 'none' else [])}); set bias='none' for all adapters"
            )

    def _lora_op(self, node: LayerNode, r: int, alpha: float) -> AddLora:
        if node.kind == "conv":  # its op is peftcore.methods.lora_conv's (which imports this module)
            conv_op = cast(Any, op_types()[CONV_LORA_OP])
            return cast(AddLora, conv_op.for_layer(
                node, r=r, lora_alpha=float(alpha), scaling=self.scaling(r, alpha), dropout=float(self.lora_dropout),
                init=op_init(self.init_lora_weights, node.kind), use_dora=self.use_dora,
            ))
        if node.kind == "embedding":
            in_features, out_features = node.num_embeddings, node.embedding_dim
        else:
            in_features, out_features = node.in_features, node.out_features
        return AddLora(
            path=node.path,
            layer_kind=node.kind,
            in_features=int(in_features or 0),
            out_features=int(out_features or 0),
            r=r,
            lora_alpha=float(alpha),
            scaling=self.scaling(r, alpha),
            dropout=float(self.lora_dropout),
            init=op_init(self.init_lora_weights, node.kind),
            use_dora=self.use_dora,
        )


def _close(a: float, b: float) -> bool:
    """Equal within a relative 1e-9 (what a float written to JSON and read back keeps)."""
    return abs(a - b) <= 1e-9 * abs(b)
