"""jds.optim.optimizers against DeepSpeed's optimizers (tests/fixtures/ds_optimizers.json).

The fixture (scripts/make_ds_schedule_table.py) holds parameters after each of 10 steps on
fixed gradients, from DeepSpeed's FusedAdam and CPU Lion ops and, where DeepSpeed's op is
CUDA-only (FusedLamb, FusedLion's zero case), from transcriptions of its CUDA kernels; each
case names its source. Only the JSON is needed here.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jds.optim import OPTIMIZERS, build_optimizer, build_schedule, warmup_decay_lr

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ds_optimizers.json").read_text())
CASES = {case["name"]: case for case in FIXTURE["cases"]}
ATOL, RTOL = 1e-6, 1e-5


def _tree(flat: dict) -> dict:
    return {n: jnp.asarray(v, jnp.float32).reshape(FIXTURE["shapes"][n]) for n, v in flat.items()}


def _learning_rate(spec):
    if isinstance(spec, float):
        return spec
    return build_schedule(spec["type"], spec["params"], base_lr=spec["base_lr"])


def _stepper(tx: optax.GradientTransformation):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_fixture_covers_every_optimizer():
    assert {case["type"] for case in FIXTURE["cases"]} == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_deepspeed(name):
    case = CASES[name]
    tx = build_optimizer(case["type"], case["params"], _learning_rate(case["lr"]))
    params = _tree(FIXTURE["init"])
    state = tx.init(params)
    step = _stepper(tx)
    for k, (grads, want) in enumerate(
        zip(FIXTURE["grads"][case["grads"]], case["params_after"], strict=True)
    ):
        params, state = step(params, state, _tree(grads))
        for n, value in _tree(want).items():
            np.testing.assert_allclose(
                params[n], value, atol=ATOL, rtol=RTOL, err_msg=f"{name} step {k} tensor {n}"
            )


def _nested_params() -> dict:
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "layer": {
            "kernel": jax.random.normal(k1, (3, 4)) + 1.0,
            "bias": jax.random.normal(k2, (4,)) + 1.0,
        },
        "scale": jnp.float32(2.0),
        "embed": [jax.random.normal(k3, (2, 5)) - 1.0],
    }


@pytest.mark.parametrize("opt_type", OPTIMIZERS)
def test_weight_decay_hits_every_parameter(opt_type):
    """One step on zero grads: each leaf moves exactly as the kernel's decay term says."""
    lr, wd = 0.1, 0.05
    params = _nested_params()
    tx = build_optimizer(opt_type, {"weight_decay": wd}, lr)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)

    def expected(p):
        if opt_type in ("adam", "adamw"):
            return p * (1 - lr * wd)  # Adam direction is 0/(0 + eps) = 0
        if opt_type == "lion":
            return p * (1 - lr * wd) + lr  # c == 0 -> the CUDA kernel's +lr
        # lamb: u = wd * p, trust ratio 1/wd = 20 clamped to max_coeff 10, bias-corrected step
        step_scale = np.sqrt(1 - 0.999) / (1 - 0.9)
        return p - lr * step_scale * 10.0 * wd * p

    assert len(jax.tree.leaves(params)) == 4
    for got, want in zip(
        jax.tree.leaves(new), jax.tree.leaves(jax.tree.map(expected, params)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_adam_l2_mode_differs_from_adamw():
    params = _nested_params()
    grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
    outs = []
    for mode in (True, False):
        tx = build_optimizer("adam", {"weight_decay": 0.5, "adam_w_mode": mode}, 0.1)
        updates, _ = tx.update(grads, tx.init(params), params)
        outs.append(updates["layer"]["kernel"])
    assert not np.allclose(outs[0], outs[1])
    # "adamw" is decoupled whatever adam_w_mode says, as in DeepSpeed's engine.
    tx = build_optimizer("adamw", {"weight_decay": 0.5, "adam_w_mode": False}, 0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["layer"]["kernel"], outs[0], rtol=1e-6)


def test_lr_schedule_runs_on_the_optimizer_count():
    """Lion moves each weight by exactly lr(k) at its k-th update (wd = 0), under jit."""
    schedule = warmup_decay_lr(total_num_steps=12, warmup_max_lr=0.01, warmup_num_steps=5)
    tx = build_optimizer("Lion", {}, schedule)  # type names are case-insensitive
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    step = _stepper(tx)
    grads = {"w": jnp.array([1.0, -1.0, 2.0])}
    for k in range(8):
        new, state = step(params, state, grads)
        np.testing.assert_allclose(
            jnp.abs(new["w"] - params["w"]), float(schedule(k)), rtol=1e-6, atol=1e-12
        )
        params = new


def test_state_is_arrays_and_maps_like_params():
    """The engine shards optimizer state with optax.tree_map_params; moments follow params."""
    params = _nested_params()
    for opt_type in OPTIMIZERS:
        tx = build_optimizer(opt_type, {"weight_decay": 0.01}, optax.constant_schedule(1e-3))
        state = jax.jit(tx.init)(params)
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
        tagged = optax.tree_map_params(
            tx, lambda _: "param", state, transform_non_params=lambda _: "other"
        )
        kinds = jax.tree.leaves(tagged)
        n_param = len(jax.tree.leaves(params))
        moments = 1 if opt_type == "lion" else 2
        assert kinds.count("param") == moments * n_param, opt_type
        assert kinds.count("other") >= 1  # the step counts


@pytest.mark.parametrize(
    ("opt_type", "params", "match"),
    [
        ("sgd", {}, r"jds supports \['adam', 'adamw', 'lamb', 'lion'\]"),
        ("adam", {"max_coeff": 1.0}, "max_coeff is not a parameter of DeepSpeed's adam"),
        ("lion", {"eps": 1e-8}, "eps is not a parameter of DeepSpeed's lion"),
        ("lamb", {"max_grad_norm": 1.0}, "gradient_clipping"),
        ("adamw", {"amsgrad": True}, "amsgrad"),
        ("adam", {"betas": [0.9]}, "betas"),
    ],
)
def test_errors_name_the_problem(opt_type, params, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(opt_type, params, 1e-3)


def test_lamb_needs_params():
    tx = build_optimizer("lamb", {}, 1e-3)
    params = {"w": jnp.ones((2,))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
