"""Reference attention in plain ``jnp``: the spec every fast path is tested against.

Softmax is computed in fp32 whatever the input dtype; the result is cast back to q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Multi-head / grouped-query attention.

    Args:
      q_BTNH: queries ``[batch, seq_q, heads, head_dim]``.
      k_BSKH: keys ``[batch, seq_kv, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
      v_BSKH: values, same shape as keys.
      causal: mask keys after the query position (positions aligned at the end when
        ``seq_q < seq_kv``, as in decoding with a cache).
      segment_ids: ``[batch, seq]`` ints; a query attends only to keys of its segment
        (requires ``seq_q == seq_kv``).
      sm_scale: softmax scale, default ``head_dim ** -0.5``.

    Returns:
      ``[batch, seq_q, heads, head_dim]`` in q's dtype.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"heads ({N}) must be a multiple of kv_heads ({K})")
    scale = H**-0.5 if sm_scale is None else sm_scale
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H).astype(jnp.float32)
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(jnp.float32)) * scale
    mask_TS = jnp.ones((T, S), dtype=bool)
    if causal:
        mask_TS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
    mask = mask_TS[None, None, None]
    if segment_ids is not None:
        if T != S:
            raise ValueError("segment_ids need seq_q == seq_kv")
        seg_BTS = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & seg_BTS[:, None, None]
    s_BKGTS = jnp.where(mask, s_BKGTS, -1e30)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS, v_BSKH.astype(jnp.float32))
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
