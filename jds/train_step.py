"""The training step as pure functions: loss, micro-batch scan, clipping, optax update.

``make_train_step`` closes over the static choices (how to apply the model, the optax
transformation, accumulation steps, clipping, loss scaling) and returns
``train_step(state, batch) -> (state, metrics)``: a pure function, jittable without an
engine. Features are chosen here, when the step is built, not as branches inside it.

Semantics follow DeepSpeed's engine:

- The step differentiates an *objective*: ``(params, frozen, model_state, micro_batch) ->
  (summed loss, summed metrics, new model state)`` with a parameter-independent *weight*
  per micro-batch (``jds.models.base.Loss``). The step's loss is the sum over micro-batches
  divided by the summed weight. A user's ``loss_fn`` is a micro-batch mean of weight 1, so
  this is DeepSpeed's average of micro-batch means; the causal-LM loss sums cross-entropy
  and weighs by valid targets, so it is the mean over every valid token of the *global*
  batch (Hugging Face's loss; labels of -100 ignored). The model state (BatchNorm
  statistics, RNG counts) is carried from one micro-batch to the next.
- Gradient accumulation is a ``lax.scan`` over micro-batches, accumulating fp32 gradients
  (fp32 even under bf16/fp16: DeepSpeed's bf16 optimizer keeps fp32 gradient partitions
  too; the ZeRO table's 2 bytes/param of fp16 gradients is the fp16 optimizer's figure).
  Where the data-parallel reduction happens follows DeepSpeed's ZeRO stage (``StepConfig.zero``):

  - stage 0/1 (gradients replicated): each device accumulates its own shard's gradients
    and they are reduced once per step, after the scan, as DeepSpeed's engine does at
    the accumulation boundary: all-reduced under stage 0, reduce-scattered under stage 1
    (each device needs only its optimizer shard of the sum; an all-reduce wrote a second
    full-size fp32 gradient beside the accumulator). Left to itself XLA's partitioner
    would all-reduce inside the scan, once per micro-batch; ``_local_grads`` prevents that
    by keeping a leading data-parallel axis on the per-shard gradients (a ``vmap`` over
    per-device batch slices with ``spmd_axis_name``), so nothing is reduced until the
    final sum. That is only right for a loss that is a sum over rows
    (``Loss.per_example``, the LM loss) of a model without state: a BatchNorm sees the
    whole micro-batch, so a user's objective takes gradients over the global micro-batch
    and XLA reduces them per micro-batch.
  - stage 2 (gradients sharded): in jds's stacked decoders the model's ``ParamGather``
    constrains each parameter's gradient to its ZeRO shard at the point of use, as under
    stage 3, so XLA reduce-scatters a layer's gradients inside the backward layer scan and
    the scan stacks only gradient *shards*: no device ever holds a full-size gradient,
    DeepSpeed's bucketed reduce-scatter during the backward pass. (Reducing after the
    backward pass instead kept the whole micro-batch gradient, 4 bytes/param, beside the
    accumulator: issue 19's 8-layer Llama on 8 devices, fp32, peaked at 10.3 bytes/param,
    now 7.2.) XLA:CPU has no reduce-scatter inside such a loop: it lowers the pair as an
    all-reduce and a slice, moving more bytes between the simulated devices; the GPU and
    TPU compilers emit the reduce-scatter. A user's own module (no ``ParamGather``) has
    every micro-batch's gradients reduce-scattered after its backward pass
    (``_reduce_scatter``, an explicit ``psum_scatter``) into the sharded accumulator.
  - stage 3 (parameters sharded too): the model gathers each layer's weights inside its
    layer scan (its ``jds.partitioning.zero.ParamGather``), whose gradient is constrained
    back to the sharded layout, so XLA reduces each layer's gradients in the backward scan
    straight into the sharded accumulator.
- With several micro-batches, jds's stacked decoders add each layer's weight gradients
  into the accumulator inside their backward layer scan (``jds.partitioning.accumulate``)
  instead of stacking a micro-batch's gradients in a buffer of their own first: one
  full-size gradient buffer fewer under stages 0/1 (4 bytes/param in fp32), one shard
  fewer under stages 2/3.
- Gradients are unscaled, their global norm measured, and clipped as DeepSpeed's
  ``clip_grad_norm_`` does: ``g *= max_norm / (norm + 1e-6)`` when that factor is < 1.
- A step whose gradients are not finite is skipped (params, master weights and optimizer
  state unchanged; ``skipped`` counted; the LR schedule does not advance, as DeepSpeed
  only steps its scheduler on applied steps). Under fp16 this is the loss-scaler overflow
  path; in fp32/bf16 DeepSpeed would apply the NaN and ruin the weights, jds skips it
  instead. How it is skipped decides whether the update happens in place on the donated
  state, and the two compilers want opposite forms (``StepConfig.skip_by_select``): XLA:CPU
  updates in place inside a ``lax.cond`` and keeps old and new side by side around a
  select; XLA:GPU gives a conditional's results buffers of their own (beside the donated
  old state, with copies for the skip branch) and fuses an element-wise select into the
  update, writing over the old state. Issue 19's 8-layer Llama compiled for 8 x H100
  (deviceless XLA:GPU, ``scripts/bench_zero_peak.py --target h100``), bytes/param, cond
  -> select: fp32 ZeRO 0-3 28.0 / 11.0 / 11.0 / 3.50 -> 20.0 / 9.89 / 7.81 / 3.11, bf16
  32.8 / 8.39 / 5.92 / 3.62 -> 22.0 / 8.39 / 5.30 / 2.73; on CPU the select would take
  fp32 ZeRO-0 from 20.0 to 26.4. The engine selects on GPUs only: a deviceless TPU compile
  (v5e) reports 0-1 bytes/param of temporaries either way, too little to tell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jds.compression.weight_quantization import quantization_step
from jds.models.base import IGNORE_INDEX, causal_lm_loss_sum
from jds.models.layer_drop import training_step
from jds.partitioning.accumulate import gradient_sink
from jds.partitioning.offload import OffloadedStates, streamed_update
from jds.partitioning.rules import active_rules, constrain, use_rules
from jds.partitioning.zero import ZeroPlan
from jds.precision import LossScaleConfig, all_finite, cast_tree, update_loss_scale
from jds.state import TrainState

PyTree = Any
Batch = PyTree  # every leaf [micro_batches, micro_batch_global, ...]
# (params, frozen, model_state, micro_batch) -> (summed loss, summed metrics, new model state)
Objective = Callable[[PyTree, PyTree, PyTree, PyTree], tuple[jax.Array, dict, PyTree]]
WeightFn = Callable[[PyTree], jax.Array]  # micro_batch -> weight (parameter-independent)


@dataclass(frozen=True)
class StepConfig:
    """Static choices of a train step.

    Attributes:
      gradient_accumulation_steps: micro-batches per optimizer step (leading batch axis).
      gradient_clipping: max global gradient norm; 0 disables clipping.
      compute_dtype: dtype of ``state.params`` (the compute copy).
      loss_scale: fp16 loss scaling config, or None (fp32/bf16).
      zero: the ZeRO plan of the trainable parameters (specs of params, gradients,
        optimizer state); None = everything replicated over the data-parallel group.
      pipeline: ``(params, batch, seed) -> (fp32 grads, summed loss)`` running the
        micro-batches through pipeline stages (``jds.partitioning.pipeline``; the engine
        builds it); None = no pipeline.
      per_example: the objective is a sum over rows with no cross-row terms
        (``Loss.per_example``): data-parallel shards may take gradients apart.
      weight_metric: the metric name of the summed weight (``"tokens"``), or None.
      offload: where host-resident optimizer states are streamed through the device for
        the update (``jds.partitioning.offload``); None = states in device memory.
      params_device: with the parameters resting in host memory (ZeRO-3 ``offload_param``),
        their shardings in device memory: gradients, whose cotangents arrive in host
        memory, are brought back to the device (sharded) to be accumulated; None otherwise.
      grads_reduced_in_backward: the objective's model constrains each parameter's gradient
        to the ZeRO gradient layout at its point of use (a ``ParamGather`` in a stacked
        decoder), so sharded gradients are reduce-scattered a layer at a time inside the
        backward scan rather than after it.
      accumulate_in_place: with more than one micro-batch, the model's layer scan adds its
        weights' gradients into the fp32 accumulator in its backward pass
        (``jds.partitioning.accumulate``) instead of stacking them in a buffer of their own.
      update_outside: the step stops before the optimizer update and returns what the
        update needs, ``(state, metrics, (grads, finite, clip factor))``, with the
        weights and optimizer state passed through unchanged: the NVMe tier updates them
        chunk by chunk from its swap files (``jds.partitioning.nvme``).
      skip_by_select: a step with non-finite gradients keeps the old weights and
        optimizer state through an element-wise select after an unconditional update
        (what XLA:GPU updates in place) instead of a ``lax.cond`` (what XLA:CPU updates in
        place); the same values either way (see the module docstring).
    """

    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    compute_dtype: Any = jnp.float32
    loss_scale: LossScaleConfig | None = None
    zero: ZeroPlan | None = None
    pipeline: Callable[..., tuple[PyTree, jax.Array]] | None = None
    per_example: bool = False
    weight_metric: str | None = None
    offload: OffloadedStates | None = None
    params_device: Any = None
    grads_reduced_in_backward: bool = False
    accumulate_in_place: bool = False
    update_outside: bool = False
    skip_by_select: bool = False


class Gradients(NamedTuple):
    """What ``make_gradients``' function returns.

    Attributes:
      grads: fp32 gradients of ``scale * loss`` (laid out as the ZeRO stage shards them).
      loss_sum: the summed loss over the micro-batches (fp32 scalar).
      weight: the summed weight (the step's divisor, before the guard against 0).
      aux: the summed metrics.
      model_state: the model state after the last micro-batch.
    """

    grads: PyTree
    loss_sum: jax.Array
    weight: jax.Array
    aux: dict[str, jax.Array]
    model_state: PyTree


def clip_factor(norm: jax.Array, max_norm: float) -> jax.Array | None:
    """DeepSpeed's clipping factor ``min(1, max_norm / (norm + 1e-6))``; None = no clipping."""
    if max_norm <= 0:
        return None
    return jnp.minimum(1.0, max_norm / (norm + 1e-6))


def clip_by_global_norm_ds(grads: PyTree, max_norm: float) -> tuple[PyTree, jax.Array]:
    """DeepSpeed's clipping: scale by ``max_norm / (norm + 1e-6)`` when that is < 1.

    Returns:
      ``(clipped grads, pre-clip global norm)``.
    """
    norm = optax.tree.norm(grads)
    factor = clip_factor(norm, max_norm)
    if factor is None:
        return grads, norm
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), norm


