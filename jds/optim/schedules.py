"""DeepSpeed's learning-rate schedules as jittable optax schedules.

Owns ``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` (with its momentum
cycle) and ``LRRangeTest`` from ``deepspeed/runtime/lr_schedules.py``, with DeepSpeed's
parameter names and defaults, and ``build_schedule`` that turns a ds_config ``scheduler``
section into one schedule.

What ``schedule(k)`` means. DeepSpeed's schedulers are objects that write an lr into the
optimizer's param groups: once in ``__init__`` (only when ``last_batch_iteration == -1``) and
then in ``step()``, which the engine calls after every *applied* optimizer step
(``DeepSpeedEngine._take_model_step``; overflow-skipped steps do not step the scheduler).
``step()`` increments ``last_batch_iteration`` and evaluates ``get_lr()`` at it. So with
``L0 = last_batch_iteration`` as configured, the k-th applied optimizer step (k = 0, 1, ...)
runs with

- k == 0: the value ``__init__`` wrote (``L0 == -1``), or the optimizer's own lr, which
  ``__init__`` left in place (``L0 >= 0``);
- k >= 1: ``get_lr()`` evaluated at ``last_batch_iteration = L0 + k``.

``schedule(k)`` returns exactly that lr, where k is the optimizer's own count of applied
steps (``optax.scale_by_learning_rate`` keeps that count). DeepSpeed's quirks follow from it
and are kept: WarmupLR/WarmupDecayLR run ``warmup_min_lr`` on steps 0 and 1, WarmupCosineLR
runs lr 0 on step 0, and OneCycle's momentum starts at ``cycle_min_mom`` on step 0 although
its formula gives ``cycle_max_mom`` there.

Precision. DeepSpeed computes in Python doubles; these schedules compute in float32 and
are arranged to stay within ~1e-7 relative of it: integer arithmetic where DeepSpeed's
arithmetic is integral (cycle positions, stairs), and the cosine half-wave written as
``cos^2``/``sin^2`` of half the angle so the tail of WarmupCosineLR does not lose digits to
cancellation in ``1 + cos(pi * p)``.

Deviations, both deliberate: an unknown ``warmup_type`` raises (DeepSpeed warns and uses
``log``), and OneCycle's step sizes must be whole numbers (DeepSpeed accepts fractional ones).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

_WARMUP_TYPES = ("log", "linear")


@dataclasses.dataclass(frozen=True)
class ScheduleWithBetas:
    """An lr schedule that also sets the optimizer's betas, as DS OneCycle does.

    DeepSpeed's OneCycle with ``cycle_momentum=True`` writes ``betas = (momentum, 0.99)`` into
    the optimizer's param groups next to the lr, so beta2 becomes 0.99 whatever the
    optimizer was configured with. ``build_optimizer`` recognises this type and drives the
    optimizer's betas from it; called as a function it is the lr schedule.

    Attributes:
      lr: the learning-rate schedule.
      beta1: the beta1 (momentum) schedule, over the same step count.
      beta2: the beta2 DeepSpeed writes alongside (0.99).
      optimizer_betas_first: True when ``last_batch_iteration >= 0``: DeepSpeed's
        ``__init__`` then leaves the optimizer's own betas in place for step 0.
    """

    lr: optax.Schedule
    beta1: optax.Schedule
    beta2: float
    optimizer_betas_first: bool

    def __call__(self, count: jax.Array | int) -> jax.Array:
        return self.lr(count)


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    # DeepSpeed checks isinstance(..., int) for these keys, so 100.0 is an error there too.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_last_batch_iteration(last_batch_iteration: int, base_lr: float | None) -> None:
    _check_int("last_batch_iteration", last_batch_iteration, minimum=-1)
    if last_batch_iteration >= 0 and base_lr is None:
        raise ValueError(
            "last_batch_iteration >= 0 needs base_lr: DeepSpeed leaves the optimizer's own lr "
            "in place for the first step after such a start; pass base_lr=<optimizer lr>"
        )


def _ds_stepped(
    value_at: Callable[[jax.Array], jax.Array],
    init_value: float,
    last_batch_iteration: int,
    base_lr: float | None,
) -> optax.Schedule:
    """Turns a DS ``get_lr()`` at an iteration into the lr of each applied optimizer step.

    Args:
      value_at: DeepSpeed's ``get_lr()`` for ``last_batch_iteration = it`` (it >= 0, int32).
      init_value: what DeepSpeed's ``__init__`` writes when ``last_batch_iteration == -1``.
      last_batch_iteration: DeepSpeed's ``last_batch_iteration`` argument (L0).
      base_lr: the optimizer's lr, used for step 0 when ``L0 >= 0``.

    Returns:
      ``schedule(k)``: the lr of the k-th applied optimizer step (see module docstring).
    """
    _check_last_batch_iteration(last_batch_iteration, base_lr)
    first = init_value if last_batch_iteration == -1 else base_lr

    def schedule(count: jax.Array | int) -> jax.Array:
        k = jnp.asarray(count, jnp.int32)
        # Clamped so the discarded k == 0 branch never sees a negative iteration (log(0)).
        it = jnp.maximum(k + last_batch_iteration, 0)
        return jnp.where(k == 0, jnp.float32(first), value_at(it).astype(jnp.float32))

    return schedule


def _check_warmup(warmup_num_steps: int, warmup_type: str) -> int:
    """Validates the warmup keys as DeepSpeed does; returns its effective warmup length."""
    _check_int("warmup_num_steps", warmup_num_steps, minimum=1)
    if warmup_type not in _WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {_WARMUP_TYPES}, got {warmup_type!r}")
    return max(2, warmup_num_steps)


def _warmup_gamma(it: jax.Array, warmup_num_steps: int, warmup_type: str) -> jax.Array:
    """DeepSpeed's warmup fraction in [0, 1) for ``it < max(2, warmup_num_steps)``."""
    steps = max(2, warmup_num_steps)
    it_f = it.astype(jnp.float32)
    if warmup_type == "log":
        return jnp.log(it_f + 1.0) * jnp.float32(1.0 / math.log(steps))
    return it_f / jnp.float32(steps)


