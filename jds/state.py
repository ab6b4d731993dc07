"""The train state: every persistent array of a training run, as one pytree, and how it is
built from a config (optimizer, schedule, loss scaler) and placed (its shardings).

``TrainState`` holds pure arrays only (the model's graph definition stays outside, in the
engine), so it can be jitted, sharded, donated and checkpointed as it is.

- ``params``: the compute copy of the *trainable* weights, in the policy's compute dtype
  (bf16/fp16), or the fp32 weights themselves when training in fp32.
- ``master``: fp32 master weights under mixed precision; ``None`` in fp32 (no duplicate).
- ``opt_state``: the optax state, over the fp32 trainable weights.
- ``frozen``: parameters the ``trainable`` filter leaves out, in the compute dtype. They
  get no master copy, no optimizer state and no gradient (``{}`` when everything trains).
- ``model_state``: the model's other variables (``nnx.BatchStat`` running statistics, RNG
  stream keys and counts, any other ``nnx.Variable``), updated by the forward pass in
  training and read in evaluation (``{}`` for a model without them). RNG keys are kept as
  raw ``uint32`` key data, so the state stays plain arrays for Orbax.
- ``loss_scale``: DeepSpeed's dynamic loss scaler state (scale 1, inert, outside fp16).
- ``step``: optimizer steps taken, skipped ones included (DeepSpeed's ``global_steps``).
- ``skipped``: steps skipped for fp16 overflow; ``step - skipped`` is the schedule's count.
- ``rng``: raw ``uint32`` key data from the config's ``seed``.

Built here (and not in the engine) so that converters can build the same structure without
a mesh or devices (``train_state_template``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding

from jds.config import Config, OptimizerConfig
from jds.optim import build_optimizer, build_schedule
from jds.partitioning.offload import DEVICE_KIND, with_kind
from jds.precision import LossScaleConfig, LossScaleState, cast_tree, init_loss_scale, policy_for

PyTree = Any


@struct.dataclass
class TrainState:
    """Pure-array training state (see module docstring for each field)."""

    step: jax.Array
    params: PyTree
    master: PyTree | None
    opt_state: PyTree
    loss_scale: LossScaleState
    skipped: jax.Array
    rng: jax.Array
    frozen: PyTree = struct.field(default_factory=dict)
    model_state: PyTree = struct.field(default_factory=dict)

    @property
    def fp32_params(self) -> PyTree:
        """The fp32 trainable weights: ``master`` under mixed precision, else ``params``."""
        return self.params if self.master is None else self.master

    @property
    def applied_steps(self) -> jax.Array:
        """Optimizer updates actually applied (the LR schedule's count)."""
        return self.step - self.skipped


def optimizer_parts(cfg: Config) -> tuple[optax.Schedule, optax.GradientTransformation,
                                           LossScaleConfig | None]:
    """The config's LR schedule, optax transformation and fp16 loss-scale config."""
    # No optimizer section: AdamW at DeepSpeed's FusedAdam defaults (where DeepSpeed would
    # want a client optimizer passed to deepspeed.initialize).
    opt = cfg.optimizer or OptimizerConfig.model_validate({"type": "adamw"})
    opt_type, opt_params = opt.type, opt.params.model_dump()
    sched = cfg.scheduler
    schedule = build_schedule(
        None if sched is None else sched.type,
        {} if sched is None else sched.params.model_dump(),
        base_lr=float(opt_params["lr"]),
    )
    tx = build_optimizer(opt_type, opt_params, schedule)
    loss_scale = LossScaleConfig.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None
    return schedule, tx, loss_scale


def init_train_state(
    cfg: Config, tx: optax.GradientTransformation, fp32_params: PyTree,
    frozen: PyTree | None = None, model_state: PyTree | None = None,
) -> TrainState:
    """A fresh train state around fp32 weights (step 0, new optimizer state).

    Args:
      cfg: the run's config (precision, fp16 scaler, seed).
      tx: the optax transformation.
      fp32_params: the trainable weights in fp32.
      frozen: the frozen parameters (any float dtype; stored in the compute dtype).
      model_state: the model's non-parameter variables, stored as they are.
    """
    compute = policy_for(cfg.precision).compute_dtype
    mixed = compute != jnp.float32
    loss_scale = LossScaleConfig.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=cast_tree(fp32_params, compute) if mixed else fp32_params,
        master=fp32_params if mixed else None,
        opt_state=tx.init(fp32_params),
        loss_scale=init_loss_scale(loss_scale),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(cfg.seed)),
        frozen=cast_tree(frozen or {}, compute),
        model_state=model_state or {},
    )