def _data_axes() -> tuple[tuple[str, ...], int]:
    """Mesh axes the batch is split over (size > 1) and their product, from the active rules."""
    active = active_rules()
    if active is None:
        return (), 1
    mesh, rules = active
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    return axes, int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _reduce_scatter(grads_N: PyTree, plan: ZeroPlan, axes: tuple[str, ...],
                    which: str = "grads") -> PyTree:
    """Sum per-shard gradients ``[n, ...]`` over the data-parallel shards, each device
    keeping only its ZeRO slice of ``which`` (``"grads"``, or ``"optimizer"`` for ZeRO-1's
    reduction at the accumulation boundary): one explicit ``psum_scatter`` per parameter.

    Written as a ``shard_map`` rather than left to XLA: on CPU XLA lowers a sharded sum to
    an all-reduce followed by a slice, moving ``Nd`` times the bytes a reduce-scatter does
    (GPU and TPU compilers fuse it back; the CPU one does not). Dimensions split by tensor
    parallelism stay split (the map is over every mesh axis). Axes in ``axes`` that are not
    ZeRO axes for gradients (MiCS: the groups' replicas) are summed with a ``psum`` first.
    """
    mesh, _ = active_rules()
    gaxes = getattr(plan.layout, which)
    if not set(gaxes) <= set(axes):
        raise ValueError(
            f"{which} are sharded over {gaxes} but the batch is split over {axes}; the "
            "'batch' rule must cover every ZeRO axis"
        )
    rest = tuple(a for a in axes if a not in gaxes)
    leaves, treedef = jax.tree.flatten(grads_N)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    base = jax.tree.leaves(plan.base, is_leaf=is_spec)
    out = jax.tree.leaves(getattr(plan, which), is_leaf=is_spec)
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


