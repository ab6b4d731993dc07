"""The layer scan that accumulates its weights' gradients in place (issue 19)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.models.layers import scan_layers
from jds.partitioning.accumulate import add_at, gradient_sink, scan_accumulating, sink_for

L, D, B = 4, 64, 8


def layer(p, h, positions):
    out = jnp.tanh(h @ p["w"]) * p["g"] + positions[:, None].astype(h.dtype) * 1e-3
    return jnp.where(p["keep"], out, h)


def params():
    k = jax.random.key(0)
    return {"w": jax.random.normal(k, (L, D, D)) * 0.1, "g": jnp.ones((L, D)) * 1.5,
            "keep": jnp.array([True, False, True, True])}


def test_gradients_go_into_the_accumulator_and_the_free_ones_come_out_as_usual():
    p = params()
    x = jax.random.normal(jax.random.key(1), (B, D))
    pos = jnp.arange(B)
    acc = {"w": jnp.full((L, D, D), 0.5)}  # "g" is not sunk: its gradient comes out as usual

    def plain(p, x):
        return jnp.sum(jax.lax.scan(lambda h, q: (layer(q, h, pos), None), x, p)[0] ** 2)

    def with_aux(q, h, pos):  # a layer that also reports a statistic (layer state)
        out = layer(q, h, pos)
        return out, jnp.max(out)

    def sunk(p, acc, x):
        out, top_L = scan_accumulating(with_aux, p, acc, x, pos)
        return jnp.sum(out ** 2) + jnp.sum(top_L)  # no gradient flows back through top_L

    gp, gx = jax.grad(plain, argnums=(0, 1), allow_int=True)(p, x)
    s_p, s_acc, s_x = jax.grad(sunk, argnums=(0, 1, 2), allow_int=True)(p, acc, x)
    np.testing.assert_allclose(s_acc["w"], 0.5 + gp["w"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s_p["g"], gp["g"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s_x, gx, rtol=1e-6, atol=1e-6)
    assert not np.any(s_p["w"])  # the sunk weight's own gradient is zero
    # the forward value is the plain scan's, the statistic stacked per layer
    out, top_L = scan_accumulating(with_aux, p, acc, x, pos)
    h, want = x, []
    for i in range(L):
        h = layer(jax.tree.map(lambda a: a[i], p), h, pos)  # noqa: B023
        want.append(jnp.max(h))
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(top_L, want, rtol=1e-5, atol=1e-6)


def test_scan_layers_takes_the_sink_only_for_the_arrays_it_names():
    p = {k: v for k, v in params().items() if k != "keep"}
    x = jax.random.normal(jax.random.key(2), (B, D))
    pos = jnp.arange(B)
    blk = lambda q, h, positions: layer({**q, "keep": True}, h, positions)  # noqa: E731

    def loss(p, acc):
        with gradient_sink(p, acc) as used:
            out = jnp.sum(scan_layers(blk, p, x, pos) ** 2)
        assert used == {0, 1}  # both leaves ("g", "w" in flattening order) were taken
        return out

    acc = jax.tree.map(jnp.zeros_like, p)
    g_acc = jax.grad(loss, argnums=1)(p, acc)
    ref = jax.grad(lambda p: jnp.sum(scan_layers(blk, p, x, pos) ** 2))(p)
    for k in p:
        np.testing.assert_allclose(g_acc[k], ref[k], rtol=1e-6, atol=1e-6)
    # a transformed weight (here scaled first, as a quantizer or a mask would) is not the
    # array the sink names, so the plain scan runs
    with gradient_sink(p, acc):
        assert sink_for({"w": p["w"] * 1.0}) is None
        assert sink_for({"w": p["w"]}) is not None
    assert sink_for({"w": p["w"]}) is None  # no sink open


def test_add_at_batches_as_one_slice_update():
    acc = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    g = jnp.ones((2, 4))
    ref = acc.at[:, 1].add(g)
    np.testing.assert_array_equal(jax.vmap(add_at, in_axes=(0, 0, None))(acc, g, 1), ref)
    np.testing.assert_array_equal(
        jax.vmap(add_at, in_axes=(0, None, None))(acc, g[0], 1), ref)
    idx = jnp.array([0, 2])
    want = jnp.stack([acc[0].at[0].add(1.0), acc[1].at[2].add(1.0)])
    np.testing.assert_array_equal(jax.vmap(add_at, in_axes=(0, 0, 0))(acc, g, idx), want)
    hlo = jax.jit(jax.vmap(add_at, in_axes=(0, 0, None))).lower(acc, g, 1).as_text()
    assert "scatter" not in hlo and "dynamic_update_slice" in hlo


def test_accumulating_micro_batches_keeps_one_gradient_buffer():
    p = {"w": jnp.zeros((8, 256, 256)), "g": jnp.ones((8, 256))}
    xs = jnp.zeros((4, B, 256))
    pos = jnp.arange(B)
    blk = lambda q, h, positions: layer({**q, "keep": True}, h, positions)  # noqa: E731

    def step(p, xs, in_place):
        def micro(acc, x):
            loss = lambda p: jnp.sum(scan_layers(blk, p, x, pos) ** 2)  # noqa: E731
            if not in_place:
                return jax.tree.map(jnp.add, acc, jax.grad(loss)(p)), None

            def sunk(p, acc):
                with gradient_sink(p, acc):
                    return loss(p)
            return jax.grad(sunk, argnums=1)(p, acc), None
        acc, _ = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, p), xs)
        return jax.tree.map(lambda a, b: a - b, p, acc)

    temp = {f: jax.jit(step, static_argnums=2, donate_argnums=0).lower(p, xs, f).compile()
            .memory_analysis().temp_size_in_bytes for f in (False, True)}
    stacked = p["w"].nbytes
    # JAX's scan transpose stacks each micro-batch's gradient beside the accumulator; the
    # accumulating scan writes into the accumulator itself
    assert temp[False] - temp[True] >= 0.8 * stacked, (temp, stacked)


def test_layer_state_leaves_the_scan_moved_by_each_layer_it_ran():
    """``LayerState`` through ``scan_layers``: each layer sees its own row and the rows it
    sets come out stacked, the same under remat, grouped checkpointing and the in-place
    accumulating scan; a layer Progressive Layer Dropping skips keeps its row; the layers'
    outputs come out too (``outputs=True``) and carry their gradients."""
    from jds.models.layer_drop import PLD_KEEP
    from jds.models.layers import set_layer_state

    p = {k: v for k, v in params().items() if k != "keep"}
    x = jax.random.normal(jax.random.key(3), (B, D))
    pos = jnp.arange(B)
    state = {"seen": jnp.arange(L * 2, dtype=jnp.float32).reshape(L, 2)}

    def blk(q, h, positions):
        out = layer({**q, "keep": True}, h, positions)
        set_layer_state("seen", q["seen"] + jnp.stack([jnp.min(h), jnp.max(h)]))
        return out

    want, h = [], x
    for i in range(L):
        want.append(state["seen"][i] + jnp.stack([jnp.min(h), jnp.max(h)]))
        h = layer({**jax.tree.map(lambda a: a[i], p), "keep": True}, h, pos)  # noqa: B023
    for kw in ({}, {"remat": "full"}, {"group": 2}):
        r = scan_layers(blk, p, x, pos, state_L=state, **kw)
        np.testing.assert_allclose(r.x, h, rtol=1e-5, atol=1e-6, err_msg=str(kw))
        np.testing.assert_allclose(r.state["seen"], jnp.stack(want), rtol=1e-5, atol=1e-6,
                                   err_msg=str(kw))
    acc = jax.tree.map(jnp.zeros_like, p)
    with gradient_sink(p, acc) as used:
        r = scan_layers(blk, p, x, pos, state_L=state)
    assert used  # the accumulating scan ran
    np.testing.assert_allclose(r.state["seen"], jnp.stack(want), rtol=1e-5, atol=1e-6)

    keep = jnp.array([True, False, True, True])
    r = scan_layers(blk, {**p, PLD_KEEP: keep}, x, pos, state_L=state)
    np.testing.assert_array_equal(r.state["seen"][1], state["seen"][1])  # skipped: as it was
    assert not np.allclose(r.state["seen"][2], state["seen"][2])

    def hidden_loss(p):
        r = scan_layers(blk, p, x, pos, state_L=state, outputs=True)
        return jnp.sum(r.hidden[1] ** 2)  # layer 1's output: layers 0 and 1 get gradients

    np.testing.assert_allclose(scan_layers(blk, p, x, pos, state_L=state,
                                           outputs=True).hidden[-1], h, rtol=1e-5, atol=1e-6)
    g = jax.grad(hidden_loss)(p)
    assert np.abs(g["w"][:2]).sum() > 0 and not np.abs(g["w"][2:]).sum()
    with pytest.raises(ValueError, match="outside a layer scan"):
        set_layer_state("seen", jnp.zeros(2))
