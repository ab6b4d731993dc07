"""The contract between the training engine and a model, its loss and its batch.

**A model** is any ``flax.nnx.Module``. The engine needs nothing else from it: it splits the
module once into a graph definition and three pure trees (``split_model``):

- *trainable* parameters: the ``nnx.Param`` s the ``trainable`` filter selects (default
  every ``nnx.Param``). Only these get fp32 master weights, optimizer state and gradients.
- *frozen* parameters: the other ``nnx.Param`` s, kept in the compute dtype, never updated.
- *model state*: every other ``nnx.Variable`` (``nnx.BatchStat`` running statistics, RNG
  stream keys and counts): the forward pass may update them in training; evaluation reads
  them. They ride in the train state and are checkpointed.

Parameters may carry logical axes (jds's ``axes=`` metadata, or Flax's own
``nnx.with_partitioning`` / ``out_sharding``); those follow the tensor-parallel rules. An
unannotated parameter is still ZeRO-sharded (``jds.partitioning.zero``). Training runs the
module in ``model.train()`` mode and evaluation in ``model.eval()`` mode (Dropout off,
BatchNorm on its running averages), on a copy: the module passed in is never changed.

**A loss** is ``loss_fn(model, batch) -> loss`` or ``(loss, {"name": metric, ...})``: the
*mean* over the micro-batch it is given, a scalar. ``train_batch`` returns the average of
the micro-batches' losses and metrics, as DeepSpeed's engine averages micro-batch means.
For jds's language models the default is the causal-LM loss, which weights micro-batches
by their valid target tokens instead (the mean over every token of the global batch, as
Hugging Face computes it; with unpadded batches the two agree). Both are ``Loss`` objects:
a summed loss and a weight per micro-batch, divided once per step.

**A batch** is any pytree of arrays whose leaves share a leading global-batch axis
(``jds.partitioning.batch``). Inside the step the model sees one micro-batch of the
*global* batch at a time (every data-parallel device's rows together): a BatchNorm
normalises over all of them (synchronised batch statistics), so the losses equal the
single-device run's.

**A stacked decoder** (``StackedDecoder``: jds's Llama and GPT-2) adds what pipeline
stages, per-layer ZeRO-3 gathering, activation checkpointing and the inference engine need:
its layers' weights stacked on a leading ``layers`` axis in one submodule (``layers``), and
the forward cut into ``embed`` / ``run_layers`` / ``head`` (plus ``layer_fn`` for serving).
A model without it trains under ZeRO 0-3, data and tensor parallelism; asking it for
pipeline stages or ``remat`` is an error that says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.partitioning.rules import variable_axes
from jds.partitioning.zero import ParamGather, save_costly_not_gathered

PyTree = Any
Filter = Any  # an nnx filter: a Variable type, a predicate, a tuple of filters, ...
LossFn = Callable[[nnx.Module, PyTree], "jax.Array | tuple[jax.Array, Mapping[str, jax.Array]]"]

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------ protocols
@runtime_checkable
class DecoderConfig(Protocol):
    """What the engine reads from a language model's config."""

    vocab_size: int

    @property
    def max_positions(self) -> int: ...