def _f32(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)


def _into_accumulator(loss_of: Callable) -> Callable:
    """``(params, mb, state, acc) -> ((scaled loss, aux), acc + grads)`` for ``loss_of(params,
    mb, state) -> (scaled loss, aux)``: the gradients a layer scan can take in place
    (``gradient_sink``) are added there, the rest after the backward pass."""

    def step(params, mb, state, acc):
        used: set[int] = set()

        def sunk(params, acc):
            with gradient_sink(params, acc) as u:
                out = loss_of(params, mb, state)
            used.update(u)
            return out

        out, (g_p, g_acc) = jax.value_and_grad(sunk, argnums=(0, 1), has_aux=True)(params, acc)
        leaves, treedef = jax.tree.flatten(acc)
        new = [ga if i in used else a + gp.astype(a.dtype) for i, (a, gp, ga) in
               enumerate(zip(leaves, jax.tree.leaves(g_p), jax.tree.leaves(g_acc), strict=True))]
        return out, jax.tree.unflatten(treedef, new)

    return step


def _local_grads(
    grad_fn: Callable, params: PyTree, batch: Batch, aux0: dict, axes: tuple[str, ...],
    n: int, plan: ZeroPlan | None, into: Callable | None = None,
) -> tuple[PyTree, jax.Array, dict]:
    """Sums of gradients, loss and metrics over micro-batches, with the data-parallel
    reduction placed where DeepSpeed places it (a per-row objective only).

    Each of the ``n`` data-parallel shards gets its batch slice and ``vmap(...,
    spmd_axis_name=axes)`` keeps the per-shard gradients apart (``[n, ...]``, sharded on
    ``axes``: device-local), so XLA's partitioner has nothing to all-reduce on its own.

    - Gradients replicated (ZeRO 0/1): the scan accumulates the per-shard gradients and the
      final ``sum`` over the shard axis is the step's only gradient all-reduce.
    - Gradients sharded (ZeRO 2, or a gradient partition size): every micro-batch's
      gradients are reduce-scattered into a sharded fp32 accumulator, as ZeRO-2 does, so no
      device ever holds a full-size accumulation buffer.

    ``into`` (``_into_accumulator``'s function, gradients replicated only): each shard's
    gradients go into its accumulator in place.
    """
    mesh, rules = active_rules()
    local_rules = {**rules, "batch": ()}  # the shard axis carries the batch's mesh axes
    lead = NamedSharding(mesh, PartitionSpec(None, axes))
    scatter = plan is not None and bool(plan.layout.grads)

    def split(x_AB):
        A, B = x_AB.shape[:2]
        return jax.lax.with_sharding_constraint(x_AB.reshape(A, n, B // n, *x_AB.shape[2:]),
                                                lead)

    vgrad = jax.vmap(grad_fn, in_axes=(None, 0), spmd_axis_name=axes)

    if into is not None and not scatter:
        vinto = jax.vmap(into, in_axes=(None, 0, 0), spmd_axis_name=axes)

    def micro(carry, mb):
        grads_acc, loss_acc, aux_acc = carry
        if into is not None and not scatter:
            with use_rules(mesh, local_rules):
                (_, (loss_N, aux_N, _)), grads_acc = vinto(params, mb, grads_acc)
            return (grads_acc, loss_acc + loss_N, _add(aux_acc, aux_N)), None
        with use_rules(mesh, local_rules):
            (_, (loss_N, aux_N, _)), g_N = vgrad(params, mb)
        if scatter:
            with use_rules(mesh, rules):
                g = _reduce_scatter(g_N, plan, axes)
        else:
            g = g_N
        # per-shard sums stay apart until after the scan: summing here would all-reduce
        return (_add(grads_acc, g), loss_acc + loss_N, _add(aux_acc, aux_N)), None

    if scatter:
        zeros = _zeros_like(params, plan.shardings(mesh, "grads"))
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros((n, *p.shape), jnp.float32), params)
    aux0_N = jax.tree.map(lambda a: jnp.zeros((n, *a.shape), jnp.float32), aux0)
    (grads, loss_N, aux_N), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((n,), jnp.float32), aux0_N), jax.tree.map(split, batch))
    if not scatter and plan is not None and plan.layout.optimizer:
        # ZeRO-1 at the accumulation boundary: each device needs only its optimizer shard
        # of the summed gradients, so reduce-scatter to it, as DeepSpeed does (an all-reduce
        # wrote a second full-size fp32 gradient beside the accumulator: 4 bytes/param)
        with use_rules(mesh, rules):
            grads = _reduce_scatter(grads, plan, axes, "optimizer")
    elif not scatter:
        grads = jax.tree.map(lambda g: g.sum(0), grads)
    return grads, loss_N.sum(), jax.tree.map(lambda a: a.sum(0), aux_N)


