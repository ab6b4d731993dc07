"""Mixed-precision policies and DeepSpeed's dynamic loss scaler, as pure JAX functions.

This module owns three things:

- ``Policy``: which dtype the weights are kept in (always fp32 master weights), which dtype
  the forward/backward runs in (fp32, bf16 or fp16) and which dtype outputs are returned in.
- ``cast_tree``: casting the floating leaves of a pytree (integer leaves are left alone).
- The loss scaler: ``LossScaleConfig`` (static choices, read from DeepSpeed's ``fp16``
  section), ``LossScaleState`` (a pytree of scalars living in the train state) and
  ``update_loss_scale``, a jittable re-statement of DeepSpeed's
  ``DynamicLossScaler.update_scale`` (``deepspeed/runtime/fp16/loss_scaler.py``), the scaler
  DeepSpeed's ZeRO optimizers use. It is tested step for step against DeepSpeed's class.

How the train step uses it: scale the loss by ``state.scale``, take gradients, divide them
by the scale, check ``all_finite``; when not finite skip the update (params and optimizer
state unchanged); call ``update_loss_scale(state, overflow, cfg)`` every step.

Differences from DeepSpeed, on purpose:

- DeepSpeed raises when an overflow arrives with the scale already at ``min_scale``
  (``raise_error_at_min_scale``). A jitted step cannot raise, so the scale stays at
  ``min_scale`` (DeepSpeed's ``raise_error_at_min_scale=False`` behaviour) and
  ``LossScaleState.min_scale_overflows`` counts those events; the host-side engine reads it
  and raises when ``LossScaleConfig.raise_error_at_min_scale`` is set.
- The scale is float32 (DeepSpeed: a Python float). Growth stops at 2**127, the largest
  power of two float32 holds: an infinite scale could never come back down (inf / 2 = inf).
  Every scale below that is a power of two times the initial scale and is exact in float32.
- DeepSpeed's stage-0 fp16 ``FP16_Optimizer`` ignores ``hysteresis``; its ZeRO optimizers
  honour it. jds always follows ``DynamicLossScaler`` (hysteresis honoured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any

# Largest power of two a float32 holds; growth is clamped here (see module docstring).
MAX_SCALE = 2.0**127


@dataclass(frozen=True)
class Policy:
    """Dtypes of one precision mode.

    Attributes:
      param_dtype: dtype of the master weights and optimizer state (always float32).
      compute_dtype: dtype the forward and backward pass run in.
      output_dtype: dtype of logits handed to the loss (float32: the softmax and
        cross-entropy are computed in full precision in every mode).
    """

    param_dtype: Any
    compute_dtype: Any
    output_dtype: Any

    @property
    def mixed(self) -> bool:
        """True when compute runs in a lower precision than the master weights."""
        return jnp.dtype(self.compute_dtype) != jnp.dtype(self.param_dtype)


_POLICIES = {
    "fp32": Policy(jnp.float32, jnp.float32, jnp.float32),
    "bf16": Policy(jnp.float32, jnp.bfloat16, jnp.float32),
    "fp16": Policy(jnp.float32, jnp.float16, jnp.float32),
}


def policy_for(precision: Literal["fp32", "bf16", "fp16"]) -> Policy:
    """The ``Policy`` of a precision mode.

    Raises:
      ValueError: ``precision`` is not one of ``fp32``, ``bf16``, ``fp16``.
    """
    try:
        return _POLICIES[precision]
    except KeyError:
        raise ValueError(
            f"precision={precision!r} is not one of {sorted(_POLICIES)}; set fp16.enabled or "
            "bf16.enabled in the config, or neither for fp32"
        ) from None


def cast_tree(tree: PyTree, dtype: Any) -> PyTree:
    """Cast every floating-point leaf of ``tree`` to ``dtype``; other leaves are kept.

    Leaves may be ``jax.Array``s or ``jax.ShapeDtypeStruct``s (abstract trees).
    """

    def cast(x: Any) -> Any:
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


@dataclass(frozen=True)
class LossScaleConfig:
    """Static loss-scaling choices (DeepSpeed ``fp16`` section).

    Attributes:
      dynamic: adapt the scale (``fp16.loss_scale == 0``); else the scale is fixed.
      init_scale: initial (or static) scale; dynamic: ``2**fp16.initial_scale_power``.
      scale_window: steps without overflow, counted from the last overflow, before the scale
        grows (``fp16.loss_scale_window``).
      hysteresis: overflows tolerated before the scale shrinks (``fp16.hysteresis``,
        DeepSpeed's ``delayed_shift``).
      consecutive_hysteresis: refill the hysteresis on every good step instead of only when
        the scale grows (``fp16.consecutive_hysteresis``).
      min_scale: floor of the scale (``fp16.min_loss_scale``).
      scale_factor: multiply/divide the scale by this (DeepSpeed: 2).
      raise_error_at_min_scale: DeepSpeed raises when an overflow hits the floor; jds counts
        it in ``LossScaleState.min_scale_overflows`` for the engine to raise on the host.
    """

    dynamic: bool = True
    init_scale: float = 2.0**16
    scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    scale_factor: float = 2.0
    raise_error_at_min_scale: bool = True

    def __post_init__(self) -> None:
        if self.init_scale <= 0:
            raise ValueError(f"loss scale must be > 0, got {self.init_scale} (fp16.loss_scale)")
        if self.dynamic and self.scale_window <= 0:
            raise ValueError(
                f"fp16.loss_scale_window must be > 0 with dynamic scaling, got {self.scale_window}"
            )
        if self.dynamic and self.min_scale <= 0:
            raise ValueError(
                f"fp16.min_loss_scale must be > 0 with dynamic scaling, got {self.min_scale}"
            )

    @classmethod
    def from_fp16_config(cls, fp16_cfg: Any) -> LossScaleConfig:
        """Build from an object with DeepSpeed's ``fp16`` keys as attributes.

        Reads ``loss_scale`` (0 = dynamic, else the static scale), ``initial_scale_power``,
        ``loss_scale_window``, ``hysteresis``, ``consecutive_hysteresis``, ``min_loss_scale``.
        """
        static = float(fp16_cfg.loss_scale)
        dynamic = static == 0.0
        return cls(
            dynamic=dynamic,
            init_scale=2.0 ** int(fp16_cfg.initial_scale_power) if dynamic else static,
            scale_window=int(fp16_cfg.loss_scale_window),
            hysteresis=int(fp16_cfg.hysteresis),
            consecutive_hysteresis=bool(fp16_cfg.consecutive_hysteresis),
            min_scale=float(fp16_cfg.min_loss_scale),
        )


@struct.dataclass
class LossScaleState:
    """DeepSpeed ``DynamicLossScaler`` state as jnp scalars.

    Attributes:
      scale: current loss scale (float32; ``cur_scale``).
      cur_iter: number of ``update_loss_scale`` calls so far (int32; ``cur_iter``).
      last_overflow_iter: ``cur_iter`` of the last overflow, -1 before any (int32).
      hysteresis: overflows still tolerated before shrinking (int32; ``cur_hysteresis``).
      min_scale_overflows: overflows that arrived with the scale at its floor and the
        hysteresis spent — where DeepSpeed raises (int32).
    """

    scale: jax.Array
    cur_iter: jax.Array
    last_overflow_iter: jax.Array
    hysteresis: jax.Array
    min_scale_overflows: jax.Array


def init_loss_scale(cfg: LossScaleConfig | None) -> LossScaleState:
    """Initial scaler state; ``None`` (fp32/bf16) gives scale 1 that never changes."""
    init, hysteresis = (1.0, 1) if cfg is None else (cfg.init_scale, cfg.hysteresis)
    return LossScaleState(
        scale=jnp.asarray(init, jnp.float32),
        cur_iter=jnp.zeros((), jnp.int32),
        last_overflow_iter=jnp.full((), -1, jnp.int32),
        hysteresis=jnp.asarray(hysteresis, jnp.int32),
        min_scale_overflows=jnp.zeros((), jnp.int32),
    )


def all_finite(tree: PyTree) -> jax.Array:
    """Bool scalar: every element of every array leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def update_loss_scale(
    state: LossScaleState, overflow: jax.Array, cfg: LossScaleConfig | None
) -> LossScaleState:
    """One step of DeepSpeed's ``DynamicLossScaler.update_scale``; pure and jittable.

    On overflow: if the hysteresis is spent (``hysteresis`` config is 1 or the counter is 1)
    the scale is divided by ``scale_factor`` down to ``min_scale``, else the counter drops by
    one; the overflow iteration is remembered. On a good step: with consecutive hysteresis
    the counter is refilled; when the steps since the last overflow reach a positive
    multiple of ``scale_window`` the scale is multiplied by ``scale_factor`` (and, without
    consecutive hysteresis, the counter refilled). A static scale (or ``cfg=None``) never
    changes.

    Args:
      state: the scaler state.
      overflow: bool scalar, True when this step's gradients were not finite.
      cfg: the loss-scaling config; None for fp32/bf16.

    Returns:
      The next scaler state.
    """
    if cfg is None or not cfg.dynamic:
        return state
    overflow = jnp.asarray(overflow, jnp.bool_)
    scale, hyst = state.scale, state.hysteresis
    factor = jnp.float32(cfg.scale_factor)
    min_scale = jnp.float32(cfg.min_scale)

    # Overflow branch.
    shrink = (cfg.hysteresis == 1) | (hyst == 1)
    at_floor = shrink & (scale == min_scale)
    scale_of = jnp.where(shrink, jnp.maximum(scale / factor, min_scale), scale)
    hyst_of = jnp.where(shrink, hyst, hyst - 1)

    # Good-step branch; DeepSpeed measures the window from the last overflow.
    stable = state.cur_iter - state.last_overflow_iter - 1
    grow = (stable > 0) & (stable % cfg.scale_window == 0)
    scale_ok = jnp.where(grow, jnp.minimum(scale * factor, jnp.float32(MAX_SCALE)), scale)
    if cfg.consecutive_hysteresis:
        hyst_ok = jnp.full_like(hyst, cfg.hysteresis)
    else:
        hyst_ok = jnp.where(grow, jnp.int32(cfg.hysteresis), hyst)

    return LossScaleState(
        scale=jnp.where(overflow, scale_of, scale_ok),
        cur_iter=state.cur_iter + 1,
        last_overflow_iter=jnp.where(overflow, state.cur_iter, state.last_overflow_iter),
        hysteresis=jnp.where(overflow, hyst_of, hyst_ok),
        min_scale_overflows=state.min_scale_overflows + (overflow & at_floor).astype(jnp.int32),
    )