@runtime_checkable
class StackedDecoder(Protocol):
    """A decoder whose layers are stacked and scanned (jds's ``Llama`` and ``GPT2``).

    Attributes:
      config: a ``DecoderConfig`` (``vocab_size``, ``max_positions``).
      layers: the submodule holding every layer's weights, each with a leading
        ``layers`` dimension.
      remat: the activation-checkpointing mode of the layer scan (``REMAT_MODES``).
      param_gather: where parameters are gathered to compute with (ZeRO-3), or None.
    """

    config: Any
    layers: nnx.Module
    remat: str
    param_gather: ParamGather | None

    def __call__(self, input_ids_BT: jax.Array) -> jax.Array: ...

    def embed(self, input_ids_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """Token (and position) embeddings ``x_BTD``."""

    def run_layers(self, params_L: dict[str, jax.Array], x_BTD: jax.Array,
                   positions_BT: jax.Array, segment_ids_BT: jax.Array | None, *,
                   checkpoint_every: int = 0, outputs: bool = False) -> Any:
        """The layers stacked in ``params_L`` (all of them or a stage's chunk); with
        ``outputs``, ``(x, every layer's output)``."""

    def layer_fn(self) -> Callable[..., jax.Array]:
        """``(p, x_BTD, positions_BT, attend) -> x_BTD``: one layer, for serving."""

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and LM head: ``logits_BTV``."""


def is_stacked_decoder(model: Any) -> bool:
    """Whether ``model`` implements ``StackedDecoder`` (with a ``DecoderConfig``)."""
    return isinstance(model, StackedDecoder) and isinstance(model.config, DecoderConfig)


def vocab_size_of(model: Any) -> int | None:
    """The model's vocabulary size when its config names one, else None."""
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return None if v is None else int(v)


# ------------------------------------------------------------------------------ losses
@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss the train step accumulates over micro-batches.

    The step's loss is ``sum_m fn(micro_m)[0] / sum_m weight(micro_m)``; its metrics are
    the aux values summed the same way and divided by the same total.

    Attributes:
      fn: ``(model, micro_batch) -> (summed loss, {name: summed metric})``, fp32 scalars.
      weight: ``micro_batch -> weight`` (fp32 scalar), independent of the parameters, so
        the step knows the divisor before the backward pass.
      per_example: ``fn`` and ``weight`` are sums over rows with no cross-row terms, so the
        data-parallel shards may take gradients apart and be reduced once per step.
      weight_metric: the metric name the summed weight is reported under (``"tokens"``),
        or None.
      check: host-side validation of a whole batch (raises ``ValueError``), or None.
    """

    fn: Callable[[nnx.Module, PyTree], tuple[jax.Array, dict[str, jax.Array]]]
    weight: Callable[[PyTree], jax.Array]
    per_example: bool = False
    weight_metric: str | None = None
    check: Callable[[PyTree], None] | None = None


def mean_loss(loss_fn: LossFn) -> Loss:
    """A user's ``loss_fn(model, batch) -> loss | (loss, aux)`` (a micro-batch mean) as a
    ``Loss``: each micro-batch weighs 1, so the step averages micro-batch means.

    Raises (when the step is traced):
      ValueError: the loss is not a scalar, or the aux is not a dict of scalars.
    """

    def fn(model: nnx.Module, batch: PyTree) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = loss_fn(model, batch)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        if isinstance(out, tuple) and len(out) != 2:
            raise ValueError(f"loss_fn returned a tuple of {len(out)}; return loss or "
                             "(loss, {name: metric})")
        if jnp.shape(loss) != ():
            raise ValueError(f"loss_fn returned shape {jnp.shape(loss)}; it must return a "
                             "scalar (the mean loss over the micro-batch), e.g. add .mean()")
        if not isinstance(aux, Mapping):
            raise ValueError(f"loss_fn's second output is {type(aux).__name__}; it must be a "
                             "dict of scalar metrics, e.g. {'accuracy': acc}")
        bad = {k: jnp.shape(v) for k, v in aux.items() if jnp.shape(v) != ()}
        if bad:
            raise ValueError(f"loss_fn's metrics must be scalars; got shapes {bad}")
        return (jnp.asarray(loss, jnp.float32),
                {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})

    return Loss(fn=fn, weight=lambda _: jnp.ones((), jnp.float32))


def causal_lm_loss_sum(
    logits_BTV: jax.Array, input_ids_BT: jax.Array, labels_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of valid targets.

    Args:
      logits_BTV: model outputs (any float dtype; the softmax runs in fp32).
      input_ids_BT: the inputs; used as labels when ``labels_BT`` is None.
      labels_BT: optional labels, ``-100`` = ignore; shifted here as Hugging Face does.

    Returns:
      ``(sum of cross-entropy over valid targets, count of valid targets)``, fp32 scalars.
    """
    labels_BT = input_ids_BT if labels_BT is None else labels_BT
    targets_BT = labels_BT[:, 1:]
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    valid_BT = targets_BT != IGNORE_INDEX
    safe_BT = jnp.where(valid_BT, targets_BT, 0)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    # The target's logit as a masked sum over the vocabulary rather than a gather: with the
    # vocabulary split over ``tensor`` this is a local reduce plus an all-reduce (Megatron's
    # vocab-parallel cross-entropy), and XLA's partitioner cannot split a gather on a sharded
    # dimension inside the pipeline's partly manual ``shard_map``. Exact: one term is kept.
    vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=safe_BT.dtype)
    picked_BT = jnp.sum(jnp.where(vocab_V == safe_BT[..., None], logits_BTV, 0.0), axis=-1)
    ce_BT = jnp.where(valid_BT, logz_BT - picked_BT, 0.0)
    return ce_BT.sum(), valid_BT.sum().astype(jnp.float32)


