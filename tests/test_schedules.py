"""jds.optim.schedules against real DeepSpeed schedulers (tests/fixtures/ds_schedules.json).

The fixture is written by scripts/make_ds_schedule_table.py: DeepSpeed's scheduler classes
stepped as the DeepSpeed engine steps them, recording the lr (and betas) each
``optimizer.step()`` ran with. Only the JSON is needed here (no torch, no deepspeed).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.optim import (
    SCHEDULES,
    ScheduleWithBetas,
    build_schedule,
    lr_range_test,
    one_cycle,
    one_cycle_momentum,
    resolve_betas,
    warmup_cosine_lr,
    warmup_decay_lr,
    warmup_lr,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ds_schedules.json").read_text())
CASES = {case["name"]: case for case in FIXTURE["cases"]}
RTOL, ATOL = 1e-6, 1e-12  # fp32 schedule vs DeepSpeed's float64 values


def _lrs(schedule, n: int) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n, dtype=jnp.int32)))


def test_fixture_covers_every_schedule_type():
    assert {case["type"] for case in FIXTURE["cases"]} == set(SCHEDULES)
    assert set(FIXTURE["engine_checked"]) <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lr_matches_deepspeed(name):
    case = CASES[name]
    schedule = build_schedule(case["type"], case["params"], base_lr=case["base_lr"])
    np.testing.assert_allclose(_lrs(schedule, len(case["lr"])), case["lr"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_betas_match_deepspeed(name):
    """The betas the optimizer runs with, OneCycle momentum included (beta2 forced to 0.99)."""
    case = CASES[name]
    schedule = build_schedule(case["type"], case["params"], base_lr=case["base_lr"])
    cycles = case["type"] == "OneCycle" and case["params"].get("cycle_momentum", True)
    assert isinstance(schedule, ScheduleWithBetas) == cycles
    b1, b2 = resolve_betas({"betas": case["optimizer_betas"]}, schedule)
    steps = jnp.arange(len(case["betas"]), dtype=jnp.int32)
    got = np.stack(
        [
            np.broadcast_to(np.asarray(jax.vmap(b)(steps) if callable(b) else b), steps.shape)
            for b in (b1, b2)
        ],
        axis=1,
    )
    np.testing.assert_allclose(got, case["betas"], rtol=RTOL)


def test_schedule_under_jit_with_traced_count():
    case = CASES["one_cycle_momentum_decay"]
    schedule = build_schedule(case["type"], case["params"], base_lr=case["base_lr"])
    jitted = jax.jit(schedule)
    for k in (0, 1, 19, 20, 21, 50, 51, 89):
        np.testing.assert_allclose(float(jitted(jnp.int32(k))), case["lr"][k], rtol=RTOL)
    assert jitted._cache_size() == 1  # one trace for every count


def test_standalone_functions_equal_build_schedule():
    base = 0.02
    pairs = [
        (
            warmup_lr(warmup_num_steps=40, warmup_type="linear", warmup_min_lr=0.001, base_lr=base),
            CASES["warmup_linear_max_from_optimizer"],
        ),
        (
            warmup_decay_lr(total_num_steps=100, warmup_max_lr=0.003, warmup_num_steps=20),
            CASES["warmup_decay_log"],
        ),
        (
            warmup_cosine_lr(
                total_num_steps=100,
                warmup_num_steps=10,
                warmup_min_ratio=0.1,
                cos_min_ratio=0.01,
                base_lr=0.003,
            ),
            CASES["warmup_cosine_log"],
        ),
        (
            one_cycle(**CASES["one_cycle_stairs_no_momentum"]["params"]),
            CASES["one_cycle_stairs_no_momentum"],
        ),
        (
            lr_range_test(
                lr_range_test_min_lr=1e-3,
                lr_range_test_step_size=7,
                lr_range_test_step_rate=2.0,
                lr_range_test_staircase=True,
            ),
            CASES["lr_range_staircase"],
        ),
    ]
    for schedule, case in pairs:
        np.testing.assert_allclose(
            _lrs(schedule, len(case["lr"])), case["lr"], rtol=RTOL, atol=ATOL, err_msg=case["name"]
        )
    mom = one_cycle_momentum(**CASES["one_cycle_momentum_decay"]["params"])
    expect = [b[0] for b in CASES["one_cycle_momentum_decay"]["betas"]]
    np.testing.assert_allclose(_lrs(mom, len(expect)), expect, rtol=RTOL)


def test_cosine_tail_keeps_precision():
    """Near the end of the cosine, (1 + cos) cancels in fp32; the schedule must not."""
    import math

    total, warm, cmin = 10_000, 100, 0.0
    schedule = warmup_cosine_lr(
        total_num_steps=total, warmup_num_steps=warm, cos_min_ratio=cmin, base_lr=1.0
    )
    ks = np.array([total - 50, total - 10, total - 2, total])
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(ks, jnp.int32)))
    # Step k runs DeepSpeed's get_lr at last_batch_iteration = k - 1.
    want = [(1 + math.cos(math.pi * min(1.0, (k - 1 - warm + 1) / (total - warm)))) / 2 for k in ks]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_none_type_is_constant_and_none_values_are_absent():
    const = build_schedule(None, {}, base_lr=0.125)
    assert float(const(jnp.int32(7))) == 0.125
    with_nones = build_schedule(
        "WarmupLR",
        {
            "warmup_num_steps": 50,
            "warmup_min_lr": 1e-5,
            "warmup_max_lr": 1e-3,
            "total_num_steps": None,
        },
        base_lr=0.01,
    )
    case = CASES["warmup_log"]
    np.testing.assert_allclose(_lrs(with_nones, 80), case["lr"], rtol=RTOL)


@pytest.mark.parametrize(
    ("sched_type", "params", "match"),
    [
        ("Cosine", {}, "jds supports .*LRRangeTest.*WarmupLR"),
        ("WarmupLR", {"warmup_steps": 10}, "warmup_steps"),
        ("WarmupLR", {"total_num_steps": 10}, "total_num_steps is not a WarmupLR"),
        ("WarmupCosineLR", {"warmup_max_lr": 0.1, "total_num_steps": 9}, "warmup_max_lr"),
        ("WarmupDecayLR", {"warmup_num_steps": 10}, "total_num_steps is required"),
        ("OneCycle", {"cycle_min_lr": 0.1}, "cycle_max_lr is required"),
        ("WarmupLR", {"warmup_type": "cosine"}, "warmup_type"),
        ("WarmupLR", {"warmup_num_steps": 10.0}, "warmup_num_steps"),
        ("LRRangeTest", {"lr_range_test_step_size": 0}, "lr_range_test_step_size"),
        (
            "OneCycle",
            {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0, "cycle_first_step_size": 0},
            "cycle_first_step_size",
        ),
        (None, {"warmup_num_steps": 10}, "without a scheduler type"),
    ],
)
def test_errors_name_the_problem(sched_type, params, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(sched_type, params, base_lr=0.1)


def test_resume_index_needs_the_optimizer_lr():
    with pytest.raises(ValueError, match="base_lr"):
        warmup_decay_lr(total_num_steps=10, last_batch_iteration=3)
    with pytest.raises(ValueError, match="warmup_max_lr"):
        warmup_lr()
