"""jds.precision against DeepSpeed's own ``DynamicLossScaler``, plus policies and casting."""

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.precision import (
    MAX_SCALE,
    LossScaleConfig,
    LossScaleState,
    all_finite,
    cast_tree,
    init_loss_scale,
    policy_for,
    update_loss_scale,
)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")

STEPS = 300


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch):
    # update_scale asks deepspeed.comm for the rank only to decide whether to log; no process
    # group exists in a unit test, so answer "rank 0" there and nowhere else.
    monkeypatch.setattr(loss_scaler, "dist", SimpleNamespace(get_rank=lambda: 0))


def _ds_scaler(cfg: LossScaleConfig, raise_error: bool):
    return loss_scaler.DynamicLossScaler(
        init_scale=cfg.init_scale,
        scale_window=cfg.scale_window,
        min_scale=cfg.min_scale,
        delayed_shift=cfg.hysteresis,
        consecutive_hysteresis=cfg.consecutive_hysteresis,
        raise_error_at_min_scale=raise_error,
    )


def _ds_trace(cfg: LossScaleConfig, overflows: np.ndarray, raise_error: bool):
    """DeepSpeed's state after each step; stops at the step where DeepSpeed raises."""
    ds = _ds_scaler(cfg, raise_error)
    trace = []
    for overflow in overflows:
        try:
            ds.update_scale(bool(overflow))
        except Exception as err:  # DeepSpeed raises a bare Exception at the floor
            assert "minimum" in str(err)
            return trace, True
        trace.append((ds.cur_scale, ds.cur_iter, ds.last_overflow_iter, ds.cur_hysteresis))
    return trace, False


def _jds_trace(cfg: LossScaleConfig, overflows: np.ndarray) -> LossScaleState:
    """jds state after each step, the whole sequence in one jitted scan."""

    @jax.jit
    def run(flags):
        def body(state, overflow):
            new = update_loss_scale(state, overflow, cfg)
            return new, new

        return jax.lax.scan(body, init_loss_scale(cfg), flags)[1]

    return jax.device_get(run(jnp.asarray(overflows)))