def valid_targets(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Targets the causal-LM loss counts in ``batch`` (``labels``, else ``input_ids``)."""
    labels_BT = batch.get("labels", batch["input_ids"])
    return (labels_BT[..., 1:] != IGNORE_INDEX).sum().astype(jnp.float32)


def check_lm_batch(batch: Any, vocab_size: int | None) -> None:
    """Validate a causal-LM batch on the host.

    Raises:
      ValueError: not a dict with ``input_ids``; ``input_ids`` / ``labels`` not int
        ``[batch, seq]`` of one shape; negative ids; ids at or above ``vocab_size``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"the causal-LM loss needs batch['input_ids']; got {keys} (pass "
                         "loss_fn= to jds.initialize to train on other batches)")
    shape = None
    for key in ("input_ids", "labels"):
        if key not in batch:
            continue
        x = np.asarray(batch[key])
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"batch['{key}'] must be an int array [batch, seq]; got "
                             f"{x.dtype} {x.shape}")
        if shape is not None and x.shape != shape:
            raise ValueError(f"batch['labels'] has shape {x.shape} but batch['input_ids'] "
                             f"has {shape}; they must match")
        shape = x.shape
        if key == "input_ids" and x.size:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0:
                raise ValueError(f"batch['input_ids'] holds negative token ids (min {lo}); "
                                 "token ids must be >= 0: check the tokenizer or the data")
            if vocab_size is not None and hi >= vocab_size:
                raise ValueError(
                    f"batch['input_ids'] holds ids in [{lo}, {hi}] but the model's "
                    f"vocab_size is {vocab_size}; check the tokenizer or the model")


def causal_lm_loss(vocab_size: int | None = None) -> Loss:
    """Hugging Face's causal-LM loss for any model mapping ``input_ids [B, T]`` to
    ``logits [B, T, V]``: the mean next-token cross-entropy over the global batch's valid
    targets (``labels`` with -100 ignored, else ``input_ids``), reported with ``tokens``."""

    def fn(model: nnx.Module, batch: Mapping[str, jax.Array]):
        ids_BT = batch["input_ids"]
        ce_sum, _ = causal_lm_loss_sum(model(ids_BT), ids_BT, batch.get("labels"))
        return ce_sum, {}

    return Loss(fn=fn, weight=valid_targets, per_example=True, weight_metric="tokens",
                check=lambda batch: check_lm_batch(batch, vocab_size))


def default_loss(model: Any) -> Loss:
    """The loss a model trains with when ``loss_fn`` is not given: the causal-LM loss for a
    ``StackedDecoder``.

    Raises:
      TypeError: any other model (it needs ``loss_fn``).
    """
    if is_stacked_decoder(model):
        return causal_lm_loss(vocab_size_of(model))
    raise TypeError(f"{type(model).__name__} is not one of jds's language models, so there is "
                    "no default loss; pass loss_fn=lambda model, batch: <scalar mean loss> "
                    "to jds.initialize")


def as_loss(loss_fn: LossFn | Loss | None, model: Any) -> Loss:
    """``loss_fn`` as a ``Loss`` (a callable is a micro-batch mean; None is the default)."""
    if loss_fn is None:
        return default_loss(model)
    if isinstance(loss_fn, Loss):
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model, batch) -> loss; got "
                        f"{type(loss_fn).__name__}")
    return mean_loss(loss_fn)


