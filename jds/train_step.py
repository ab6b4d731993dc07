"""The training step as pure functions: loss, micro-batch scan, clipping, optax update.

``make_train_step`` closes over the static choices (how to apply the model, the optax
transformation, accumulation steps, clipping, loss scaling) and returns
``train_step(state, batch) -> (state, metrics)``: a pure function, jittable without an
engine. Features are chosen here, when the step is built, not as branches inside it.

Semantics follow DeepSpeed's engine:

- The loss is the Hugging Face causal-LM loss: mean cross-entropy of predicting token t+1
  from tokens <= t, over every valid target of the *global* batch (labels of -100 are
  ignored). With unpadded batches this equals DeepSpeed's average of per-micro-batch means.
- Gradient accumulation is a ``lax.scan`` over micro-batches, accumulating fp32 gradients
  (fp32 even under bf16/fp16: DeepSpeed's bf16 optimizer keeps fp32 gradient partitions
  too; the ZeRO table's 2 bytes/param of fp16 gradients is the fp16 optimizer's figure).
  Where the data-parallel reduction happens follows DeepSpeed's ZeRO stage (``StepConfig.zero``):

  - stage 0/1 (gradients replicated): each device accumulates its own shard's gradients
    and they are all-reduced once per step, after the scan, as DeepSpeed's engine does at
    the accumulation boundary. Left to itself XLA's partitioner would all-reduce inside
    the scan, once per micro-batch; ``_local_grads`` prevents that by keeping a leading
    data-parallel axis on the per-shard gradients (a ``vmap`` over per-device batch slices
    with ``spmd_axis_name``), so nothing is reduced until the final sum.
  - stage 2 (gradients sharded): every micro-batch's gradients are reduce-scattered
    (``_reduce_scatter``, an explicit ``psum_scatter``) into a sharded accumulator, so no
    device holds a full fp32 accumulation buffer.
  - stage 3 (parameters sharded too): the model gathers each layer's weights inside its
    layer scan (``jds.partitioning.zero.gather_param``), whose gradient is constrained
    back to the sharded layout, so XLA reduces each layer's gradients in the backward scan
    straight into the sharded accumulator.
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
from jds.partitioning.zero import ZeroPlan
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
    # The target's logit as a masked sum over the vocabulary rather than a gather: with the
    # vocabulary split over ``tensor`` this is a local reduce plus an all-reduce (Megatron's
    # vocab-parallel cross-entropy), and XLA's partitioner cannot split a gather on a sharded
    # dimension inside the pipeline's partly manual ``shard_map``. Exact: one term is kept.
    vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=safe_BT.dtype)
    picked_BT = jnp.sum(jnp.where(vocab_V == safe_BT[..., None], logits_BTV, 0.0), axis=-1)
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
      zero: the ZeRO plan (per-parameter specs of params, gradients, optimizer state);
        None = everything replicated over the data-parallel group.
      pipeline: ``(params, ids_ABT, labels_ABT, seed) -> (fp32 grads, summed
        cross-entropy)`` running the micro-batches through pipeline stages
        (``jds.partitioning.pipeline``; the engine builds it); None = no pipeline.
    """

    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    compute_dtype: Any = jnp.float32
    loss_scale: LossScaleConfig | None = None
    zero: ZeroPlan | None = None
    pipeline: Callable[..., tuple[PyTree, jax.Array]] | None = None


def clip_by_global_norm_ds(grads: PyTree, max_norm: float) -> tuple[PyTree, jax.Array]:
    """DeepSpeed's clipping: scale by ``max_norm / (norm + 1e-6)`` when that is < 1.

    Returns:
      ``(clipped grads, pre-clip global norm)``.
    """
    norm = optax.tree.norm(grads)
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


