"""LoRA on a bare parameter (LoraConfig's ``target_parameters``, as HF PEFT defines it).

A module's own ``nn.Parameter`` (not a layer's ``weight``: the stacked expert weights of a
mixture-of-experts block, ``experts.gate_up_proj`` of shape ``(experts, 2 * inter,
hidden)``) gets a low-rank delta that is added to it for the duration of the forward.

Layout, HF PEFT's ``lora.ParamWrapper``:

- a 2-D parameter ``(out, in)`` is one linear map: ``A`` is ``(r, in)``, ``B`` ``(out, r)``;
- a 3-D parameter ``(experts, out, in)`` (``(experts, in, out)`` where the module says
  ``is_transposed``) has a rank-``r`` delta per expert, stored side by side:
  ``A`` is ``(r * experts, in)`` with expert ``e``'s rows at ``e * r .. e * r + r``, and
  ``B`` is ``(out, r * experts)`` with expert ``e``'s columns at ``e, e + experts, ...``
  (the ``(out, r, experts)`` reshape of B). Expert ``e``'s change is
  ``scaling * B_e @ A_e``, transposed for a transposed module.

Several parameters of one module nest, as in HF PEFT: the parameter registered first is
wrapped first, each later one around it, so the last is outermost. An HF file names a
parameter's tensors ``<module>.<"base_layer." per wrapper outside it>lora_A.weight``;
:attr:`AddParamLora.depth` is that count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

from peftcore.errors import ConfigError, PlanError
from peftcore.graph import ModelGraph
from peftcore.plan import PlanOp, TensorSpec, register_op


@register_op
@dataclasses.dataclass(frozen=True)
class AddParamLora(PlanOp):
    """Add a low-rank delta to parameter ``parameter_name`` of the module at ``path``.

    ``stacked`` says the parameter is 3-D, ``num_experts`` its first size (1 for a 2-D
    parameter); ``transposed`` says a 3-D parameter is stored ``(experts, in, out)``; ``depth`` is the number of parameter wrappers around
    this one's (HF PEFT's nesting, which names the file keys). ``init`` is
    ``"kaiming"``, ``"gaussian"`` or ``"random"`` as for :class:`~peftcore.methods.lora.AddLora`.
    """

    op: ClassVar[str] = "param_lora"
    parameter_name: str = ""
    num_experts: int = 1
    in_features: int = 0
    out_features: int = 0
    stacked: bool = False
    transposed: bool = False
    depth: int = 0
    r: int = 8
    lora_alpha: float = 8.0
    scaling: float = 1.0
    init: str = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        where = f"param_lora op on {self.path!r}"
        if not self.path or not self.parameter_name or "." in self.parameter_name:
            raise PlanError(f"{where}: needs a module path and the short name of one of its parameters")
        if not self.stacked and (self.num_experts != 1 or self.transposed):
            raise PlanError(f"{where}: a 2-D parameter has one expert and no transposed layout")
        if min(self.r, self.num_experts, self.in_features, self.out_features) <= 0 or self.depth < 0:
            raise PlanError(f"{where}: r, num_experts, in_features and out_features must be positive, depth >= 0")
        if self.init not in ("kaiming", "gaussian", "random"):
            raise PlanError(f"{where}: unknown init {self.init!r}")

    @property
    def merge_target(self) -> Optional[str]:  # type: ignore[override]
        """The parameter a merge changes (each targeted parameter is its own target)."""
        return self.parameter_name

    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The targeted parameter's shape (canonical: as the module stores it)."""
        if not self.stacked:
            return (self.out_features, self.in_features)
        if self.transposed:
            return (self.num_experts, self.in_features, self.out_features)
        return (self.num_experts, self.out_features, self.in_features)

    @property
    def key_prefix(self) -> str:
        """``base_layer.`` once per wrapper outside this parameter's (HF PEFT's nesting)."""
        return "base_layer." * self.depth

    def tensor_specs(self) -> dict[str, TensorSpec]:
        prefix, rank = self.key_prefix, self.r * self.num_experts
        return {
            f"{prefix}lora_A": TensorSpec((rank, self.in_features), f"{prefix}lora_A.weight"),
            f"{prefix}lora_B": TensorSpec((self.out_features, rank), f"{prefix}lora_B.weight"),
        }

    def delta(self, tensors: Mapping[str, Any], base: Any = None) -> Any:
        """``scaling * B_e @ A_e`` per expert, in the parameter's own shape."""
        a, b = tensors[f"{self.key_prefix}lora_A"], tensors[f"{self.key_prefix}lora_B"]
        return expert_delta(np.asarray(a), np.asarray(b), self.num_experts, self.scaling, self.transposed, self.stacked)

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        if self.path not in graph:
            return f"the model has no module {self.path!r}"
        node = graph.get(self.path)
        shape = node.params.get(self.parameter_name)
        if shape is None:
            return f"module {self.path!r} has no parameter {self.parameter_name!r} (it has {sorted(node.params)})"
        if tuple(shape) != self.parameter_shape:
            return (
                f"parameter {self.path}.{self.parameter_name} has shape {tuple(shape)}, the adapter was trained "
                f"for {self.parameter_shape}"
            )
        if self.stacked and node.transposed != self.transposed:
            return f"module {self.path!r} stores its experts {'(in, out)' if node.transposed else '(out, in)'}, the adapter expects the other layout"
        return None


