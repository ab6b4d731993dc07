"""The training step as pure functions: loss, micro-batch scan, clipping, optax update.

``make_train_step`` closes over the static choices (how to apply the model, the optax
transformation, accumulation steps, clipping, loss scaling) and returns
``train_step(state, batch) -> (state, metrics)``: a pure function, jittable without an
engine. Features are chosen here, when the step is built, not as branches inside it.

Semantics follow DeepSpeed's engine:

- The loss is the Hugging Face causal-LM loss: mean cross-entropy of predicting token t+1
  from tokens <= t, over every valid target of the *global* batch (labels of -100 are
  ignored). With unpadded batches this equals DeepSpeed's average of per-micro-batch means.
- Gradient accumulation is a ``lax.scan`` over micro-batches, accumulating fp32 gradients.
  Under data parallelism each device accumulates its own shard's gradients and they are
  all-reduced once per step, after the scan, as DeepSpeed's engine does at the accumulation
  boundary. Left to itself XLA's partitioner would all-reduce inside the scan, once per
  micro-batch; ``_local_grads`` prevents that by giving the accumulator a leading
  data-parallel axis (a ``vmap`` over per-device batch slices with ``spmd_axis_name``), so
  nothing is reduced until the final sum.
- Gradients are unscaled, their global norm measured, and clipped as DeepSpeed's
  ``clip_grad_norm_`` does: ``g *= max_norm / (norm + 1e-6)`` when that factor is < 1.
- A step whose gradients are not finite is skipped (params, master weights and optimizer
  state unchanged; ``skipped`` counted; the LR schedule does not advance, as DeepSpeed only
  steps its scheduler on applied steps). Under fp16 this is the loss-scaler overflow path;
  in fp32/bf16 DeepSpeed would apply the NaN and ruin the weights, jds skips it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jds.partitioning.rules import active_rules, constrain, use_rules
from jds.precision import LossScaleConfig, all_finite, cast_tree, update_loss_scale
from jds.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, input_ids_BT) -> logits_BTV

IGNORE_INDEX = -100


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
    picked_BT = jnp.take_along_axis(logits_BTV, safe_BT[..., None], axis=-1)[..., 0]
    ce_BT = jnp.where(valid_BT, logz_BT - picked_BT, 0.0)
    return ce_BT.sum(), valid_BT.sum().astype(jnp.float32)


@dataclass(frozen=True)
class StepConfig:
    """Static choices of a train step.

    Attributes:
      gradient_accumulation_steps: micro-batches per optimizer step (leading batch axis).
      gradient_clipping: max global gradient norm; 0 disables clipping.
      compute_dtype: dtype of ``state.params`` (the compute copy).
      loss_scale: fp16 loss scaling config, or None (fp32/bf16).
    """

    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    compute_dtype: Any = jnp.float32
    loss_scale: LossScaleConfig | None = None


def clip_by_global_norm_ds(grads: PyTree, max_norm: float) -> tuple[PyTree, jax.Array]:
    """DeepSpeed's clipping: scale by ``max_norm / (norm + 1e-6)`` when that is < 1.

    Returns:
      ``(clipped grads, pre-clip global norm)``.
    """
    norm = optax.global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), norm


def _data_axes() -> tuple[tuple[str, ...], int]:
    """Mesh axes the batch is split over (size > 1) and their product, from the active rules."""
    active = active_rules()
    if active is None:
        return (), 1
    mesh, rules = active
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    return axes, int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _local_grads(
    grad_fn: Callable, params: PyTree, ids_ABT: jax.Array, labels_ABT: jax.Array,
    axes: tuple[str, ...], n: int,
) -> tuple[PyTree, jax.Array]:
    """Sum of gradients and of cross-entropy over micro-batches, reduced once at the end.

    Each of the ``n`` data-parallel shards gets its own parameter copy (a broadcast, sharded
    on ``axes``: no communication) and batch slice; ``vmap(..., spmd_axis_name=axes)`` keeps
    the per-shard gradients apart, so the scan's accumulator stays device-local and the
    final ``sum`` over the shard axis is the step's only gradient all-reduce.
    """
    mesh, rules = active_rules()
    local_rules = {**rules, "batch": ()}  # the shard axis carries the batch's mesh axes
    A, B, T = ids_ABT.shape
    lead = NamedSharding(mesh, PartitionSpec(None, axes))

    def split(x_ABT):
        return jax.lax.with_sharding_constraint(x_ABT.reshape(A, n, B // n, T), lead)

    def per_shard(p):
        spec = PartitionSpec(axes, *([PartitionSpec.UNCONSTRAINED] * p.ndim))
        return jax.lax.with_sharding_constraint(
            jnp.broadcast_to(p, (n, *p.shape)), NamedSharding(mesh, spec))

    params_N = jax.tree.map(per_shard, params)
    vgrad = jax.vmap(grad_fn, spmd_axis_name=axes)

    def micro(carry, mb):
        grads_acc, ce_acc = carry
        with use_rules(mesh, local_rules):
            (_, ce_N), g = vgrad(params_N, mb[0], mb[1])
        grads_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads_acc, g)
        return (grads_acc, ce_acc + ce_N), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params_N)
    (grads_N, ce_N), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((n,), jnp.float32)), (split(ids_ABT), split(labels_ABT))
    )
    return jax.tree.map(lambda g: g.sum(0), grads_N), ce_N.sum()


def _select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    Args:
      apply_fn: ``(params, input_ids_BT) -> logits_BTV``.
      tx: the optax transformation (its state lives in ``state.opt_state``).
      schedule: the learning-rate schedule inside ``tx``, for the ``lr`` metric.
      cfg: static step choices.

    The batch holds ``input_ids`` (and optionally ``labels``) shaped
    ``[gradient_accumulation_steps, micro_batch_global, seq]``.

    Returns:
      The step function. Metrics (device scalars): ``loss``, ``grad_norm``, ``lr``,
      ``loss_scale``, ``skipped`` (1.0 if this step was skipped), ``tokens``.
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        ids_ABT = batch["input_ids"]
        labels_ABT = batch.get("labels", ids_ABT)
        n_valid = (labels_ABT[:, :, 1:] != IGNORE_INDEX).sum().astype(jnp.float32)
        denom = jnp.maximum(n_valid, 1.0)
        scale = state.loss_scale.scale

        def loss_fn(params, ids_BT, labels_BT):
            logits_BTV = apply_fn(params, ids_BT)
            ce_sum, _ = causal_lm_loss_sum(logits_BTV, ids_BT, labels_BT)
            return ce_sum / denom * scale, ce_sum

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro(carry, mb):
            grads_acc, ce_acc = carry
            ids_BT = constrain(mb[0], ("batch", "seq"))
            labels_BT = constrain(mb[1], ("batch", "seq"))
            (_, ce_sum), g = grad_fn(state.params, ids_BT, labels_BT)
            grads_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads_acc, g)
            return (grads_acc, ce_acc + ce_sum), None

        axes, n = _data_axes()
        if n > 1 and ids_ABT.shape[0] > 1:  # several shards and micro-batches: reduce once
            grads, ce_total = _local_grads(grad_fn, state.params, ids_ABT, labels_ABT, axes, n)
        else:  # one micro-batch or one shard: XLA's single reduction is already the minimum
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, ce_total), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32)), (ids_ABT, labels_ABT)
            )
        grads = jax.tree.map(lambda g: g / scale, grads)
        finite = all_finite(grads)
        grads, grad_norm = clip_by_global_norm_ds(grads, cfg.gradient_clipping)

        weights = state.fp32_params
        lr = schedule(state.applied_steps)
        updates, new_opt = tx.update(grads, state.opt_state, weights)
        new_weights = optax.apply_updates(weights, updates)
        new_weights = _select(finite, new_weights, weights)
        new_opt = _select(finite, new_opt, state.opt_state)
        if state.master is None:
            new_params, new_master = new_weights, None
        else:
            new_params, new_master = cast_tree(new_weights, cfg.compute_dtype), new_weights
        skipped = jnp.logical_not(finite)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            master=new_master,
            opt_state=new_opt,
            loss_scale=update_loss_scale(state.loss_scale, skipped, cfg.loss_scale),
            skipped=state.skipped + skipped.astype(jnp.int32),
        )
        metrics = {
            "loss": ce_total / denom,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            "loss_scale": scale,
            "skipped": skipped.astype(jnp.float32),
            "tokens": n_valid,
        }
        return new_state, metrics

    return train_step


def make_eval_step(apply_fn: ApplyFn) -> Callable[[PyTree, Batch], dict[str, jax.Array]]:
    """Build ``eval_step(params, batch) -> {"loss", "tokens"}`` (no update).

    The batch is ``[micro_batches, micro_batch_global, seq]`` like the train step's.
    """

    def eval_step(params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        ids_ABT = batch["input_ids"]
        labels_ABT = batch.get("labels", ids_ABT)

        def micro(carry, mb):
            ids_BT = constrain(mb[0], ("batch", "seq"))
            labels_BT = constrain(mb[1], ("batch", "seq"))
            ce_sum, n = causal_lm_loss_sum(apply_fn(params, ids_BT), ids_BT, labels_BT)
            return (carry[0] + ce_sum, carry[1] + n), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (ce, n), _ = jax.lax.scan(micro, init, (ids_ABT, labels_ABT))
        return {"loss": ce / jnp.maximum(n, 1.0), "tokens": n}

    return eval_step