def warmup_lr(
    *,
    warmup_min_lr: float = 0.0,
    warmup_max_lr: float | None = None,
    warmup_num_steps: int = 1000,
    warmup_type: str = "log",
    last_batch_iteration: int = -1,
    base_lr: float | None = None,
) -> optax.Schedule:
    """DeepSpeed ``WarmupLR``: warm up from min to max lr, then hold max.

    Args:
      warmup_min_lr: lr at the start of warmup.
      warmup_max_lr: lr after warmup; DeepSpeed's default (None) is the optimizer's lr.
      warmup_num_steps: warmup length (DeepSpeed uses at least 2).
      warmup_type: "log" or "linear".
      last_batch_iteration: DeepSpeed's resume index; -1 starts from the beginning.
      base_lr: the optimizer's lr (needed when warmup_max_lr is None or L0 >= 0).

    Returns:
      The lr of each applied optimizer step.

    Raises:
      ValueError: on a bad warmup_num_steps/warmup_type, or a missing base_lr.
    """
    steps = _check_warmup(warmup_num_steps, warmup_type)
    if warmup_max_lr is None:
        if base_lr is None:
            raise ValueError(
                "WarmupLR's warmup_max_lr defaults to the optimizer's lr: pass warmup_max_lr "
                "or base_lr"
            )
        warmup_max_lr = base_lr
    lo, delta = float(warmup_min_lr), float(warmup_max_lr) - float(warmup_min_lr)

    def value_at(it: jax.Array) -> jax.Array:
        gamma = jnp.where(it < steps, _warmup_gamma(it, warmup_num_steps, warmup_type), 1.0)
        return lo + delta * gamma

    return _ds_stepped(value_at, lo, last_batch_iteration, base_lr)