def _overflows(seed: int, steps: int = STEPS, block: int = 25) -> np.ndarray:
    """Random overflow flags in regimes: calm blocks (the scale grows) and stormy ones."""
    rng = np.random.default_rng(seed)
    p_BLOCK = rng.choice([0.0, 0.05, 0.3, 0.7, 0.95], size=-(-steps // block))
    return rng.random(steps) < np.repeat(p_BLOCK, block)[:steps]


CASES = {
    "hyst1": LossScaleConfig(hysteresis=1, scale_window=5, init_scale=2.0**16),
    "hyst2": LossScaleConfig(hysteresis=2, scale_window=4, init_scale=2.0**16),
    "hyst2_consecutive": LossScaleConfig(hysteresis=2, consecutive_hysteresis=True, scale_window=3),
    "hyst3_window7": LossScaleConfig(hysteresis=3, scale_window=7, init_scale=2.0**20),
    "hyst3_consecutive": LossScaleConfig(hysteresis=3, consecutive_hysteresis=True, scale_window=2),
    "min_scale_floor": LossScaleConfig(
        hysteresis=1, scale_window=6, init_scale=2.0**4, min_scale=1.0),
    "min_scale_quarter": LossScaleConfig(
        hysteresis=2, scale_window=5, init_scale=4.0, min_scale=0.25),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_deepspeed_dynamic_loss_scaler(name):
    cfg = CASES[name]
    overflows = _overflows(sorted(CASES).index(name))
    ds, raised = _ds_trace(cfg, overflows, raise_error=False)
    assert not raised and len(ds) == STEPS
    ours = _jds_trace(cfg, overflows)
    scale, cur_iter, last, hyst = (np.array(col) for col in zip(*ds, strict=True))
    np.testing.assert_array_equal(ours.scale, scale.astype(np.float32))
    np.testing.assert_array_equal(ours.cur_iter, cur_iter)
    np.testing.assert_array_equal(ours.last_overflow_iter, last)
    np.testing.assert_array_equal(ours.hysteresis, hyst)
    # The sequence must actually exercise both directions of the scale.
    assert np.any(np.diff(scale) > 0) and np.any(np.diff(scale) < 0)
    absorbed = overflows[1:] & (np.diff(scale) == 0) & (scale[:-1] > cfg.min_scale)
    assert np.any(absorbed) == (cfg.hysteresis > 1), "hysteresis path not exercised"
    if name.startswith("min_scale"):
        assert np.sum(scale == cfg.min_scale) > 5, "the floor was never reached"


def test_min_scale_overflow_is_counted_where_deepspeed_raises():
    cfg = CASES["min_scale_floor"]
    overflows = _overflows(7)
    ds, raised = _ds_trace(cfg, overflows, raise_error=True)
    assert raised, "sequence never drove DeepSpeed to its floor"
    raise_step = len(ds)
    ours = _jds_trace(cfg, overflows)
    np.testing.assert_array_equal(ours.scale[:raise_step], [s[0] for s in ds])
    # Zero events before DeepSpeed's raise, one at it; the scale stays at the floor.
    assert np.all(ours.min_scale_overflows[:raise_step] == 0)
    assert ours.min_scale_overflows[raise_step] == 1
    assert ours.scale[raise_step] == cfg.min_scale


def test_eager_matches_jit():
    cfg = CASES["hyst2"]
    overflows = _overflows(3, steps=60, block=10)
    state, scales = init_loss_scale(cfg), []
    for overflow in overflows:
        state = update_loss_scale(state, jnp.asarray(overflow), cfg)
        scales.append(float(state.scale))
    np.testing.assert_array_equal(scales, _jds_trace(cfg, overflows).scale)


def test_growth_stops_at_largest_float32_power_of_two():
    cfg = LossScaleConfig(hysteresis=1, scale_window=1, init_scale=2.0**120)
    overflows = np.zeros(40, bool)
    ds, _ = _ds_trace(cfg, overflows, raise_error=False)
    ours = _jds_trace(cfg, overflows)
    expected = np.minimum([s[0] for s in ds], MAX_SCALE)
    assert max(s[0] for s in ds) > MAX_SCALE  # DeepSpeed (Python float) goes past it
    np.testing.assert_array_equal(ours.scale, expected.astype(np.float32))
    assert np.all(np.isfinite(ours.scale))


def test_static_and_disabled_scale_never_change():
    overflows = jnp.asarray(np.random.default_rng(1).random(50) < 0.5)
    static = LossScaleConfig(dynamic=False, init_scale=128.0)
    for cfg, expected in ((static, 128.0), (None, 1.0)):
        state = init_loss_scale(cfg)
        for overflow in overflows:
            state = update_loss_scale(state, overflow, cfg)
        assert float(state.scale) == expected


def test_from_fp16_config_reads_deepspeed_keys():
    keys = dict(initial_scale_power=12, loss_scale_window=500, hysteresis=3,
                consecutive_hysteresis=True, min_loss_scale=2)
    dyn = LossScaleConfig.from_fp16_config(SimpleNamespace(loss_scale=0, **keys))
    assert dyn == LossScaleConfig(dynamic=True, init_scale=4096.0, scale_window=500,
                                  hysteresis=3, consecutive_hysteresis=True, min_scale=2.0)
    static = LossScaleConfig.from_fp16_config(SimpleNamespace(loss_scale=64, **keys))
    assert not static.dynamic and static.init_scale == 64.0
    assert float(init_loss_scale(static).scale) == 64.0
    with pytest.raises(ValueError, match="loss_scale_window"):
        LossScaleConfig(scale_window=0)


def test_fp16_overflow_is_detected_skipped_and_scale_shrinks():
    """The engine's recipe on a real fp16 backward: scale, grad, unscale, check, update."""
    cfg = LossScaleConfig(hysteresis=1, init_scale=2.0**16)
    w = jnp.full((4,), 1.0, jnp.float32)

    def scaled_grads(state):
        # d/dw of 8 * w.astype(fp16) is 8 in fp16; times the scale it overflows fp16's 65504.
        grads = jax.grad(lambda w: (w.astype(jnp.float16) * 8.0).sum() * state.scale)(w)
        return jax.tree.map(lambda g: g / state.scale, grads)

    state = init_loss_scale(cfg)
    grads = scaled_grads(state)
    assert not bool(all_finite(grads))
    state = update_loss_scale(state, ~all_finite(grads), cfg)
    assert float(state.scale) == 2.0**15
    for _ in range(3):
        state = update_loss_scale(state, ~all_finite(scaled_grads(state)), cfg)
    grads = scaled_grads(state)
    assert bool(all_finite(grads)) and float(state.scale) == 2.0**12
    np.testing.assert_array_equal(grads, np.full(4, 8.0, np.float32))


def test_all_finite():
    tree = {"a": jnp.ones((3,)), "b": (jnp.zeros((2, 2), jnp.bfloat16), jnp.arange(3))}
    assert bool(all_finite(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        broken = {**tree, "a": tree["a"].at[1].set(bad)}
        assert not bool(jax.jit(all_finite)(broken))
    assert bool(all_finite({}))


def test_policies():
    assert policy_for("fp32").compute_dtype == jnp.float32 and not policy_for("fp32").mixed
    assert policy_for("bf16").compute_dtype == jnp.bfloat16 and policy_for("bf16").mixed
    assert policy_for("fp16").compute_dtype == jnp.float16
    for name in ("fp32", "bf16", "fp16"):
        assert policy_for(name).param_dtype == jnp.float32
        assert policy_for(name).output_dtype == jnp.float32
    with pytest.raises(ValueError, match="fp8"):
        policy_for("fp8")


def test_cast_tree_casts_floating_leaves_only():
    tree = {"w": jnp.full((2, 3), 1.5, jnp.float32), "ids": jnp.arange(4, dtype=jnp.int32),
            "flag": jnp.asarray(True), "py": 3}
    out = cast_tree(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and float(out["w"][0, 0]) == 1.5
    assert out["ids"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_ and out["py"] == 3
    back = cast_tree(out, jnp.float32)
    np.testing.assert_array_equal(back["w"], tree["w"])
    abstract = cast_tree(jax.eval_shape(lambda: tree), jnp.float16)
    assert abstract["w"].dtype == jnp.float16 and abstract["w"].shape == (2, 3)
    assert abstract["ids"].dtype == jnp.int32
