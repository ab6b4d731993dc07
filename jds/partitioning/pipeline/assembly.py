"""A stacked decoder cut into pipeline stages: the train step's gradients and the eval
step through the schedule.

Written against the stacked-decoder protocol (``jds.models.base.StackedDecoder``: a
``layers`` submodule of stacked weights, ``embed`` / ``run_layers`` / ``head``), duck-typed
here so that ``partitioning`` depends on nothing above it; the engine checks the protocol
and passes the loss in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jds.partitioning.pipeline.executor import (
    StageFns,
    from_pipeline_order,
    local_specs,
    make_pipeline_grads,
    to_pipeline_order,
)
from jds.partitioning.pipeline.schedules import (
    Schedule,
    build_schedule,
    check_layers,
    forward_schedule,
)
from jds.partitioning.rules import Rules, logical_to_spec
from jds.partitioning.zero import ZeroLayout, ZeroPlan, make_plan

PyTree = Any
# (logits_BTV, ids_BT, labels_BT) -> summed loss (fp32 scalar)
HeadLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def layer_count(params: Mapping[str, Any]) -> int:
    """Layers in a stacked decoder's parameter tree (the leading axis under ``layers``)."""
    return int(jax.tree.leaves(params["layers"])[0].shape[0])


def pipeline_schedule(n_layers: int, stages: int, schedule: str, micro_batches: int,
                      virtual_stages: int) -> Schedule:
    """The schedule for a layer stack, checked (``ValueError`` naming the config key)."""
    check_layers(n_layers, stages, virtual_stages)
    return build_schedule(schedule, stages, micro_batches, virtual_stages)


def model_pipeline(split: Any, mesh: Mesh, rules: Rules, layout: ZeroLayout, *,
                   pipeline_cfg: Any,
                   micro_batches: int, own_loss: bool, head_loss: HeadLoss,
                   weight: Callable[[PyTree], jax.Array]) -> ModelPipeline:
    """A model cut into ``mesh.stage`` pipeline stages, checked against what stages need.

    Args:
      split: the engine's ``jds.models.base.SplitModel``.
      mesh, rules, layout: the mesh, rules and ZeRO layout.
      pipeline_cfg: the config's ``pipeline`` section (schedule, virtual stages,
        activation checkpoint interval).
      micro_batches: ``gradient_accumulation_steps``.
      own_loss: the user passed a ``loss_fn``.
      head_loss, weight: see ``ModelPipeline``.

    Raises:
      ValueError: naming the key, when the model is not a stacked decoder, trains with its
        own loss, frozen parameters or model state, or its layers do not split.
    """
    stages = int(mesh.shape["stage"])
    where = f"mesh.stage={stages}"
    if not split.stacked:
        raise ValueError(
            f"{where} needs a stacked decoder (jds.models.base.StackedDecoder: a 'layers' "
            f"module and embed/run_layers/head, as jds's Llama and GPT-2); "
            f"{split.module_type.__name__} is not one; set mesh.stage to 1")
    if own_loss or jax.tree.leaves(split.frozen) or jax.tree.leaves(split.model_state):
        raise ValueError(f"{where}: pipeline stages train a stacked decoder with its causal-LM "
                         "loss, every parameter trainable and no model state; drop loss_fn / "
                         "trainable (LoRA: the lora section trains the adapters only), or set "
                         "mesh.stage to 1")
    schedule = pipeline_schedule(layer_count(split.params), stages, pipeline_cfg.schedule,
                                 micro_batches, pipeline_cfg.virtual_stages)
    # after the layer count's own check: the plan's divisibility errors say less
    zero = make_plan(split.params, split.params_axes, mesh, rules, layout)
    return ModelPipeline(
        graphdef=split.graphdef, abstract_params=split.params, mesh=mesh, rules=rules,
        zero=zero, schedule=schedule,
        checkpoint_every=int(pipeline_cfg.activation_checkpoint_interval),
        head_loss=head_loss, weight=weight)