def warmup_decay_lr(
    *,
    total_num_steps: int,
    warmup_min_lr: float = 0.0,
    warmup_max_lr: float = 0.001,
    warmup_num_steps: int = 1000,
    warmup_type: str = "log",
    last_batch_iteration: int = -1,
    base_lr: float | None = None,
) -> optax.Schedule:
    """DeepSpeed ``WarmupDecayLR``: WarmupLR, then linear decay to 0 at total_num_steps.

    Args:
      total_num_steps: step at which the lr reaches 0.
      warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type: as in ``warmup_lr``.
      last_batch_iteration: DeepSpeed's resume index; -1 starts from the beginning.
      base_lr: the optimizer's lr (needed when L0 >= 0).

    Returns:
      The lr of each applied optimizer step.

    Raises:
      ValueError: on a bad warmup_num_steps/warmup_type, or a missing base_lr.
    """
    steps = _check_warmup(warmup_num_steps, warmup_type)
    lo, delta = float(warmup_min_lr), float(warmup_max_lr) - float(warmup_min_lr)
    total = float(total_num_steps)
    decay_len = float(max(1.0, total - steps))

    def value_at(it: jax.Array) -> jax.Array:
        decay = jnp.maximum(0.0, (total - it.astype(jnp.float32)) / decay_len)
        gamma = jnp.where(it < steps, _warmup_gamma(it, warmup_num_steps, warmup_type), decay)
        return lo + delta * gamma

    return _ds_stepped(value_at, lo, last_batch_iteration, base_lr)


def warmup_cosine_lr(
    *,
    total_num_steps: int,
    warmup_min_ratio: float = 0.0,
    warmup_num_steps: int = 1000,
    cos_min_ratio: float = 0.0001,
    warmup_type: str = "log",
    last_batch_iteration: int = -1,
    base_lr: float,
) -> optax.Schedule:
    """DeepSpeed ``WarmupCosineLR``: a ratio of the optimizer's lr, warmup then cosine.

    Args:
      total_num_steps: step at which the cosine reaches cos_min_ratio (held after).
      warmup_min_ratio: ratio at the start of warmup (warmup ends at 1.0).
      warmup_num_steps: warmup length (DeepSpeed uses at least 2).
      cos_min_ratio: floor of the cosine.
      warmup_type: "log" or "linear".
      last_batch_iteration: DeepSpeed's resume index; -1 starts from the beginning.
      base_lr: the optimizer's lr, which DeepSpeed scales by the ratio.

    Returns:
      The lr of each applied optimizer step (0 on step 0, as in DeepSpeed).

    Raises:
      ValueError: on a bad warmup_num_steps/warmup_type.
    """
    steps = _check_warmup(warmup_num_steps, warmup_type)
    wmin, cmin = float(warmup_min_ratio), float(cos_min_ratio)
    real_total = float(max(1, total_num_steps - steps))
    half_pi = jnp.float32(math.pi / 2)

    def value_at(it: jax.Array) -> jax.Array:
        warm = wmin + _warmup_gamma(it, warmup_num_steps, warmup_type) * (1.0 - wmin)
        done = (it - steps + 1).astype(jnp.float32)
        progress = jnp.minimum(1.0, done / real_total)
        remaining = jnp.maximum(0.0, real_total - done) / real_total  # 1 - progress, exactly
        # (1 + cos(pi p)) / 2 == cos^2(pi p / 2) == sin^2(pi (1 - p) / 2): each form is
        # well conditioned on its half, the direct one is not near p = 1.
        half_wave = jnp.where(
            progress <= 0.5,
            jnp.cos(half_pi * progress) ** 2,
            jnp.sin(half_pi * remaining) ** 2,
        )
        cosine = jnp.maximum(0.0, cmin + (1.0 - cmin) * half_wave)
        return base_lr * jnp.where(it < steps, warm, cosine)

    return _ds_stepped(value_at, 0.0, last_batch_iteration, base_lr)


