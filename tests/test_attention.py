"""Attention dispatch vs the plain-jnp reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.kernels.attention import attention_reference, dot_product_attention


def naive(q, k, v, causal, seg=None):
    """Loop-free numpy float64 attention with explicit repeat of kv heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    T, S = q.shape[1], k.shape[1]
    mask = np.ones((T, S), bool)
    if causal:
        mask = np.arange(T)[:, None] + (S - T) >= np.arange(S)[None]
    mask = np.broadcast_to(mask, (q.shape[0], 1, T, S))
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("T,S,N,K,causal", [(7, 7, 4, 4, True), (9, 9, 8, 2, True),
                                            (5, 5, 8, 1, False), (3, 11, 4, 2, True)])
def test_dispatch_and_reference_match_naive(T, S, N, K, causal):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, T, N, 16))
    k = jax.random.normal(ks[1], (2, S, K, 16))
    v = jax.random.normal(ks[2], (2, S, K, 16))
    want = naive(q, k, v, causal)
    np.testing.assert_allclose(attention_reference(q, k, v, causal=causal), want, atol=2e-5)
    np.testing.assert_allclose(dot_product_attention(q, k, v, causal=causal), want, atol=2e-5)


def test_segment_ids_and_grads_match_reference():
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (2, 8, 4, 8))
    k = jax.random.normal(ks[1], (2, 8, 2, 8))
    v = jax.random.normal(ks[2], (2, 8, 2, 8))
    seg = jnp.array([[0] * 3 + [1] * 5, [0] * 8])
    out = dot_product_attention(q, k, v, segment_ids=seg)
    np.testing.assert_allclose(out, naive(q, k, v, True, np.asarray(seg)), atol=2e-5)
    f = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v, causal=True) ** 2).sum(), (0, 1, 2))
    got, want = f(dot_product_attention)(q, k, v), f(attention_reference)(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_shape_errors():
    q = jnp.zeros((1, 4, 6, 8))
    k = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match=r"\[B,T,N,H\]"):
        dot_product_attention(q[0], k, k)