class ModelPipeline:
    """A stacked decoder's gradients and evaluation through pipeline stages.

    Args:
      graphdef: the model's graph definition (training mode).
      abstract_params: the parameter tree (shapes), with the stack under ``"layers"``.
      mesh, rules: the mesh (with a ``stage`` axis) and the rules (``layers`` -> ``stage``).
      zero: the ZeRO plan of the parameters.
      schedule: the training schedule (``pipeline_schedule``).
      checkpoint_every: rematerialise every ``k`` layers inside a stage (0: the model's
        own ``remat``).
      head_loss: the summed loss of the last stage's logits.
      weight: ``batch -> valid targets`` of a ``[micro, B, T]`` batch (for evaluation).
    """

    def __init__(self, *, graphdef: nnx.GraphDef, abstract_params: PyTree, mesh: Mesh,
                 rules: Rules, zero: ZeroPlan, schedule: Schedule, checkpoint_every: int,
                 head_loss: HeadLoss, weight: Callable[[PyTree], jax.Array]) -> None:
        self.mesh, self.rules, self.zero, self.schedule = mesh, rules, zero, schedule
        self.stages, self.virtual = schedule.stages, schedule.virtual_stages
        self._weight = weight
        abstract_layers = abstract_params["layers"]
        abstract_shared = {k: x for k, x in abstract_params.items() if k != "layers"}

        def model_of(shared: PyTree) -> nnx.Module:
            return nnx.merge(graphdef, {**shared, "layers": abstract_layers})

        def positions(x: jax.Array) -> jax.Array:
            return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

        self.fns = StageFns(
            embed=lambda sh, ids: model_of(sh).embed(ids, positions(ids)),
            layers=lambda ch, x: model_of(abstract_shared).run_layers(
                ch, x, positions(x), None, checkpoint_every=checkpoint_every),
            loss=lambda sh, x, ids, labels: head_loss(model_of(sh).head(x), ids, labels),
        )
        grads = zero.grads
        self._kwargs = dict(
            shared_grad_specs=local_specs({k: g for k, g in grads.items() if k != "layers"}),
            layer_grad_specs=local_specs(grads["layers"]),
            act_spec=logical_to_spec(("batch", "seq", "embed"), rules),
        )

    def _local_grads(self) -> tuple[tuple[str, ...], int] | None:
        """``(data axes, n)`` when gradients are replicated over a data group of n > 1
        (ZeRO 0/1): the pipeline then reduces them once per step (``make_pipeline_grads``)."""
        if self.zero.layout.grads:
            return None
        axes = tuple(a for a in self.rules.get("batch", ()) if self.mesh.shape[a] > 1)
        n = int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))
        return (axes, n) if n > 1 else None

    def _split(self, params: PyTree, param_shardings: PyTree) -> tuple[PyTree, PyTree]:
        """(shared params, the layer stack in pipeline order, laid out by stage)."""
        shared = {k: x for k, x in params.items() if k != "layers"}
        layers = to_pipeline_order(params["layers"], self.stages, self.virtual)
        if self.virtual > 1:  # model order at rest; each device's virtual stages contiguous
            layers = jax.lax.with_sharding_constraint(layers, param_shardings["layers"])
        return shared, layers

    def gradients(self) -> Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]:
        """``(params, batch, seed) -> (fp32 grads, summed loss)`` over the micro-batches of
        ``batch`` (``input_ids`` and optionally ``labels``, ``[micro, B, T]``); ``seed`` is
        the cotangent of the summed loss."""
        grads_fn = make_pipeline_grads(self.fns, self.schedule, self.mesh,
                                       local_grads=self._local_grads(), **self._kwargs)
        shardings = self.zero.shardings(self.mesh, "params")
        p, v = self.stages, self.virtual

        def pipeline(params, batch, seed):
            ids_ABT = batch["input_ids"]
            shared, layers = self._split(params, shardings)
            d_shared, d_layers, ce = grads_fn(shared, layers, ids_ABT,
                                              batch.get("labels", ids_ABT), seed)
            return {**d_shared, "layers": from_pipeline_order(d_layers, p, v)}, ce

        return pipeline

    def eval_step(self) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
        """``(params, batch) -> {"loss", "tokens"}`` through the stages, forwards only
        (``forward_schedule``): each stage keeps its own layers, none is gathered."""
        shardings = self.zero.shardings(self.mesh, "params")

        def eval_step(params, batch):
            ids_ABT = batch["input_ids"]
            forward = make_pipeline_grads(
                self.fns, forward_schedule(self.stages, ids_ABT.shape[0], self.virtual),
                self.mesh, forward_only=True, **self._kwargs)
            shared, layers = self._split(params, shardings)
            _, _, ce = forward(shared, layers, ids_ABT, batch.get("labels", ids_ABT),
                               jnp.ones((), jnp.float32))
            n = self._weight(batch)
            return {"loss": ce / jnp.maximum(n, 1.0), "tokens": n}

        return eval_step


__all__ = ["ModelPipeline", "layer_count", "model_pipeline", "pipeline_schedule"]
