"""The train state: every persistent array of a training run, as one pytree.

``TrainState`` holds pure arrays only (the model's graph definition stays outside, in the
engine), so it can be jitted, sharded, donated and checkpointed as it is.

- ``params``: the compute copy of the weights, in the policy's compute dtype (bf16/fp16), or
  the fp32 weights themselves when training in fp32.
- ``master``: fp32 master weights under mixed precision; ``None`` in fp32 (no duplicate).
- ``opt_state``: the optax state, over the fp32 weights.
- ``loss_scale``: DeepSpeed's dynamic loss scaler state (scale 1, inert, outside fp16).
- ``step``: optimizer steps taken, skipped ones included (DeepSpeed's ``global_steps``).
- ``skipped``: steps skipped for fp16 overflow; ``step - skipped`` is the schedule's count.
- ``rng``: raw ``uint32`` key data for stochastic layers (dropout, sampling in eval).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from jds.precision import LossScaleState

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

    @property
    def fp32_params(self) -> PyTree:
        """The fp32 weights: ``master`` under mixed precision, else ``params``."""
        return self.params if self.master is None else self.master

    @property
    def applied_steps(self) -> jax.Array:
        """Optimizer updates actually applied (the LR schedule's count)."""
        return self.step - self.skipped

