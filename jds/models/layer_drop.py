"""Progressive Layer Dropping (PLD; Zhang & He, 2020), DeepSpeed's ``progressive_layer_drop``.

In training, layer ``l`` (0-based) of a stacked decoder with ``L`` layers is kept with
probability ``p_l = 1 - (l + 1) / L * (1 - theta_t)`` (deeper layers are dropped more),
where ``theta_t = (1 - theta) * exp(-gamma * t) + theta`` decays from 1 towards ``theta``
with the global step. A dropped layer is the identity; a kept one scales its attention and
MLP branches by ``1 / p_l`` before they join the residual stream (pre-LN form, as
DeepSpeed's PLD BERT layer), so the expected output is unchanged. Evaluation runs every
layer unscaled.

Schedule, step for step as DeepSpeed's engine: ``ProgressiveLayerDrop.current_theta``
starts at 1.0 and ``update_state(global_steps)`` runs at the end of each optimizer step
before the count advances, so the forward passes of step ``t`` use
``theta(max(t - 1, 0))`` (``pld_theta``).

A skipped layer costs no compute: the layer scan runs each layer under ``lax.cond`` on its
draw (``jds.models.layers.scan_layers``), so at keep probability 0.5 about half the
layers' FLOPs are spent, forward and backward. The draws come from the model's own PRNG
stream (``LayerDrop.rngs``, model state: a new draw per micro-batch, checkpointed with the
run); the step comes from the train step (``training_step``), which is why PLD acts only
inside the engine's train step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PLD_KEEP, BRANCH_SCALE = "_pld_keep", "_branch_scale"  # per-layer entries of the scan

_STEP: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jds_train_step",
                                                                        default=None)


@contextlib.contextmanager
def training_step(step: jax.Array) -> Iterator[None]:
    """Inside, models read the optimizer step being computed (the train step sets it)."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def pld_theta(step: jax.Array | int, theta: float, gamma: float) -> jax.Array:
    """The keep probability DeepSpeed's schedule gives the forward passes of ``step``."""
    t = jnp.maximum(jnp.asarray(step, jnp.float32) - 1.0, 0.0)
    return (1.0 - theta) * jnp.exp(-gamma * t) + theta


def keep_probabilities(theta_t: jax.Array, n_layers: int) -> jax.Array:
    """``p_l = 1 - (l + 1) / L * (1 - theta_t)`` for ``l = 0..L-1``."""
    depth = (np.arange(n_layers, dtype=np.float32) + 1.0) / n_layers
    return 1.0 - jnp.asarray(depth) * (1.0 - theta_t)


class LayerDrop(nnx.Module):
    """PLD's settings and PRNG stream on a stacked decoder (``model.layer_drop``).

    ``deterministic`` (set by ``model.eval()``) turns it off, as for ``nnx.Dropout``.
    """

    def __init__(self, theta: float, gamma: float, seed: int) -> None:
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"progressive_layer_drop.theta must lie in (0, 1]; got {theta}")
        if gamma < 0:
            raise ValueError(f"progressive_layer_drop.gamma must be >= 0; got {gamma}")
        self.theta = float(theta)
        self.gamma = float(gamma)
        self.deterministic = False
        self.rngs = nnx.Rngs(layer_drop=seed)

    def draws(self, params_L: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """``params_L`` with each layer's keep draw and branch scale added, in training
        inside the engine's train step; unchanged otherwise."""
        step = _STEP.get()
        if self.deterministic or step is None:
            return params_L
        n = int(jax.tree.leaves(params_L)[0].shape[0])
        p_L = keep_probabilities(pld_theta(step, self.theta, self.gamma), n)
        keep_L = jax.random.uniform(self.rngs.layer_drop(), (n,)) < p_L
        return {**params_L, PLD_KEEP: keep_L, BRANCH_SCALE: 1.0 / p_L}


def with_layer_drop(params_L: dict[str, jax.Array], module: object) -> dict[str, jax.Array]:
    """``params_L`` with PLD's draws when ``module`` (a stacked decoder) has ``layer_drop``."""
    drop = getattr(module, "layer_drop", None)
    return drop.draws(params_L) if isinstance(drop, LayerDrop) else params_L


__all__ = ["BRANCH_SCALE", "LayerDrop", "PLD_KEEP", "keep_probabilities", "pld_theta",
           "training_step", "with_layer_drop"]