def _zeros_like(params: PyTree, shardings: PyTree | None) -> PyTree:
    """fp32 zeros shaped like ``params``, laid out as ``shardings`` when given."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if shardings is None:
        return zeros
    return jax.lax.with_sharding_constraint(zeros, shardings)


def _constrain_rows(mb: PyTree) -> PyTree:
    """A micro-batch's leaves with their leading (row) axis on the data-parallel axes."""
    return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)


def total_weight(weight_fn: WeightFn, batch: Batch) -> jax.Array:
    """The summed weight of a ``[micro, ...]`` batch's micro-batches."""
    return jnp.sum(jax.vmap(weight_fn)(batch)).astype(jnp.float32)


def _divisor(weight: jax.Array) -> jax.Array:
    return jnp.where(weight > 0, weight, 1.0)


def _aux_zeros(objective: Objective, params: PyTree, frozen: PyTree, model_state: PyTree,
               batch: Batch) -> dict:
    mb = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    aux = jax.eval_shape(objective, params, frozen, model_state, mb)[1]
    return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux)


def make_gradients(
    objective: Objective, weight_fn: WeightFn, cfg: StepConfig
) -> Callable[[PyTree, PyTree, PyTree, Batch, jax.Array], Gradients]:
    """Build ``gradients(params, frozen, model_state, batch, scale) -> Gradients``.

    The gradients are those of ``scale * loss`` (``scale``: the fp16 loss scale, 1
    otherwise), where loss is the micro-batches' summed loss over their summed weight,
    accumulated with the data-parallel reduction DeepSpeed's ZeRO stage places (see the
    module docstring), or through the pipeline schedule when ``cfg.pipeline`` is set.
    """

    def gradients(params, frozen, model_state, batch, scale) -> Gradients:
        weight = total_weight(weight_fn, batch)
        seed = scale / _divisor(weight)

        def loss_of(params, mb, state):
            loss_sum, aux, new_state = objective(params, frozen, state, mb)
            if jnp.shape(loss_sum) != ():
                raise ValueError(f"the loss must be a scalar; got shape {jnp.shape(loss_sum)}")
            return loss_sum * seed, (loss_sum, aux, new_state)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if cfg.pipeline is not None:
            # The schedule runs forwards and backwards itself; seed = d(loss)/d(summed loss).
            grads, loss_sum = cfg.pipeline(params, batch, seed)
            return Gradients(grads, loss_sum, weight, {}, model_state)

        aux0 = _aux_zeros(objective, params, frozen, model_state, batch)
        axes, n = _data_axes()
        plan = cfg.zero
        sharded_params = plan is not None and bool(plan.layout.params)
        sharded_grads = plan is not None and bool(plan.layout.grads)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        in_backward = sharded_grads and cfg.grads_reduced_in_backward
        # host-resident parameters (offload_param) send their gradients back to the host
        into = (_into_accumulator(loss_of) if cfg.accumulate_in_place and n_micro > 1
                and cfg.params_device is None else None)
        if (cfg.per_example and not jax.tree.leaves(model_state) and n > 1
                and not sharded_params and not in_backward and (sharded_grads or n_micro > 1)):
            grads, loss_sum, aux = _local_grads(
                lambda p, mb: grad_fn(p, mb, model_state), params, batch, aux0, axes, n, plan,
                None if into is None else lambda p, mb, acc: into(p, mb, model_state, acc))
            return Gradients(grads, loss_sum, weight, aux, model_state)

        # One shard, one micro-batch of replicated gradients (XLA's single all-reduce is
        # the minimum), an objective over the whole micro-batch (BatchNorm), or ZeRO-3:
        # parameters are gathered where the model uses them and XLA reduce-scatters their
        # gradients in the backward pass, straight into the sharded accumulator.
        grad_sh = None
        if plan is not None and sharded_grads and active_rules() is not None:
            grad_sh = plan.shardings(active_rules()[0], "grads")

        def micro(carry, mb):
            grads_acc, loss_acc, aux_acc, state = carry
            if into is not None:
                (_, (loss_sum, aux, state)), grads_acc = into(params, _constrain_rows(mb), state,
                                                              grads_acc)
                if grad_sh is not None:
                    grads_acc = jax.lax.with_sharding_constraint(grads_acc, grad_sh)
                return (grads_acc, loss_acc + loss_sum, _add(aux_acc, aux), state), None
            (_, (loss_sum, aux, state)), g = grad_fn(params, _constrain_rows(mb), state)
            if cfg.params_device is not None:  # host-resident params: their grads to device
                g = jax.device_put(g, grad_sh or cfg.params_device)
            g = _f32(g)
            if grad_sh is not None:
                g = jax.lax.with_sharding_constraint(g, grad_sh)
            return (_add(grads_acc, g), loss_acc + loss_sum, _add(aux_acc, aux), state), None

        init = (_zeros_like(params, grad_sh), jnp.zeros((), jnp.float32), aux0, model_state)
        (grads, loss_sum, aux, model_state), _ = jax.lax.scan(micro, init, batch)
        return Gradients(grads, loss_sum, weight, aux, model_state)

    return gradients


