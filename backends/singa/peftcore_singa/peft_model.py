"""The SINGA PeftModel: a ``singa.model.Model`` the user compiles, trains and saves.

``get_peft_model`` returns a :class:`SingaPeftModel` for a SINGA model. It is a
``singa.model.Model`` and a :class:`peftcore.PeftModel`, used as the wrapper of SINGA's
own PEFT example is::

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=1, target_modules=["linear1", "linear2"]))
    peft_model.set_optimizer(sgd)
    peft_model.compile([tx], is_train=True, use_graph=True)
    peft_model.train()
    out, loss = peft_model(tx, ty, "plain", None)     # your model's own train_one_batch
    peft_model.save_states("checkpoint.zip")

How it sits on SINGA's ``Model``/``Layer`` machinery:

* **Your model is held, not registered.** It is ``peft_model.model`` (also ``base_model``
  and ``get_base_model()``), kept out of ``_layers``: registering it would rename every
  layer ``model.*`` and give tensors created later prefixed names. Tensor names stay your
  model's (``linear1.W``), plus the adapters' (``linear1.lora_A.default``).
  ``get_params``/``set_params``/``get_states``/``set_states`` are your model's, so
  ``save_states``/``load_states`` write and read exactly those keys, and a checkpoint of
  the plain model still loads. Attributes the wrapper lacks are read from your model
  (``peft_model.dimension``, ``peft_model.linear1``).
* **Adapters wait for the shapes.** A SINGA layer creates its parameters at its first
  call. Wrapping a model that has not run yet (and given no ``example_inputs``) keeps the
  adapters pending; they are planned and built when SINGA initialises the model: at
  :meth:`SingaPeftModel.compile`, or at the first forward however it is reached
  (``peft_model(...)``, ``train_one_batch``, or your model's own ``compile``/forward,
  through an ``initialize`` hook set on your model's instance while adapters are pending).
  They are built before that forward's ops run, so the first training step (and the
  graph SINGA records from it) already has the base frozen and the adapters in place.
* **One recorder.** ``train_one_batch`` calls your model's ``train_one_batch``, which
  SINGA's ``ModelMeta`` wraps in its graph recorder; the wrapper's own is deliberately not
  wrapped, so graph mode records one step and applies one update (the seed's wrapper
  recorded twice and stepped twice). The optimizer set with ``set_optimizer`` (or
  assigned to ``peft_model.optimizer``) is given to your model, whose step uses it.
* **compile** initialises the layers with one eval-mode forward, run directly on
  zero-filled copies of the placeholders (SINGA's ``Model.compile`` records that forward
  instead, which a model with a ``layer.Embedding`` cannot take), builds pending
  adapters, then sets what ``Model.compile`` sets, on the wrapper and on your model
  (``autograd.training``, ``training``, ``graph_mode``, ``sequential``) and drops a
  recorded graph. ``train``/``eval`` are passed on to your model as well, and so is
  ``Model.graph(mode, sequential)`` (``peft_model.graph(True, False)``, as SINGA's
  ``char_rnn`` calls it); peftcore's description of the model is ``peft_model.model_graph``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, tensor  # noqa: E402
from singa import model as singa_model  # noqa: E402

from peftcore.errors import AdapterError  # noqa: E402
from peftcore.graph import ModelGraph  # noqa: E402
from peftcore.methods.prompt_tuning import AddPrompt  # noqa: E402
from peftcore.model_lock import changes_model, reads_model  # noqa: E402
from peftcore.peft_model import PeftModel  # noqa: E402
from peftcore_singa.describe import eval_mode  # noqa: E402
from peftcore_singa.prompt_fit import check_prompt_fits  # noqa: E402
from peftcore_singa.tensors import NP_DTYPES  # noqa: E402

_Model = singa_model.Model


def _input_tensors(inputs: Sequence[Any]) -> list[Any]:
    """The SINGA tensors among forward inputs (a list/tuple argument is looked into)."""
    found: list[Any] = []
    for value in inputs:
        items = value if isinstance(value, (list, tuple)) else [value]
        found.extend(item for item in items if isinstance(item, tensor.Tensor))
    return found


def _zeros_like(t: Any) -> Any:
    out = tensor.Tensor(tuple(t.shape), t.device, t.dtype, requires_grad=False, stores_grad=False)
    out.copy_from_numpy(np.zeros(tuple(t.shape), dtype=NP_DTYPES.get(t.dtype, np.float32)))
    return out


def _zero_inputs(inputs: Sequence[Any]) -> tuple:
    """``inputs`` with every tensor replaced by zeros of its shape, dtype and device: a
    placeholder may hold garbage (token ids out of range), and data must not matter."""

    def zero(value: Any) -> Any:
        if isinstance(value, tensor.Tensor):
            return _zeros_like(value)
        if isinstance(value, (list, tuple)):
            return type(value)(zero(item) for item in value)
        return value

    return tuple(zero(value) for value in inputs)


@contextlib.contextmanager
def _graph_recording_off(dev: Any) -> Iterator[None]:
    """Run eagerly, also inside a step SINGA is recording (as SINGA's layer init does)."""
    previous = dev.graph_enabled()
    dev.EnableGraph(False)
    try:
        yield
    finally:
        dev.EnableGraph(previous)


class SingaPeftModel(PeftModel, singa_model.Model):
    """A SINGA model with adapters (see the module docstring)."""

    def __init__(self, model: Any, backend_name: str, graph: Optional[ModelGraph]) -> None:
        _Model.__init__(self)
        self.__dict__["model"] = model  # held, not a registered sublayer (module docstring)
        self._initialized = True  # the wrapper has no parameters of its own
        self.training = bool(model.__dict__.get("training", True))
        self.graph_mode = bool(model.__dict__.get("graph_mode", False))
        self.sequential = bool(model.__dict__.get("sequential", False))
        self.init_peft_state(backend_name, graph)

    def _keep_mask(self, shape: tuple[int, ...], density: float) -> np.ndarray:
        """DARE's keep-mask on SINGA's RNG (``Tensor.bernoulli``)."""
        mask = tensor.Tensor(tuple(int(d) for d in shape))
        mask.bernoulli(float(density))
        return np.asarray(tensor.to_numpy(mask), dtype=np.float64)

    # -- the model ----------------------------------------------------------------------------
    def get_base_model(self) -> Any:
        """Your model, with its adapter layers in place."""
        return self.model

    @property
    def base_model(self) -> Any:
        """Your model (the seed's ``peft_model.base_model``)."""
        return self.model

    def run_base_model(self, *args: Any, **kwargs: Any) -> Any:
        # calling a SINGA Model in training mode would run train_one_batch
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "model":  # dunders, and ``model`` before it is set (unpickling)
            raise AttributeError(name)
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(model, name)

    def __repr__(self) -> str:
        pending = f", pending={self.pending_adapters}" if self.pending_adapters else ""
        return (
            f"{type(self).__name__}(backend={self.backend_name!r}, adapters={list(self.peft_config)}{pending}, "
            f"model={type(self.model).__name__})"
        )

    # -- building adapters once the layers know their shapes --------------------------------------
    def _adapter_pending(self) -> None:
        # SINGA's forward wrapper calls ``initialize`` before a layer's first forward;
        # an instance attribute is found before the class's method
        self.model.__dict__["initialize"] = self._initialise_model

    def _initialise_model(self, *args: Any, **kwargs: Any) -> None:
        """The hook on your model's ``initialize`` while adapters are pending."""
        model = self.model
        model.__dict__.pop("initialize", None)
        type(model).initialize(model, *args, **kwargs)  # what SINGA would have called
        self._build_pending(args)

    def _build_pending(self, inputs: Sequence[Any]) -> None:
        """Initialise the layers with one eval-mode forward on zeros shaped like ``inputs``
        (the model's forward arguments), then plan and build the pending adapters."""
        model = self.model
        model.__dict__.pop("initialize", None)
        if self.model_graph is not None and model._initialized and not self.pending_adapters:
            return
        tensors = _input_tensors(inputs)
        if not tensors:
            if self.pending_adapters:
                raise AdapterError(
                    f"adapters {self.pending_adapters} wait for the model's layers to know their shapes: "
                    "compile([placeholder tensors]) or call the model on SINGA tensors first"
                )
            return
        with _graph_recording_off(tensors[0].device):
            zeros = _zero_inputs(inputs)
            if self.model_graph is None or not model._initialized:
                with eval_mode(model):
                    model.forward(*zeros)
            example = zeros if len(tensors) == len(zeros) else None
            if self.pending_adapters:
                self.build_pending_adapters(example_inputs=example)
            elif self.model_graph is None:  # nothing to build; describe now if the shapes are known
                with contextlib.suppress(AdapterError):
                    self.build_pending_adapters(example_inputs=example)

    # -- SINGA's Model API ------------------------------------------------------------------------
    @changes_model
    def compile(self, inputs: Sequence[Any], is_train: bool = True, use_graph: bool = False, sequential: bool = False) -> None:
        """Initialise the layers on placeholder tensors, build pending adapters, and set
        training and graph mode (see the module docstring)."""
        if not inputs or not isinstance(inputs[0], tensor.Tensor):
            raise TypeError("compile expects a list of placeholder tensors, as singa.model.Model.compile does")
        dev = inputs[0].device
        self._build_pending(tuple(inputs))
        dev.ResetGraph()
        autograd.training = is_train
        model = self.model
        targets = [self, model] if isinstance(model, _Model) else [self]
        for target in targets:
            target.training = is_train
            target.graph_mode = use_graph
            target.sequential = sequential
        if isinstance(model, _Model):
            model._buffered = False
            model._results = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run your model's forward with the active adapters (eval: ``peft_model(x)``)."""
        if self.pending_adapters and self.model._initialized:  # otherwise the hook builds them
            self._build_pending(args)
        self._check_prompts_fit(args)
        return self.peft_forward(*args, **kwargs)

    def _check_prompts_fit(self, inputs: Sequence[Any]) -> None:
        """With a prompt adapter active, check once per adapter set and input shape that
        the model can take the added positions (:mod:`peftcore_singa.prompt_fit`), so a
        mismatch is a peftcore error and not a SINGA abort."""
        prompts = {
            op.path: int(op.num_virtual_tokens)
            for name in self.active_adapters
            for op in (self.plans[name].ops if name in self.plans else ())
            if isinstance(op, AddPrompt)
        }
        tensors = _input_tensors(inputs)
        if not prompts or not tensors or not self.model._initialized:
            return
        key = (tuple(sorted(prompts.items())), tuple(tuple(t.shape) for t in tensors))
        checked = self.__dict__.setdefault("_prompts_fit", set())
        if key in checked:
            return
        with _graph_recording_off(tensors[0].device), eval_mode(self.model):
            check_prompt_fits(self.model.forward, _zero_inputs(inputs), prompts)
        checked.add(key)

    def set_optimizer(self, optimizer: Any) -> None:
        """Give ``optimizer`` to your model (its ``set_optimizer``, else its ``optimizer``)."""
        setter = getattr(self.model, "set_optimizer", None)
        if callable(setter):
            setter(optimizer)
        else:
            self.model.optimizer = optimizer

    @property
    def optimizer(self) -> Any:
        return self.model.optimizer

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        self.set_optimizer(value)

    def graph(self, mode: bool = True, sequential: bool = False) -> None:
        """SINGA's ``Model.graph``: turn graph mode on or off (and pick sequential
        execution), on the wrapper and on your model, whose ``train_one_batch`` records;
        a graph recorded before is dropped so the next step follows the new mode."""
        targets = [self, self.model] if isinstance(self.model, _Model) else [self]
        for target in targets:
            _Model.graph(target, mode, sequential)
        self.runtime.model_changed(self.model)

    def train(self, mode: bool = True) -> None:
        _Model.train(self, mode)
        if isinstance(self.model, _Model):
            self.model.train(mode)

    def get_params(self) -> dict[str, Any]:
        return dict(self.model.get_params())

    @changes_model
    def set_params(self, parameters: Mapping[str, Any]) -> None:
        self.model.set_params(parameters)

    def get_states(self) -> dict[str, Any]:
        return dict(self.model.get_states())

    @changes_model
    def set_states(self, states: Mapping[str, Any]) -> None:
        self.model.set_states(states)

    def save_states(self, fpath: str, aux_states: Optional[Mapping[str, Any]] = None) -> None:
        """SINGA's ``save_states``: your model's tensors and the adapters', by tensor name."""
        self._require_built("save_states")
        if self.merged_adapters:
            raise AdapterError(
                f"adapters {self.merged_adapters} are merged into the base weights; unmerge_adapter() before "
                "save_states (or merge_and_unload() and save the plain model)"
            )
        _Model.save_states(self, fpath, dict(aux_states or {}))

    @changes_model
    def load_states(self, fpath: str) -> dict[str, Any]:
        """SINGA's ``load_states``; the model must have been compiled or run first (SINGA
        restores nothing, silently, into layers that have not run)."""
        self._require_built("load_states")
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged; unmerge_adapter() before load_states")
        result: dict[str, Any] = _Model.load_states(self, fpath)
        return result

    def save_pretrained(  # type: ignore[override]  # selected_adapters stays second, as the seed had it
        self, save_directory: Any, selected_adapters: Optional[Sequence[str]] = None, **kwargs: Any
    ) -> None:
        if selected_adapters is None and self.pending_adapters:
            self._require(self.pending_adapters[0])  # raises: not built yet (would save nothing)
        PeftModel.save_pretrained(self, save_directory, selected_adapters=selected_adapters, **kwargs)

    def merge_weights(self, mode: bool = True) -> None:
        """The seed's name: ``merge_adapter()`` when ``mode``, else ``unmerge_adapter()``."""
        if mode:
            self.merge_adapter()
        else:
            self.unmerge_adapter()

    def _require_built(self, action: str) -> None:
        if self.pending_adapters or not self.model._initialized:
            raise AdapterError(
                f"cannot {action} yet: the model's layers have not run, so "
                + (f"adapters {self.pending_adapters} are not built; " if self.pending_adapters else "")
                + "compile([placeholder tensors]) or run one batch first"
            )


@reads_model
def _train_one_batch(self: SingaPeftModel, *args: Any, **kwargs: Any) -> Any:
    """One training step: your model's ``train_one_batch`` (it computes the loss and calls
    its optimizer, which updates only the trainable adapter tensors)."""
    model = self.model
    step = getattr(type(model), "train_one_batch", None)
    if step is None or step is _Model.train_one_batch:
        raise NotImplementedError(
            f"{type(model).__name__} defines no train_one_batch; as with any singa.model.Model, define "
            "train_one_batch(x, y, ...) computing the loss and calling self.optimizer(loss)"
        )
    if self.pending_adapters and model._initialized:  # otherwise the hook builds them
        self._build_pending(args[:1])
    self._check_prompts_fit(args[:1])
    return model.train_one_batch(*args, **kwargs)


# Set after the class statement on purpose: SINGA's ModelMeta wraps a ``train_one_batch``
# defined in a class body in its graph recorder, and your model's step records itself.
SingaPeftModel.train_one_batch = _train_one_batch


def singa_peft_model_class() -> type:
    """The SINGA backend's native PeftModel shell (what its runtime's ``peft_model_class`` returns)."""
    return SingaPeftModel
