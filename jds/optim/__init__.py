"""DeepSpeed's LR schedules and optimizers as optax objects (see schedules.py, optimizers.py).

``build_schedule(cfg.scheduler.type, cfg.scheduler.params, base_lr=...)`` and
``build_optimizer(cfg.optimizer.type, cfg.optimizer.params, schedule)`` are what the engine
calls; the rest is exported for direct use and tests.
"""

from jds.optim.optimizers import (
    OPTIMIZERS,
    DSAdamState,
    DSLambState,
    DSLionState,
    build_optimizer,
    resolve_betas,
    scale_by_ds_adam,
    scale_by_ds_lamb,
    scale_by_ds_lion,
)
from jds.optim.schedules import (
    SCHEDULES,
    ScheduleWithBetas,
    build_schedule,
    lr_range_test,
    one_cycle,
    one_cycle_momentum,
    warmup_cosine_lr,
    warmup_decay_lr,
    warmup_lr,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "DSAdamState",
    "DSLambState",
    "DSLionState",
    "ScheduleWithBetas",
    "build_optimizer",
    "build_schedule",
    "lr_range_test",
    "resolve_betas",
    "one_cycle",
    "one_cycle_momentum",
    "scale_by_ds_adam",
    "scale_by_ds_lamb",
    "scale_by_ds_lion",
    "warmup_cosine_lr",
    "warmup_decay_lr",
    "warmup_lr",
]