def _metrics(loss_sum: jax.Array, weight: jax.Array, aux: dict, weight_metric: str | None
             ) -> dict[str, jax.Array]:
    denom = _divisor(weight)
    out = {"loss": loss_sum / denom, **{k: v / denom for k, v in aux.items()}}
    if weight_metric is not None:
        out[weight_metric] = weight
    return out


def _step_metrics(g: Gradients, grad_norm: jax.Array, lr: Any, scale: jax.Array,
                  skipped: jax.Array, cfg: StepConfig) -> dict[str, jax.Array]:
    return {
        **_metrics(g.loss_sum, g.weight, g.aux, cfg.weight_metric),
        "grad_norm": grad_norm,
        "lr": jnp.asarray(lr, jnp.float32),
        "loss_scale": scale,
        "skipped": skipped.astype(jnp.float32),
    }


def make_train_step(
    objective: Objective,
    weight_fn: WeightFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    Args:
      objective: ``(params, frozen, model_state, micro_batch) -> (summed loss, summed
        metrics, new model state)`` in training mode (``jds.models.base.make_objective``).
      weight_fn: a micro-batch's weight (the loss's divisor).
      tx: the optax transformation (its state lives in ``state.opt_state``).
      schedule: the learning-rate schedule inside ``tx``, for the ``lr`` metric.
      cfg: static step choices.

    The batch is any pytree whose leaves are ``[gradient_accumulation_steps,
    micro_batch_global, ...]``.

    Returns:
      The step function. Metrics (device scalars): ``loss``, the loss's own metrics,
      ``grad_norm``, ``lr``, ``loss_scale``, ``skipped`` (1.0 if this step was skipped),
      and the summed weight under ``cfg.weight_metric`` (``tokens`` for the LM loss).
    """

    gradients = make_gradients(objective, weight_fn, cfg)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        scale = state.loss_scale.scale
        # step-dependent layers (Progressive Layer Drop) and quantization-aware weights (MoQ)
        with training_step(state.step), quantization_step(state.applied_steps):
            g = gradients(state.params, state.frozen, state.model_state, batch, scale)
        # fp32/bf16 have no loss scale (it stays 1): dividing would copy every gradient
        grads = g.grads if cfg.loss_scale is None else jax.tree.map(lambda x: x / scale,
                                                                     g.grads)
        finite = all_finite(grads)
        grad_norm = optax.tree.norm(grads)
        factor = clip_factor(grad_norm, cfg.gradient_clipping)

        if cfg.update_outside:  # the NVMe tier updates the states (jds.partitioning.nvme)
            skipped = jnp.logical_not(finite)
            new_state = state.replace(
                step=state.step + 1,
                loss_scale=update_loss_scale(state.loss_scale, skipped, cfg.loss_scale),
                skipped=state.skipped + skipped.astype(jnp.int32),
                model_state=g.model_state)
            metrics = _step_metrics(g, grad_norm, schedule(state.applied_steps), scale,
                                    skipped, cfg)
            return new_state, metrics, (grads, finite, jnp.ones((), jnp.float32)
                                        if factor is None else factor)

        weights = state.fp32_params
        if cfg.params_device is not None and state.master is None and cfg.offload is None:
            weights = jax.device_put(weights, cfg.params_device)  # fp32 params from the host
        lr = schedule(state.applied_steps)

        def apply(operands):
            grads, opt_state, weights = operands
            if factor is not None:  # scaled here, where XLA fuses it into the update
                grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
            updates, new_opt = tx.update(grads, opt_state, weights)
            return optax.apply_updates(weights, updates), new_opt

        new_params = None
        if cfg.offload is not None:
            # ZeRO-Offload: master weights and optimizer state stream through the device
            new_weights, new_opt, new_params = streamed_update(
                tx, grads, state.opt_state, weights, cfg.offload, finite=finite,
                factor=factor, compute_dtype=cfg.compute_dtype)
        elif cfg.skip_by_select:  # fused into the update: in place on XLA:GPU
            new_weights, new_opt = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                apply((grads, state.opt_state, weights)), (weights, state.opt_state))
        else:
            # A conditional: XLA:CPU keeps both sides of a select alive (a second copy of
            # the weights and the optimizer state, 12 bytes/param under ZeRO-0 with Adam);
            # a skipped step just returns the old ones.
            new_weights, new_opt = jax.lax.cond(
                finite, apply, lambda operands: (operands[2], operands[1]),
                (grads, state.opt_state, weights))
        if state.master is None:
            new_params, new_master = new_weights, None
        else:
            if new_params is None:
                new_params = cast_tree(new_weights, cfg.compute_dtype)
            new_master = new_weights
        skipped = jnp.logical_not(finite)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            master=new_master,
            opt_state=new_opt,
            loss_scale=update_loss_scale(state.loss_scale, skipped, cfg.loss_scale),
            skipped=state.skipped + skipped.astype(jnp.int32),
            # The forward pass ran, skipped or not: its statistics stand (as in PyTorch).
            model_state=g.model_state,
        )
        return new_state, _step_metrics(g, grad_norm, lr, scale, skipped, cfg)

    return train_step


def make_eval_step(
    objective: Objective, weight_fn: WeightFn, weight_metric: str | None = None
) -> Callable[[PyTree, PyTree, PyTree, Batch], dict[str, jax.Array]]:
    """Build ``eval_step(params, frozen, model_state, batch) -> metrics`` (no update).

    ``objective`` is the evaluation-mode one (Dropout off, BatchNorm on its running
    statistics); the batch is ``[micro_batches, micro_batch_global, ...]`` like the train
    step's. Metrics: ``loss``, the loss's own metrics, and the summed weight under
    ``weight_metric``.
    """

    def eval_step(params: PyTree, frozen: PyTree, model_state: PyTree, batch: Batch
                  ) -> dict[str, jax.Array]:
        aux0 = _aux_zeros(objective, params, frozen, model_state, batch)

        def micro(carry, mb):
            loss_sum, aux, _ = objective(params, frozen, model_state, _constrain_rows(mb))
            return (carry[0] + loss_sum, _add(carry[1], aux)), None

        (loss_sum, aux), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), aux0), batch)
        return _metrics(loss_sum, total_weight(weight_fn, batch), aux, weight_metric)

    return eval_step


__all__ = [
    "IGNORE_INDEX",
    "Gradients",
    "Objective",
    "StepConfig",
    "causal_lm_loss_sum",
    "clip_by_global_norm_ds",
    "make_eval_step",
    "make_gradients",
    "make_train_step",
    "total_weight",
]