def _reduce_scatter(grads_N: PyTree, plan: ZeroPlan, axes: tuple[str, ...]) -> PyTree:
    """Sum per-shard gradients ``[n, ...]`` over the data-parallel shards, each device
    keeping only its ZeRO slice: one explicit ``psum_scatter`` per parameter.

    Written as a ``shard_map`` rather than left to XLA: on CPU XLA lowers a sharded sum to
    an all-reduce followed by a slice, moving ``Nd`` times the bytes a reduce-scatter does
    (GPU and TPU compilers fuse it back; the CPU one does not). Dimensions split by tensor
    parallelism stay split (the map is over every mesh axis). Axes in ``axes`` that are not
    ZeRO axes for gradients (MiCS: the groups' replicas) are summed with a ``psum`` first.
    """
    mesh, _ = active_rules()
    gaxes = plan.layout.grads
    if not set(gaxes) <= set(axes):
        raise ValueError(
            f"gradients are sharded over {gaxes} but the batch is split over {axes}; the "
            "'batch' rule must cover every ZeRO axis"
        )
    rest = tuple(a for a in axes if a not in gaxes)
    leaves, treedef = jax.tree.flatten(grads_N)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    base = jax.tree.leaves(plan.base, is_leaf=is_spec)
    out = jax.tree.leaves(plan.grads, is_leaf=is_spec)
    dims = jax.tree.leaves(plan.dims)

    def local(*gs):
        res = []
        for g, dim in zip(gs, dims, strict=True):
            g = g[0].astype(jnp.float32)
            if dim < 0 or not gaxes:
                res.append(jax.lax.psum(g, axes))
                continue
            if rest:
                g = jax.lax.psum(g, rest)
            res.append(jax.lax.psum_scatter(g, gaxes, scatter_dimension=dim, tiled=True))
        return tuple(res)

    in_specs = tuple(PartitionSpec(axes, *b) for b in base)
    reduced = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tuple(out))(*leaves)
    return jax.tree.unflatten(treedef, list(reduced))


def _local_grads(
    grad_fn: Callable, params: PyTree, ids_ABT: jax.Array, labels_ABT: jax.Array,
    axes: tuple[str, ...], n: int, plan: ZeroPlan | None,
) -> tuple[PyTree, jax.Array]:
    """Sum of gradients and of cross-entropy over micro-batches, with the data-parallel
    reduction placed where DeepSpeed places it.

    Each of the ``n`` data-parallel shards gets its batch slice and ``vmap(...,
    spmd_axis_name=axes)`` keeps the per-shard gradients apart (``[n, ...]``, sharded on
    ``axes``: device-local), so XLA's partitioner has nothing to all-reduce on its own.

    - Gradients replicated (ZeRO 0/1): the scan accumulates the per-shard gradients and the
      final ``sum`` over the shard axis is the step's only gradient all-reduce.
    - Gradients sharded (ZeRO 2, or a gradient partition size): every micro-batch's
      gradients are reduce-scattered into a sharded fp32 accumulator, as ZeRO-2 does, so no
      device ever holds a full-size accumulation buffer.
    """
    mesh, rules = active_rules()
    local_rules = {**rules, "batch": ()}  # the shard axis carries the batch's mesh axes
    A, B, T = ids_ABT.shape
    lead = NamedSharding(mesh, PartitionSpec(None, axes))
    scatter = plan is not None and bool(plan.layout.grads)

    def split(x_ABT):
        return jax.lax.with_sharding_constraint(x_ABT.reshape(A, n, B // n, T), lead)

    vgrad = jax.vmap(grad_fn, in_axes=(None, 0, 0), spmd_axis_name=axes)

    def micro(carry, mb):
        grads_acc, ce_acc = carry
        with use_rules(mesh, local_rules):
            (_, ce_N), g_N = vgrad(params, mb[0], mb[1])
        if scatter:
            with use_rules(mesh, rules):
                g = _reduce_scatter(g_N, plan, axes)
        else:
            g = g_N
        grads_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads_acc, g)
        return (grads_acc, ce_acc + ce_N), None

    if scatter:
        zeros = _zeros_like(params, plan.shardings(mesh, "grads"))
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros((n, *p.shape), jnp.float32), params)
    (grads, ce_N), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((n,), jnp.float32)), (split(ids_ABT), split(labels_ABT))
    )
    if not scatter:
        grads = jax.tree.map(lambda g: g.sum(0), grads)
    return grads, ce_N.sum()