# ------------------------------------------------------------------------------ splitting
def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _key_impl(x: Any) -> str:
    if isinstance(x, jax.Array):
        return str(jax.random.key_impl(x))
    return str(jax.config.jax_default_prng_impl)


def _keys_to_data(tree: PyTree) -> PyTree:
    """Typed PRNG keys as raw ``uint32`` key data (abstract keys as their data's shape)."""
    def one(x):
        if not _is_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.eval_shape(jax.random.key_data, x)
        return jax.random.key_data(x)
    return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model split for the engine: graph definitions and pure trees.

    Attributes:
      graphdef: the graph definition in training mode (``model.train()``).
      eval_graphdef: the same in evaluation mode (``model.eval()``).
      params, frozen, model_state: pure trees (``nnx.to_pure_dict`` structure) of the
        trainable parameters, the frozen ones and the other variables (RNG keys as key
        data); concrete arrays for a module, ``jax.ShapeDtypeStruct`` for a factory.
      params_axes, frozen_axes, state_axes: each leaf's logical axes (tuples).
      key_impls: the model state's tree with a PRNG implementation name at each key leaf
        and None elsewhere.
      module_type: the model's class.
      config: the model's own config (``model.config``), or None.
      stacked: whether the model is a ``StackedDecoder``.
      decoders: the paths of the ``StackedDecoder`` modules in it (``()``: the model itself;
        e.g. a ``Distillation``'s student and teacher), which gather their own parameters
        layer by layer under ZeRO-3.
    """

    graphdef: nnx.GraphDef
    eval_graphdef: nnx.GraphDef
    params: PyTree
    frozen: PyTree
    model_state: PyTree
    params_axes: PyTree
    frozen_axes: PyTree
    state_axes: PyTree
    key_impls: PyTree
    module_type: type
    config: Any
    stacked: bool
    decoders: tuple[tuple[str, ...], ...] = ()

    def _state_in(self, model_state: PyTree) -> PyTree:
        return jax.tree.map(
            lambda x, impl: x if impl is None else jax.random.wrap_key_data(x, impl=impl),
            model_state, self.key_impls)

    def merge(self, params: PyTree, frozen: PyTree, model_state: PyTree, *,
              train: bool = True) -> nnx.Module:
        """The module with these values (in training or evaluation mode)."""
        graphdef = self.graphdef if train else self.eval_graphdef
        return nnx.merge(graphdef, params, frozen, self._state_in(model_state))

    def state_of(self, module: nnx.Module) -> PyTree:
        """The module's model state after a forward pass (RNG keys as key data)."""
        state = nnx.split(module, nnx.Param, ...)[2]
        return _keys_to_data(nnx.to_pure_dict(state))


def _partition(module: nnx.Module, trainable: Filter) -> tuple[Any, Any, Any, Any]:
    graphdef, params, frozen, rest = nnx.split(module, trainable, nnx.Param, ...)
    return graphdef, params, frozen, rest


def _axes(state: Any, what: str) -> PyTree:
    return nnx.to_pure_dict(jax.tree_util.tree_map_with_path(
        lambda p, v: variable_axes(v, f"{what} " + "/".join(str(getattr(k, "key", k))
                                                              for k in p)),
        state, is_leaf=_is_var))


def split_model(model: nnx.Module, *, trainable: Filter = nnx.Param, remat: str = "none",
                gather: ParamGather | None = None) -> SplitModel:
    """Split ``model`` (concrete, or abstract from ``nnx.eval_shape``) for the engine.

    ``remat`` (other than "none") and ``gather`` are set on a copy of every
    ``StackedDecoder`` in the model (the model itself, or ones inside it such as a
    ``Distillation``'s student and teacher: their layer scans' checkpointing and ZeRO-3
    gathering); ``model`` itself is unchanged.

    Raises:
      ValueError: the model has no ``nnx.Param``, or ``trainable`` selects none of them.
      TypeError: ``remat`` for a model that is not a ``StackedDecoder``.
    """
    stacked = is_stacked_decoder(model)
    decoders = tuple(tuple(str(k) for k in path) for path, m in nnx.iter_modules(model)
                     if is_stacked_decoder(m))
    decoders = tuple(d for d in decoders  # the outermost ones: they gather what they hold
                     if not any(len(o) < len(d) and d[:len(o)] == o for o in decoders))
    _, params, frozen, rest = _partition(model, trainable)
    if not jax.tree.leaves(params) and not jax.tree.leaves(frozen):
        raise ValueError(f"{type(model).__name__} has no nnx.Param: there is nothing to train "
                         "(parameters must be nnx.Param variables)")
    if not jax.tree.leaves(params):
        raise ValueError(f"trainable={trainable!r} selects none of {type(model).__name__}'s "
                         "parameters; pass an nnx filter that matches some nnx.Param "
                         "(default: nnx.Param, every parameter)")
    if remat != "none" and not decoders:
        raise TypeError(
            f"activation checkpointing (remat={remat!r}, from activation_checkpointing or "
            f"train.remat) is applied by jds to its stacked decoders' layer scan; "
            f"{type(model).__name__} is not one. Wrap the blocks to recompute in nnx.remat "
            "in your model and leave the config's remat at 'none'")

    # Graph definitions come from an abstract copy: the attributes set here and the
    # train/eval switch must not touch the caller's module.
    graphdef, state = nnx.split(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    copy = nnx.merge(graphdef, abstract)
    for path, m in nnx.iter_modules(copy):
        if tuple(str(k) for k in path) in decoders:
            if remat != "none":
                m.remat = remat
            m.param_gather = gather
    copy.train()
    train_def = _partition(copy, trainable)[0]
    copy.eval()
    eval_def = _partition(copy, trainable)[0]

    state_pure = nnx.to_pure_dict(rest)
    key_impls = jax.tree.map(lambda x: _key_impl(x) if _is_key(x) else None, state_pure)
    state_axes = jax.tree.map(  # a key's data has one more (trailing, unnamed) dimension
        lambda a, impl: tuple(a) + ((None,) if impl is not None else ()),
        _axes(rest, "variable"), key_impls, is_leaf=lambda a: isinstance(a, tuple))
    return SplitModel(
        graphdef=train_def,
        eval_graphdef=eval_def,
        params=nnx.to_pure_dict(params),
        frozen=nnx.to_pure_dict(frozen),
        model_state=_keys_to_data(state_pure),
        params_axes=_axes(params, "parameter"),
        frozen_axes=_axes(frozen, "frozen parameter"),
        state_axes=state_axes,
        key_impls=key_impls,
        module_type=type(model),
        config=getattr(model, "config", None),
        stacked=stacked,
        decoders=decoders,
    )


def resolve_model(model: Any) -> tuple[nnx.Module, Callable[[], nnx.Module] | None]:
    """``(module, factory)``: a module as it is, or a preset name / zero-argument factory
    built abstractly (``nnx.eval_shape``), the factory kept to materialise it sharded.

    Raises:
      TypeError: anything else.
    """
    if isinstance(model, nnx.Module):
        return model, None
    if isinstance(model, str):
        from jds.models.registry import build

        name = model
        factory = lambda: build(name)  # noqa: E731
    elif callable(model):
        factory = model
    else:
        raise TypeError(
            f"model must be an nnx.Module, a preset name or a factory; got {type(model)!r}")
    return nnx.eval_shape(factory), factory


def materialise(factory: Callable[[], nnx.Module], trainable: Filter
                ) -> tuple[PyTree, PyTree, PyTree]:
    """``(params, frozen, model state)`` pure trees of a fresh ``factory()`` (traceable: run
    it under ``jax.jit`` with output shardings to build the model directly sharded)."""
    _, params, frozen, rest = _partition(factory(), trainable)
    return (nnx.to_pure_dict(params), nnx.to_pure_dict(frozen),
            _keys_to_data(nnx.to_pure_dict(rest)))


# ------------------------------------------------------------------------------ the objective
def _binder(split: SplitModel, gather: ParamGather | None, train: bool
            ) -> tuple[Callable[[PyTree, PyTree, PyTree], nnx.Module], bool]:
    """``(bind(params, frozen, model_state) -> module, gathers_all)``.

    A ``StackedDecoder`` gathers its parameters layer by layer; the parameters outside any
    (all of a plain module's) cannot, so under ZeRO-3 (``gather.sharded``) ``bind`` gathers
    them whole: DeepSpeed's ZeRO-3 at the granularity of the module. ``gathers_all``: some
    are gathered so.
    """
    def inside(keypath: Any) -> bool:  # a leaf that a decoder gathers itself
        path = tuple(str(getattr(k, "key", k)) for k in keypath)
        return any(path[:len(d)] == d for d in split.decoders)

    def outside(tree: PyTree) -> bool:
        return any(not inside(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0])

    gather_all = (gather is not None and gather.sharded and not split.stacked
                  and (outside(split.params) or outside(split.frozen)))

    def gathered(tree: PyTree, axes: PyTree) -> PyTree:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return treedef.unflatten([x if inside(kp) else gather(x, tuple(a)) for (kp, x), a
                                  in zip(flat, treedef.flatten_up_to(axes), strict=True)])

    def bind(params, frozen, model_state):
        if gather_all:
            params = gathered(params, split.params_axes)
            frozen = gathered(frozen, split.frozen_axes)
        return split.merge(params, frozen, model_state, train=train)

    return bind, gather_all


def make_objective(split: SplitModel, loss: Loss, gather: ParamGather | None, *,
                   train: bool = True) -> Callable[..., tuple[jax.Array, dict, PyTree]]:
    """``(params, frozen, model_state, micro_batch) -> (summed loss, aux, new model state)``.

    Parameters a plain module gathers whole under ZeRO-3 are not kept for the backward
    pass (it gathers them again), so they are live one pass at a time.
    """
    bind, gather_all = _binder(split, gather, train)

    def forward(params, frozen, model_state, batch):
        model = bind(params, frozen, model_state)
        loss_sum, aux = loss.fn(model, batch)
        return loss_sum, aux, (split.state_of(model) if train else model_state)

    if gather_all:
        return jax.checkpoint(
            forward, policy=save_costly_not_gathered,
            prevent_cse=False)
    return forward


def make_forward(split: SplitModel, gather: ParamGather | None
                 ) -> Callable[[PyTree, PyTree, PyTree, PyTree], PyTree]:
    """``(params, frozen, model_state, inputs) -> model(inputs)`` in evaluation mode."""
    bind, _ = _binder(split, gather, train=False)
    return lambda params, frozen, model_state, x: bind(params, frozen, model_state)(x)


# ------------------------------------------------------------------------------ description
def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if hasattr(x, "model_dump"):  # pydantic
        return _jsonable(x.model_dump())
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    return repr(x)


def describe_model(module_type: type, config: Any) -> dict[str, Any]:
    """A JSON description of a model for checkpoints: its class and its config.

    jds's own models are written as their config (``{"type": "llama", ...}``, which
    ``jds.models.registry.config_from_dict`` reads back); any other model as
    ``{"type": "custom", "class": "module.Name", "config": ...}`` with the config as a
    dataclass, pydantic model or mapping gives it (None without one).
    """
    from jds.models.registry import config_to_dict, is_known_config

    if config is not None and is_known_config(config):
        return config_to_dict(config)
    return {"type": "custom", "class": f"{module_type.__module__}.{module_type.__qualname__}",
            "config": _jsonable(config)}


__all__ = [
    "IGNORE_INDEX",
    "DecoderConfig",
    "Loss",
    "LossFn",
    "SplitModel",
    "StackedDecoder",
    "as_loss",
    "causal_lm_loss",
    "causal_lm_loss_sum",
    "check_lm_batch",
    "default_loss",
    "describe_model",
    "is_stacked_decoder",
    "make_forward",
    "make_objective",
    "materialise",
    "mean_loss",
    "resolve_model",
    "split_model",
    "valid_targets",
    "vocab_size_of",
]
