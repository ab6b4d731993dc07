"""DeepSpeed's optimizers as optax transformations: FusedAdam, FusedLamb, FusedLion.

Owns the update math of the ds_config optimizer types ``adam``, ``adamw``, ``lamb`` and
``lion``, written to match DeepSpeed's CUDA kernels (the path the DeepSpeed engine takes on
GPU), and ``build_optimizer`` that turns a ds_config ``optimizer`` section into one optax
transformation.

- adam / adamw: ``deepspeed/ops/csrc/adam/multi_tensor_adam.cu``. ``m_hat / (sqrt(v_hat) +
  eps)`` with ``bias_correction`` optional. ``adam_w_mode`` (default True, and always True
  for ``adamw``, as in ``DeepSpeedEngine._configure_basic_optimizer``) decays decoupled,
  ``p -= lr * wd * p``; otherwise L2, ``g += wd * p`` before the moments. optax.adamw would
  match only the default case, not ``bias_correction=False``, L2 mode or a beta1 schedule.
- lamb: ``deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu``. Differs from optax.lamb in
  three ways, hence its own transformation: the trust ratio ``||p|| / ||u||`` is clamped to
  ``[min_coeff, max_coeff]`` (and is 1 when either norm is 0); ``u = m / (sqrt(v) + eps) +
  wd * p`` uses the *uncorrected* moments; bias correction scales the whole step instead,
  ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * coeff * u``. ``eps_inside_sqrt`` selects
  ``sqrt(v + eps)``.
- lion: ``deepspeed/ops/csrc/lion/multi_tensor_lion.cu``. ``c = b1 m + (1 - b1) g``;
  ``p = p (1 - lr wd) - lr s`` with ``s = +1 if c > 0 else -1``; ``m = b2 m + (1 - b2) g``.
  The kernel has no zero case: c == 0 (zero grad and zero momentum, e.g. an unused
  embedding row) moves p by +lr. optax.lion uses sign(0) = 0 there, so it does not match.
  (DeepSpeed's CPU Lion, used under ZeRO-Offload, takes the sign bit of c instead, so +0
  gives -lr; jds follows the GPU kernel.)

The weight decay hits every parameter (DeepSpeed's optimizers see one param group).
The learning rate is ``optax.scale_by_learning_rate``, evaluated on the transformation's
own count of updates: steps the engine skips (overflow) do not call ``update`` and do not
advance it, as DeepSpeed does not step its scheduler then. States are NamedTuples of a
scalar count and param-shaped moments, so they shard like the params.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jds.optim.schedules import ScheduleWithBetas

PyTree = Any
Beta = float | Callable[[jax.Array], jax.Array]

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "lamb", "lion")

# Keys each DeepSpeed optimizer takes (the engine passes them as **kwargs), plus the keys the
# engine pops before constructing it. Keys that change no math are accepted and ignored.
_KEYS: dict[str, tuple[str, ...]] = {
    "adam": (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "bias_correction",
        "adam_w_mode",
        "amsgrad",
        "set_grad_none",
        "torch_adam",
        "foreach",
        "fp32_optimizer_states",
    ),
    "lamb": (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "bias_correction",
        "eps_inside_sqrt",
        "max_coeff",
        "min_coeff",
        "amsgrad",
    ),
    "lion": ("lr", "betas", "weight_decay", "set_grad_none", "fp32_optimizer_states"),
}
_KEYS["adamw"] = _KEYS["adam"]


class DSAdamState(NamedTuple):
    """FusedAdam state: applied-step count and the two moments (param-shaped)."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