def state_shardings(
    abstract: TrainState, tx: optax.GradientTransformation, *, params: PyTree,
    master: PyTree, frozen: PyTree, model_state: PyTree, replicated: NamedSharding,
) -> TrainState:
    """The ``TrainState`` of shardings for ``abstract`` (from ``jax.eval_shape``).

    Args:
      abstract: the state's shapes.
      tx: the optax transformation (its per-parameter states take ``master``'s layout).
      params, master, frozen, model_state: sharding trees of those fields.
      replicated: the sharding of scalars and everything else.
    """
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract.opt_state, master,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=params,
        master=None if abstract.master is None else master,
        opt_state=opt_sh,
        loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale),
        skipped=replicated,
        rng=replicated,
        frozen=frozen,
        model_state=model_state,
    )


def build_state(
    cfg: Config, tx: optax.GradientTransformation, split: Any, *, params: PyTree,
    master: PyTree, frozen: PyTree, model_state: PyTree, replicated: NamedSharding,
    factory: Callable[[], Any] | None = None, trainable: Any = None,
    shapes_only: bool = False, tracing: Callable[[], Any] = contextlib.nullcontext,
    apart: Callable[[TrainState], TrainState] | None = None,
) -> tuple[TrainState, TrainState] | tuple[TrainState, TrainState, PyTree]:
    """The initial train state, placed directly sharded, and its shardings.

    Args:
      cfg, tx: the config and optax transformation.
      split: the model's ``jds.models.base.SplitModel`` (values, or shapes for a factory).
      params, master, frozen, model_state: sharding trees (compute copy, fp32 master and
        optimizer state, frozen parameters, model state).
      replicated: the sharding of scalars.
      factory: builds the model inside ``jax.jit(out_shardings=...)`` (no parameter ever
        whole on one device); None: ``split`` holds the values, placed with ``device_put``.
      trainable: the engine's trainable filter (for ``factory``).
      shapes_only: return ``jax.ShapeDtypeStruct`` leaves with their shardings instead.
      tracing: a context the factory runs in (the engine's rules).
      apart: states made elsewhere (the NVMe tier's, ``jds.partitioning.nvme``): maps a
        state (or its shardings) to the state without them (None in their place); they
        are never computed here, and the fresh fp32 weights are returned for them.

    Returns:
      ``(state, state shardings)``; with ``apart``, ``(state without those states, full
      state shardings, fp32 weights in device memory)``.
    """
    from jds.models.base import materialise

    init = lambda p, f, m: init_train_state(cfg, tx, p, f, m)  # noqa: E731
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731
    abstract = jax.eval_shape(init, jax.tree.map(f32, split.params), split.frozen,
                              split.model_state)
    shardings = state_shardings(abstract, tx, params=params, master=master, frozen=frozen,
                                model_state=model_state, replicated=replicated)
    if shapes_only:
        return jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
                            abstract, shardings), shardings
    # the fresh weights are made in device memory; init's output shardings place the
    # master copy and optimizer state where they live (host memory under ZeRO-Offload)
    placed = (with_kind(master, DEVICE_KIND), frozen, model_state)
    if factory is None:
        values = jax.device_put((jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                              split.params), split.frozen, split.model_state),
                                placed)
    else:
        def fresh():
            p, f, m = materialise(factory, trainable)
            return jax.tree.map(lambda x: x.astype(jnp.float32), p), f, m

        with tracing():
            values = jax.jit(fresh, out_shardings=placed)()
    if apart is not None:
        state = jax.jit(lambda *v: apart(init(*v)), out_shardings=apart(shardings))(*values)
        return state, shardings, values[0]
    return jax.jit(init, out_shardings=shardings)(*values), shardings


def train_state_template(
    config: str | os.PathLike | Mapping | Config, fp32_params: PyTree
) -> tuple[TrainState, optax.GradientTransformation, Config]:
    """The train state's structure for ``config`` (shapes only; no mesh, no devices).

    Args:
      config: the run's config.
      fp32_params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``(abstract TrainState, optax transformation, validated Config)``; converters fill a
      checkpoint to this structure.
    """
    cfg = Config.load(config)
    _, tx, _ = optimizer_parts(cfg)
    return jax.eval_shape(lambda p: init_train_state(cfg, tx, p), fp32_params), tx, cfg


__all__ = [
    "TrainState",
    "build_state",
    "init_train_state",
    "optimizer_parts",
    "state_shardings",
    "train_state_template",
]