def _zeros_like(params: PyTree, shardings: PyTree | None) -> PyTree:
    """fp32 zeros shaped like ``params``, laid out as ``shardings`` when given."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if shardings is None:
        return zeros
    return jax.lax.with_sharding_constraint(zeros, shardings)


def _select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_gradients(
    apply_fn: ApplyFn, cfg: StepConfig
) -> Callable[[PyTree, Batch, jax.Array], tuple[PyTree, jax.Array, jax.Array]]:
    """Build ``gradients(params, batch, scale) -> (fp32 grads, summed CE, valid targets)``.

    The gradients are those of ``scale * mean cross-entropy`` over the batch's valid
    targets (``scale`` is the fp16 loss scale, 1 otherwise), accumulated over the
    micro-batches with the data-parallel reduction DeepSpeed's ZeRO stage places (see the
    module docstring), or through the pipeline schedule when ``cfg.pipeline`` is set.
    """

    def gradients(params: PyTree, batch: Batch, scale: jax.Array):
        ids_ABT = batch["input_ids"]
        labels_ABT = batch.get("labels", ids_ABT)
        n_valid = (labels_ABT[:, :, 1:] != IGNORE_INDEX).sum().astype(jnp.float32)
        denom = jnp.maximum(n_valid, 1.0)

        def loss_fn(params, ids_BT, labels_BT):
            logits_BTV = apply_fn(params, ids_BT)
            ce_sum, _ = causal_lm_loss_sum(logits_BTV, ids_BT, labels_BT)
            return ce_sum / denom * scale, ce_sum

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        axes, n = _data_axes()
        plan = cfg.zero
        sharded_params = plan is not None and bool(plan.layout.params)
        sharded_grads = plan is not None and bool(plan.layout.grads)
        if cfg.pipeline is not None:
            # The schedule runs forwards and backwards itself; seed = d(loss)/d(sum of CE).
            grads, ce_total = cfg.pipeline(params, ids_ABT, labels_ABT, scale / denom)
        elif n > 1 and not sharded_params and (sharded_grads or ids_ABT.shape[0] > 1):
            grads, ce_total = _local_grads(grad_fn, params, ids_ABT, labels_ABT, axes, n, plan)
        else:
            # One shard, one micro-batch of replicated gradients (XLA's single all-reduce is
            # the minimum), or ZeRO-3: parameters are gathered layer by layer inside the
            # model's scan and XLA reduce-scatters each layer's gradients in the backward
            # scan, straight into the sharded accumulator.
            grad_sh = None
            if plan is not None and sharded_grads and active_rules() is not None:
                grad_sh = plan.shardings(active_rules()[0], "grads")
            zeros = _zeros_like(params, grad_sh)

            def micro(carry, mb):
                grads_acc, ce_acc = carry
                ids_BT = constrain(mb[0], ("batch", "seq"))
                labels_BT = constrain(mb[1], ("batch", "seq"))
                (_, ce_sum), g = grad_fn(params, ids_BT, labels_BT)
                g = jax.tree.map(lambda b: b.astype(jnp.float32), g)
                if grad_sh is not None:
                    g = jax.lax.with_sharding_constraint(g, grad_sh)
                grads_acc = jax.tree.map(jnp.add, grads_acc, g)
                return (grads_acc, ce_acc + ce_sum), None

            (grads, ce_total), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32)), (ids_ABT, labels_ABT)
            )
        return grads, ce_total, n_valid

    return gradients


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

    gradients = make_gradients(apply_fn, cfg)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        scale = state.loss_scale.scale
        grads, ce_total, n_valid = gradients(state.params, batch, scale)
        denom = jnp.maximum(n_valid, 1.0)
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
