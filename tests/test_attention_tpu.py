"""TPU flash attention (splash attention behind jds's contract) in Pallas interpret mode:
forward and gradients against the reference; any sequence length, GQA/MQA, causal aligned
at the end, segment ids; and the dispatcher's name for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.kernels.attention import dot_product_attention
from jds.kernels.attention.pallas_tpu import flash_attention
from jds.kernels.attention.reference import attention_reference

CASES = [  # B, T, S, N, K, H, causal, segments
    (1, 100, 100, 4, 2, 64, True, False),
    (1, 50, 130, 4, 1, 64, True, False),
    (2, 70, 70, 2, 2, 64, False, True),
]


@pytest.mark.parametrize("B,T,S,N,K,H,causal,seg", CASES)
def test_splash_adapter_matches_reference_forward_and_grad(B, T, S, N, K, H, causal, seg):
    rng = np.random.default_rng(T + S)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
    sid = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32) if seg else None
    w = jnp.cos(jnp.arange(H, dtype=jnp.float32))

    def loss(fn, *x):
        return (fn(*x, causal=causal, segment_ids=sid) * w).sum()

    def kernel(*x, **kw):
        return dot_product_attention(*x, implementation="pallas_tpu_interpret", **kw)

    np.testing.assert_allclose(np.asarray(kernel(q, k, v, causal=causal, segment_ids=sid)),
                               np.asarray(attention_reference(q, k, v, causal=causal,
                                                              segment_ids=sid)), atol=1e-5)
    got = jax.grad(lambda *x: loss(kernel, *x), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *x: loss(attention_reference, *x), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_splash_adapter_shape_errors():
    q = jnp.zeros((1, 8, 6, 64))
    with pytest.raises(ValueError, match="N % K == 0"):
        flash_attention(q, jnp.zeros((1, 8, 4, 64)), jnp.zeros((1, 8, 4, 64)), interpret=True)
    with pytest.raises(ValueError, match="T == S"):
        flash_attention(q[:, :4], jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 8, 2, 64)),
                        segment_ids=jnp.zeros((1, 4), jnp.int32), interpret=True)


@pytest.mark.parametrize("layout", [{"mesh": {"tensor": 2}, "zero_optimization": {"stage": 3}},
                                    pytest.param({"mesh": {"stage": 2, "tensor": 2}},
                                                 marks=pytest.mark.slow)])
def test_kernel_runs_per_shard_under_zero_tensor_and_pipeline(layout):
    """A Pallas call is opaque to XLA's partitioner: the dispatcher maps it over the batch
    and head shards (inside the pipeline's map too); gradients equal one device's."""
    import jds

    def model(impl):
        return jds.models.build("llama-tiny", hidden_size=128, intermediate_size=64,
                                num_attention_heads=2, num_key_value_heads=2,
                                num_hidden_layers=2, vocab_size=64, attention_impl=impl)

    batch = {"input_ids": np.random.default_rng(0).integers(0, 64, (16, 16))}
    config = {"train_batch_size": 16, "gradient_accumulation_steps": 2}
    want, want_loss = jds.initialize(model(None), config, devices=jax.devices()[:1]).gradients(
        batch)
    got, loss = jds.initialize(model("pallas_tpu_interpret"), {**config, **layout}).gradients(
        batch)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)))