def _whole_steps(name: str, value: float) -> int:
    if float(value) != int(value):
        raise ValueError(f"{name} must be a whole number of steps, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class _Cycle:
    """OneCycle's shape: both half-cycle lengths, stair counts and post-cycle decay."""

    first: int
    second: int
    first_stairs: int
    second_stairs: int
    decay_step_size: float

    @classmethod
    def make(
        cls,
        first: float,
        second: float | None,
        first_stairs: int,
        second_stairs: int | None,
        decay_step_size: float,
    ) -> _Cycle:
        first_i = _whole_steps("cycle_first_step_size", first)
        second_i = first_i if second is None else _whole_steps("cycle_second_step_size", second)
        if first_i <= 0:
            raise ValueError(f"cycle_first_step_size must be positive, got {first!r}")
        if second_i < 0:
            raise ValueError(f"cycle_second_step_size must be non-negative, got {second!r}")
        stairs2 = first_stairs if second_stairs is None else second_stairs
        return cls(first_i, second_i, int(first_stairs), int(stairs2), float(decay_step_size))

    @property
    def total(self) -> int:
        return self.first + self.second

    def scale(self, b: jax.Array) -> jax.Array:
        """DeepSpeed's ``_get_scale_factor`` at ``batch_iteration = b`` (int32)."""
        rem = b % self.total
        down = self.total - rem
        up_scale = rem.astype(jnp.float32) / self.first
        down_scale = down.astype(jnp.float32) / max(self.second, 1)
        if self.first_stairs > 0:
            up_scale = ((rem * self.first_stairs) // self.first) / jnp.float32(self.first_stairs)
        if self.second_stairs > 0:
            down_scale = ((down * self.second_stairs) // max(self.second, 1)) / jnp.float32(
                self.second_stairs
            )
        return jnp.where(rem <= self.first, up_scale, down_scale)

    def decay_interval(self, b: jax.Array) -> jax.Array:
        """Post-cycle ``decay_batch_iteration / decay_step_size``."""
        return (b - self.total).astype(jnp.float32) / jnp.float32(self.decay_step_size)

    def decays(self, rate: float) -> bool:
        return not (math.isclose(self.decay_step_size, 0) or math.isclose(rate, 0))


def one_cycle(
    *,
    cycle_min_lr: float,
    cycle_max_lr: float,
    decay_lr_rate: float = 0.0,
    cycle_first_step_size: int = 2000,
    cycle_second_step_size: int | None = None,
    cycle_first_stair_count: int = 0,
    cycle_second_stair_count: int | None = None,
    decay_step_size: int = 0,
    cycle_momentum: bool = True,
    cycle_min_mom: float = 0.8,
    cycle_max_mom: float = 0.9,
    decay_mom_rate: float = 0.0,
    last_batch_iteration: int = -1,
    base_lr: float | None = None,
) -> optax.Schedule:
    """DeepSpeed ``OneCycle`` learning rate: one triangle cycle, then 1/(1 + r t) decay.

    The momentum keys are accepted so a ds_config's params pass through unchanged; the
    momentum itself is ``one_cycle_momentum`` (``build_schedule`` pairs the two).

    Args:
      cycle_min_lr, cycle_max_lr: the cycle's lr bounds.
      decay_lr_rate: post-cycle decay rate (0 disables decay).
      cycle_first_step_size, cycle_second_step_size: half-cycle lengths in steps (the second
        defaults to the first).
      cycle_first_stair_count, cycle_second_stair_count: stairs per half (0: continuous).
      decay_step_size: decay interval (0 disables decay).
      cycle_momentum, cycle_min_mom, cycle_max_mom, decay_mom_rate: see one_cycle_momentum.
      last_batch_iteration: DeepSpeed's resume index; -1 starts from the beginning.
      base_lr: the optimizer's lr (needed when L0 >= 0).

    Returns:
      The lr of each applied optimizer step.

    Raises:
      ValueError: on bad step sizes or a missing base_lr.
    """
    del cycle_momentum, cycle_min_mom, cycle_max_mom, decay_mom_rate
    cycle = _Cycle.make(
        cycle_first_step_size,
        cycle_second_step_size,
        cycle_first_stair_count,
        cycle_second_stair_count,
        decay_step_size,
    )
    lo, hi, rate = float(cycle_min_lr), float(cycle_max_lr), float(decay_lr_rate)
    decays = cycle.decays(rate)

    def value_at(it: jax.Array) -> jax.Array:
        b = it + 1
        cyc = lo + (hi - lo) * cycle.scale(b)
        dec = lo / (1.0 + rate * cycle.decay_interval(b)) if decays else jnp.float32(lo)
        return jnp.where(b <= cycle.total, cyc, dec)

    return _ds_stepped(value_at, lo, last_batch_iteration, base_lr)


def one_cycle_momentum(
    *,
    cycle_first_step_size: int = 2000,
    cycle_second_step_size: int | None = None,
    cycle_first_stair_count: int = 0,
    cycle_second_stair_count: int | None = None,
    decay_step_size: int = 0,
    cycle_min_mom: float = 0.8,
    cycle_max_mom: float = 0.9,
    decay_mom_rate: float = 0.0,
    last_batch_iteration: int = -1,
    **lr_keys: Any,
) -> optax.Schedule:
    """DeepSpeed ``OneCycle`` momentum (beta1): cycles inversely to the lr.

    Step 0 gets ``cycle_min_mom`` (what DeepSpeed's ``__init__`` writes); for
    ``last_batch_iteration >= 0`` step 0's value is the optimizer's own beta1, which
    ``build_optimizer`` substitutes (see ``ScheduleWithBetas``), and this schedule's step-0
    value is unused.

    Args:
      cycle_first_step_size .. decay_step_size: the cycle shape, as in ``one_cycle``.
      cycle_min_mom, cycle_max_mom: momentum bounds (max at the cycle's ends).
      decay_mom_rate: post-cycle rate; DeepSpeed multiplies by (1 + rate t), so momentum grows.
      last_batch_iteration: DeepSpeed's resume index; -1 starts from the beginning.
      **lr_keys: the lr-only OneCycle keys, accepted and ignored.

    Returns:
      beta1 for each applied optimizer step.

    Raises:
      ValueError: on bad step sizes or an unknown keyword.
    """
    unknown = set(lr_keys) - {
        "cycle_min_lr",
        "cycle_max_lr",
        "decay_lr_rate",
        "cycle_momentum",
        "base_lr",
    }
    if unknown:
        raise ValueError(f"one_cycle_momentum got unknown keys {sorted(unknown)}")
    cycle = _Cycle.make(
        cycle_first_step_size,
        cycle_second_step_size,
        cycle_first_stair_count,
        cycle_second_stair_count,
        decay_step_size,
    )
    lo, hi, rate = float(cycle_min_mom), float(cycle_max_mom), float(decay_mom_rate)
    decays = cycle.decays(rate)

    def value_at(it: jax.Array) -> jax.Array:
        b = it + 1
        cyc = hi - (hi - lo) * cycle.scale(b)
        dec = hi * (1.0 + rate * cycle.decay_interval(b)) if decays else jnp.float32(hi)
        return jnp.where(b <= cycle.total, cyc, dec)

    # Step 0 under L0 >= 0 is the optimizer's beta1, substituted by build_optimizer.
    return _ds_stepped(value_at, lo, last_batch_iteration, lo)


def lr_range_test(
    *,
    lr_range_test_min_lr: float = 0.001,
    lr_range_test_step_size: int = 2000,
    lr_range_test_step_rate: float = 1.0,
    lr_range_test_staircase: bool = False,
    last_batch_iteration: int = -1,
    base_lr: float | None = None,
) -> optax.Schedule:
    """DeepSpeed ``LRRangeTest``: lr grows as min_lr * (1 + rate * interval).

    Args:
      lr_range_test_min_lr: starting lr.
      lr_range_test_step_size: steps per interval.
      lr_range_test_step_rate: growth per interval.
      lr_range_test_staircase: whole intervals only (floor) instead of continuous growth.
      last_batch_iteration: DeepSpeed's resume index; -1 starts from the beginning.
      base_lr: the optimizer's lr (needed when L0 >= 0).

    Returns:
      The lr of each applied optimizer step.

    Raises:
      ValueError: on a bad step size or a missing base_lr.
    """
    size = _check_int("lr_range_test_step_size", lr_range_test_step_size, minimum=1)
    lo, rate = float(lr_range_test_min_lr), float(lr_range_test_step_rate)

    def value_at(it: jax.Array) -> jax.Array:
        b = it + 1
        if lr_range_test_staircase:
            interval = (b // size).astype(jnp.float32)
        else:
            interval = b.astype(jnp.float32) / jnp.float32(size)
        return lo * (1.0 + rate * interval)

    return _ds_stepped(value_at, lo, last_batch_iteration, base_lr)


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "WarmupLR": warmup_lr,
    "WarmupDecayLR": warmup_decay_lr,
    "WarmupCosineLR": warmup_cosine_lr,
    "OneCycle": one_cycle,
    "LRRangeTest": lr_range_test,
}


def _ds_keys(sched_type: str) -> dict[str, bool]:
    """DeepSpeed's keyword arguments of a scheduler class, each mapped to "required".

    The schedule functions take exactly DeepSpeed's keywords (the engine passes
    ``scheduler.params`` to the class as ``**kwargs``, so any other key is a TypeError
    there), plus ``base_lr``, which build_schedule supplies from the optimizer.
    """
    sig = inspect.signature(SCHEDULES[sched_type]).parameters
    return {
        name: p.default is inspect.Parameter.empty for name, p in sig.items() if name != "base_lr"
    }


_MOMENTUM_BETA2 = 0.99  # what DeepSpeed's OneCycle writes as betas[1]


def build_schedule(
    sched_type: str | None, params: Mapping[str, Any], *, base_lr: float
) -> optax.Schedule:
    """The schedule of a ds_config ``scheduler`` section.

    Keys whose value is None count as absent (a pydantic ``model_dump`` of unset fields).
    OneCycle with ``cycle_momentum`` (DeepSpeed's default) returns a ``ScheduleWithBetas``,
    which ``build_optimizer`` uses to cycle beta1 and set beta2 = 0.99 as DeepSpeed does.

    Args:
      sched_type: DeepSpeed scheduler name (a key of ``SCHEDULES``), or None for a constant lr.
      params: the scheduler's params, DeepSpeed keys.
      base_lr: the optimizer's lr (``optimizer.params.lr``).

    Returns:
      The lr of each applied optimizer step.

    Raises:
      ValueError: on an unknown type, an unknown or missing key, or a bad value.
    """
    given = {k: v for k, v in dict(params).items() if v is not None}
    if sched_type is None:
        if given:
            raise ValueError(f"scheduler params {sorted(given)} given without a scheduler type")
        return optax.constant_schedule(float(base_lr))
    if sched_type not in SCHEDULES:
        raise ValueError(f"unknown scheduler type {sched_type!r}; jds supports {sorted(SCHEDULES)}")
    allowed = _ds_keys(sched_type)
    for key in given:
        if key not in allowed:
            raise ValueError(
                f"scheduler.params.{key} is not a {sched_type} parameter; "
                f"DeepSpeed's {sched_type} takes {list(allowed)}"
            )
    for key, required in allowed.items():
        if required and key not in given:
            raise ValueError(f"scheduler.params.{key} is required by {sched_type}")
    schedule = SCHEDULES[sched_type](**given, base_lr=float(base_lr))
    if sched_type == "OneCycle" and given.get("cycle_momentum", True):
        momentum = one_cycle_momentum(**given)
        return ScheduleWithBetas(
            lr=schedule,
            beta1=momentum,
            beta2=_MOMENTUM_BETA2,
            optimizer_betas_first=given.get("last_batch_iteration", -1) >= 0,
        )
    return schedule