def expert_delta(a: np.ndarray, b: np.ndarray, experts: int, scaling: float, transposed: bool, stacked: bool) -> np.ndarray:
    """The numpy change of :class:`AddParamLora` (see the module docstring for the layout)."""
    rank = a.shape[0] // experts
    a_e = a.reshape(experts, rank, a.shape[-1])  # (experts, r, in)
    b_e = b.reshape(b.shape[0], rank, experts).transpose(2, 0, 1)  # (experts, out, r)
    change = np.matmul(b_e, a_e) * a.dtype.type(scaling)  # (experts, out, in)
    if not stacked:
        return change[0]
    return change.transpose(0, 2, 1) if transposed else change


def validate_target_parameters(config: Any) -> None:
    """Check a LoRA config's ``target_parameters`` and the settings HF PEFT refuses with it."""
    name, targets = type(config).__name__, config.target_parameters
    if targets is None:
        return
    if isinstance(targets, (tuple, set)):
        targets = config.target_parameters = list(targets)
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{name}.target_parameters must be a list of parameter names, got {targets!r}")
    if not targets:
        return
    if config.lora_dropout:
        raise ConfigError(
            f"{name}: target_parameters does not work with lora_dropout != 0 (HF PEFT's rule: the dropout of the "
            "input cannot be factored out of a weight delta); set lora_dropout=0"
        )
    if config.fan_in_fan_out:
        raise ConfigError(f"{name}: target_parameters does not work with fan_in_fan_out=True")
    for variant in ("use_dora", "lora_bias"):  # HF PEFT's refusals (fields of the LoRA-variants work)
        if getattr(config, variant, False):
            raise ConfigError(f"{name}: target_parameters does not work with {variant}=True (as in HF PEFT)")
    init = config.init_lora_weights
    if isinstance(init, str) and init not in ("gaussian", "kaiming"):
        raise ConfigError(
            f"{name}: target_parameters takes init_lora_weights True, False or 'gaussian', got {init!r} (the "
            "weight-based inits read a layer's weight)"
        )


def param_lora_ops(
    graph: ModelGraph,
    target_parameters: Sequence[str],
    settings: Any,
    scaling: Any,
    init: str,
    owner: str,
) -> list[AddParamLora]:
    """The ops of ``target_parameters``, in HF PEFT's order and nesting.

    A module's parameter ``p`` is chosen when ``<module path>.p`` equals an entry or ends
    with ``.<entry>``. ``settings(keys)`` gives each chosen parameter's ``(r, alpha)`` by
    its full name (``rank_pattern``/``alpha_pattern`` are matched against it, as in HF
    PEFT); ``scaling(r, alpha)`` its scaling.
    """
    targets = sorted(set(target_parameters))
    chosen: list[tuple[Any, str]] = []
    for node in graph:
        for name in node.params:
            key = f"{node.path}.{name}" if node.path else name
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                if not node.path:
                    raise ConfigError(
                        f"{owner}.target_parameters: {key!r} belongs to the top-level model itself; only a "
                        "parameter of a submodule can be targeted"
                    )
                chosen.append((node, name))
    if not chosen:
        raise ConfigError(
            f"{owner}.target_parameters {list(target_parameters)} match no parameter of the model (an entry names a "
            "parameter by its full name or a dotted suffix of it, e.g. 'experts.gate_up_proj')"
        )
    per_module: dict[str, int] = {}
    for node, _ in chosen:
        per_module[node.path] = per_module.get(node.path, 0) + 1
    by_key = settings([f"{node.path}.{name}" for node, name in chosen])
    ops, seen = [], dict.fromkeys(per_module, 0)
    for node, name in chosen:
        shape = tuple(node.params[name])
        if len(shape) == 3:
            experts, transposed = shape[0], bool(node.transposed)
            in_features, out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            experts, transposed, in_features, out_features = 1, False, shape[1], shape[0]
        else:
            raise ConfigError(
                f"{owner}.target_parameters: {node.path}.{name} is {len(shape)}-D; only 2-D and 3-D parameters "
                "can take LoRA"
            )
        r, alpha = by_key[f"{node.path}.{name}"]
        seen[node.path] += 1
        ops.append(
            AddParamLora(
                path=node.path, parameter_name=name, num_experts=int(experts), in_features=int(in_features),
                out_features=int(out_features), stacked=len(shape) == 3, transposed=transposed, depth=per_module[node.path] - seen[node.path],
                r=r, lora_alpha=float(alpha), scaling=float(scaling(r, alpha)), init=init,
            )
        )
    return ops
