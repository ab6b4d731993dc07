"""Pipeline parallelism inside one SPMD program: GPipe, 1F1B and interleaved schedules.

The layer stack is split over the mesh's ``stage`` axis (the rules map ``layers`` to
``stage``). The schedule is explicit: a ``shard_map`` that is manual over ``stage`` only
runs a ``lax.scan`` over *ticks*; at every tick each stage does what the schedule's table
says for it — the forward of one micro-batch through one of its layer chunks, the backward
(a ``jax.vjp``) of one, or nothing — and then two ``ppermute`` s move activations one stage
forward and cotangents one stage back. The other mesh axes stay automatic inside the map,
so ZeRO 0-3 (each stage's states sharded over its data group, ZeRO-3 weights gathered per
layer) and tensor parallelism compose with every schedule unchanged. DeepSpeed forbids its
pipeline with ZeRO-2/3 and MaxText has no 1F1B; here the three are one executor driven by
three tables.

Schedules (``pipeline.schedule``), with ``p`` stages, ``m`` micro-batches
(``gradient_accumulation_steps``, as in DeepSpeed) and ``v`` virtual stages per device:

- ``gpipe``: every forward, then every backward. Each stage holds all ``m`` micro-batches'
  inputs at the turn.
- ``1f1b``: ``p - s - 1`` warm-up forwards on stage ``s``, then one forward and one
  backward alternately, then the remaining backwards. In-flight micro-batches per stage are
  bounded by ``p``, not ``m``.
- ``interleaved`` (Megatron's): each device holds ``v`` chunks of ``L / (p v)`` layers —
  device ``s`` runs virtual stages ``s, s + p, ...`` — so the fill and drain cost ``1/v``
  as much; ``m`` must be a multiple of ``p``.

Each table comes from one list scheduler (``build_schedule``): every device has its
program order and runs its next action as soon as its inputs exist, so the tables (and the
bubble ``jds explain --pipeline`` prints) are what the executor runs, tick for tick.

Design choices, and why:

- **Stage-granular recomputation.** A stage keeps only the *input* of each in-flight
  micro-batch; its backward re-runs the stage's forward under ``jax.vjp``. Keeping the
  ``vjp`` residuals instead would store a copy of every weight the residuals close over
  (they are indistinguishable from activations once traced). The price is one extra
  forward per stage and micro-batch (DeepSpeed pays it too with activation
  checkpointing); the saved-activation buffer is exactly "in-flight micro-batches x one
  activation", the quantity the schedules differ in. Inside that recomputation the model's
  ``remat`` mode applies, and ``pipeline.activation_checkpoint_interval = k`` checkpoints
  every ``k`` layers (DeepSpeed's meaning).
- **Embeddings and the LM head are replicated over ``stage``** (still ZeRO-sharded over
  the data group) and used only by the first and last virtual stage; their gradients are
  summed over ``stage`` once per step, as DeepSpeed all-reduces tied embeddings between
  its first and last stage. Sharding them over ``stage`` would save ``(p-1)/p`` of their
  bytes but put a collective of every stage inside the first and last stage's work.
- **Interleaved weights move once per step.** The state keeps the layer stack in model
  order (checkpoints, conversion and restore onto other layouts stay layout-free), so for
  ``v > 1`` the step permutes the stack into pipeline order (an all-to-all over ``stage``)
  and the gradients back. Keeping it permuted at rest would save that transfer.
- Partitioning: the layer stacks are homogeneous, so DeepSpeed's ``partition_method``
  ``"parameters"`` and ``"uniform"`` give the same split (``L / p`` layers per stage);
  ``"type:..."`` has no meaning here and is refused. Layer counts that do not divide are
  refused with the numbers to change.

Data-parallel gradient reduction: under ZeRO 0/1 (gradients replicated) each backward
keeps per-data-shard weight gradients (``vmap`` with ``spmd_axis_name``, as the plain step's
``_local_grads``) and they are all-reduced once after the schedule, not once per
micro-batch; under ZeRO-2/3 each backward's gradients are reduce-scattered into the
sharded accumulator, as ZeRO-2/3 do. Known cost: every tick sends one activation each
way, also when a stage idles.
"""

from jds.partitioning.pipeline.assembly import (
    ModelPipeline,
    layer_count,
    model_pipeline,
    pipeline_schedule,
)
from jds.partitioning.pipeline.executor import (
    StageFns,
    from_pipeline_order,
    local_specs,
    make_pipeline_grads,
    to_pipeline_order,
)
from jds.partitioning.pipeline.schedules import (
    SCHEDULES,
    Action,
    Schedule,
    TickTables,
    build_schedule,
    check_layers,
    check_schedule_args,
    forward_schedule,
    tick_tables,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "ModelPipeline",
    "Schedule",
    "StageFns",
    "TickTables",
    "build_schedule",
    "check_layers",
    "check_schedule_args",
    "forward_schedule",
    "from_pipeline_order",
    "local_specs",
    "layer_count",
    "make_pipeline_grads",
    "model_pipeline",
    "pipeline_schedule",
    "tick_tables",
    "to_pipeline_order",
]
