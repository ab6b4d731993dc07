"""Wall-clock timing of jitted calls, for the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def median_seconds(fn: Callable[..., Any], *args: Any, reps: int) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` runs after one compile-and-run; each
    run waits for its result (``jax.block_until_ready``)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


__all__ = ["median_seconds"]