class DSLambState(NamedTuple):
    """FusedLamb state: applied-step count and the two moments (param-shaped)."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


class DSLionState(NamedTuple):
    """FusedLion state: applied-step count and the momentum (param-shaped)."""

    count: jax.Array
    mu: PyTree


def _beta_at(beta: Beta, count: jax.Array) -> jax.Array:
    return jnp.asarray(beta(count) if callable(beta) else beta, jnp.float32)


def _bias_corrections(b1: jax.Array, b2: jax.Array, step: jax.Array) -> tuple[jax.Array, ...]:
    # The kernels raise the *current* betas to the step count, so a cycled beta1 re-weights
    # the whole history; this keeps that.
    t = step.astype(jnp.float32)
    return 1.0 - b1**t, 1.0 - b2**t


def scale_by_ds_adam(
    b1: Beta = 0.9, b2: Beta = 0.999, eps: float = 1e-8, bias_correction: bool = True
) -> optax.GradientTransformation:
    """The Adam direction of DeepSpeed's FusedAdam kernel (no lr, no weight decay).

    Args:
      b1, b2: betas, floats or schedules over the applied-step count.
      eps: added to ``sqrt(v_hat)``.
      bias_correction: divide the moments by ``1 - beta^t``.

    Returns:
      A transformation mapping grads to ``m_hat / (sqrt(v_hat) + eps)``.
    """

    def init(params: PyTree) -> DSAdamState:
        zeros = optax.tree.zeros_like(params)
        return DSAdamState(jnp.zeros([], jnp.int32), zeros, optax.tree.zeros_like(params))

    def update(
        grads: PyTree, state: DSAdamState, params: PyTree | None = None
    ) -> tuple[PyTree, DSAdamState]:
        del params
        beta1, beta2 = _beta_at(b1, state.count), _beta_at(b2, state.count)
        step = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, grads)
        bc1, bc2 = _bias_corrections(beta1, beta2, step) if bias_correction else (1.0, 1.0)
        direction = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu)
        return direction, DSAdamState(step, mu, nu)

    return optax.GradientTransformation(init, update)


def scale_by_ds_lamb(
    b1: Beta = 0.9,
    b2: Beta = 0.999,
    eps: float = 1e-8,
    eps_inside_sqrt: bool = False,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
) -> optax.GradientTransformation:
    """The step of DeepSpeed's FusedLamb kernel, without the lr (see module docstring).

    Args:
      b1, b2: betas, floats or schedules over the applied-step count.
      eps: added to ``sqrt(v)`` (or to ``v`` under the root with eps_inside_sqrt).
      eps_inside_sqrt: ``sqrt(v + eps)`` instead of ``sqrt(v) + eps``.
      weight_decay: added to the Adam direction as ``wd * p``, inside the trust ratio.
      bias_correction: scale the step by ``sqrt(1 - b2^t) / (1 - b1^t)``.
      max_coeff, min_coeff: clamp of the per-parameter trust ratio.

    Returns:
      A transformation mapping grads to ``step_scale * coeff * u``; ``update`` needs params.
    """

    def init(params: PyTree) -> DSLambState:
        zeros = optax.tree.zeros_like(params)
        return DSLambState(jnp.zeros([], jnp.int32), zeros, optax.tree.zeros_like(params))

    def update(
        grads: PyTree, state: DSLambState, params: PyTree | None = None
    ) -> tuple[PyTree, DSLambState]:
        if params is None:
            raise ValueError("lamb's trust ratio needs params: call update(grads, state, params)")
        beta1, beta2 = _beta_at(b1, state.count), _beta_at(b2, state.count)
        step = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, grads)
        if bias_correction:
            bc1, bc2 = _bias_corrections(beta1, beta2, step)
            step_scale = jnp.sqrt(bc2) / bc1
        else:
            step_scale = jnp.float32(1.0)

        def one(m: jax.Array, v: jax.Array, p: jax.Array) -> jax.Array:
            denom = jnp.sqrt(v + eps) if eps_inside_sqrt else jnp.sqrt(v) + eps
            u = m / denom + weight_decay * p
            p_norm, u_norm = jnp.sqrt(jnp.sum(p * p)), jnp.sqrt(jnp.sum(u * u))
            # Clamp max first, then min, as the kernel does (min wins if min > max).
            ratio = jnp.maximum(jnp.minimum(p_norm / u_norm, max_coeff), min_coeff)
            coeff = jnp.where((p_norm != 0) & (u_norm != 0), ratio, 1.0)
            return step_scale * coeff * u

        return jax.tree.map(one, mu, nu, params), DSLambState(step, mu, nu)

    return optax.GradientTransformation(init, update)


def scale_by_ds_lion(b1: Beta = 0.9, b2: Beta = 0.999) -> optax.GradientTransformation:
    """The sign direction of DeepSpeed's FusedLion kernel (no lr, no weight decay).

    Args:
      b1: interpolation of momentum and grad for the sign, float or schedule.
      b2: momentum decay, float or schedule.

    Returns:
      A transformation mapping grads to ``+1 where c > 0 else -1`` (c == 0 gives -1, as in
      the CUDA kernel).
    """

    def init(params: PyTree) -> DSLionState:
        return DSLionState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update(
        grads: PyTree, state: DSLionState, params: PyTree | None = None
    ) -> tuple[PyTree, DSLionState]:
        del params
        beta1, beta2 = _beta_at(b1, state.count), _beta_at(b2, state.count)

        def direction(m: jax.Array, g: jax.Array) -> jax.Array:
            c = beta1 * m + (1 - beta1) * g
            return jnp.where(c > 0, 1.0, -1.0).astype(g.dtype)

        signs = jax.tree.map(direction, state.mu, grads)
        mu = jax.tree.map(lambda m, g: beta2 * m + (1 - beta2) * g, state.mu, grads)
        return signs, DSLionState(optax.safe_increment(state.count), mu)

    return optax.GradientTransformation(init, update)


def resolve_betas(params: Mapping[str, Any], learning_rate: Any) -> tuple[Beta, Beta]:
    """The (beta1, beta2) an optimizer built from ``params`` and ``learning_rate`` runs with.

    Args:
      params: optimizer params (DeepSpeed keys); ``betas`` defaults to (0.9, 0.999).
      learning_rate: a float, a schedule, or a ``ScheduleWithBetas`` (OneCycle momentum).

    Returns:
      Floats, or for a ``ScheduleWithBetas`` schedules over the applied-step count: its
      beta1 and 0.99, except step 0 under ``last_batch_iteration >= 0``, which keeps the
      configured betas as DeepSpeed does.

    Raises:
      ValueError: if betas is not two numbers.
    """
    betas = params.get("betas", (0.9, 0.999))
    if len(betas) != 2:
        raise ValueError(f"optimizer.params.betas must be two numbers, got {betas!r}")
    cfg_b1, cfg_b2 = float(betas[0]), float(betas[1])
    if not isinstance(learning_rate, ScheduleWithBetas):
        return cfg_b1, cfg_b2
    sched = learning_rate
    keep_first = sched.optimizer_betas_first

    def beta1(count: jax.Array) -> jax.Array:
        return jnp.where((count == 0) & keep_first, cfg_b1, sched.beta1(count))

    def beta2(count: jax.Array) -> jax.Array:
        return jnp.where((count == 0) & keep_first, cfg_b2, sched.beta2)

    return beta1, beta2


def _check_keys(opt_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
    given = {k: v for k, v in dict(params).items() if v is not None}
    if "max_grad_norm" in given:
        # DeepSpeedEngine._configure_basic_optimizer raises on this key for every optimizer.
        raise ValueError(
            "optimizer.params.max_grad_norm is not supported (DeepSpeed rejects it too); "
            "use the top-level 'gradient_clipping' key"
        )
    allowed = _KEYS[opt_type]
    for key in given:
        if key not in allowed:
            raise ValueError(
                f"optimizer.params.{key} is not a parameter of DeepSpeed's {opt_type}, "
                f"which takes {sorted(allowed)}"
            )
    if given.get("amsgrad", False):
        raise ValueError("optimizer.params.amsgrad=True: DeepSpeed's Fused optimizers refuse it")
    return given


def build_optimizer(
    opt_type: str,
    params: Mapping[str, Any],
    learning_rate: optax.Schedule | float,
) -> optax.GradientTransformation:
    """The optax transformation of a ds_config ``optimizer`` section.

    Keys whose value is None count as absent. ``lr`` is ignored: ``learning_rate`` carries
    it. A ``ScheduleWithBetas`` (OneCycle with cycle_momentum) also drives the betas.

    Args:
      opt_type: "adam", "adamw", "lamb" or "lion" (case-insensitive, as in DeepSpeed).
      params: the optimizer's params, DeepSpeed keys and defaults.
      learning_rate: a float or a schedule over the optimizer's applied-step count.

    Returns:
      A jittable transformation; ``update`` needs params (weight decay, lamb's trust ratio).

    Raises:
      ValueError: on an unknown type or key, max_grad_norm, or amsgrad=True.
    """
    name = opt_type.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer type {opt_type!r}; jds supports {list(OPTIMIZERS)}")
    given = _check_keys(name, params)
    b1, b2 = resolve_betas(given, learning_rate)
    wd = float(given.get("weight_decay", 0.0))
    lr = optax.scale_by_learning_rate(learning_rate)
    bias_correction = bool(given.get("bias_correction", True))
    eps = float(given.get("eps", 1e-8))

    if name in ("adam", "adamw"):
        adam_w_mode = name == "adamw" or bool(given.get("adam_w_mode", True))
        decay = [optax.add_decayed_weights(wd)] if wd != 0.0 else []
        direction = scale_by_ds_adam(b1, b2, eps, bias_correction)
        if adam_w_mode:
            return optax.chain(direction, *decay, lr)
        return optax.chain(*decay, direction, lr)
    if name == "lamb":
        direction = scale_by_ds_lamb(
            b1,
            b2,
            eps=eps,
            eps_inside_sqrt=bool(given.get("eps_inside_sqrt", False)),
            weight_decay=wd,
            bias_correction=bias_correction,
            max_coeff=float(given.get("max_coeff", 10.0)),
            min_coeff=float(given.get("min_coeff", 0.01)),
        )
        return optax.chain(direction, lr)
    decay = [optax.add_decayed_weights(wd)] if wd != 0.0 else []
    return optax.chain(scale_by_ds_lion(b1, b2), *decay, lr)
