"""Attention dispatch: the one function every model calls.

``dot_product_attention`` picks an implementation by backend. Today that is XLA's
``jax.nn.dot_product_attention`` everywhere (it handles grouped-query attention natively and
lets XLA fuse); jds's Pallas flash attention (``pallas_gpu.py``, forward and backward) is
selected with ``implementation="pallas"`` until a GPU measurement makes it the default there.
``attention_reference`` is the spec each entry is tested against.

On the CPU backend, float16 attention is computed in float32 and cast back: XLA:CPU cannot
lower the fp16 x fp16 -> fp32 dots of its backward pass ("precision F16_F16_F32 is not
supported"), and CPUs have no fast fp16 arithmetic to lose anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jds.kernels.attention.reference import attention_reference


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Attention with ``[batch, seq, heads, head_dim]`` layout and GQA support.

    Args:
      q_BTNH: queries; ``heads`` must be a multiple of ``kv_heads``.
      k_BSKH: keys ``[batch, seq_kv, kv_heads, head_dim]``.
      v_BSKH: values, same shape as keys.
      causal: causal mask (aligned at the end when ``seq_q < seq_kv``).
      segment_ids: optional ``[batch, seq]`` packing ids (needs ``seq_q == seq_kv``).
      sm_scale: softmax scale; default ``head_dim ** -0.5``.
      implementation: ``None``/``"xla"`` (XLA, today's default everywhere), ``"pallas"``
        (jds's Pallas flash attention, ``pallas_gpu.flash_attention``; GPU),
        ``"pallas_tpu"`` (splash attention behind ``pallas_tpu.flash_attention``; TPU), or
        ``"pallas_interpret"`` / ``"pallas_tpu_interpret"`` (the same kernels interpreted:
        any backend, for testing). The kernels become their backend's default once they
        have run there: a Pallas call is opaque to XLA's partitioner, so under data or
        tensor parallelism each needs a ``shard_map`` over the batch and head axes first.

    Returns:
      ``[batch, seq_q, heads, head_dim]`` in q's dtype.

    Raises:
      ValueError: on mismatched shapes.
    """
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
        raise ValueError(
            f"attention expects q [B,T,N,H] and k, v [B,S,K,H]; got {q_BTNH.shape}, "
            f"{k_BSKH.shape}, {v_BSKH.shape}"
        )
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(
            f"heads ({q_BTNH.shape[2]}) must be a multiple of kv_heads ({k_BSKH.shape[2]})"
        )
    if implementation in ("pallas", "pallas_interpret"):
        from jds.kernels.attention.pallas_gpu import flash_attention

        return flash_attention(q_BTNH, k_BSKH, v_BSKH, causal=causal, segment_ids=segment_ids,
                               sm_scale=sm_scale, interpret=implementation == "pallas_interpret")
    if implementation in ("pallas_tpu", "pallas_tpu_interpret"):
        from jds.kernels.attention.pallas_tpu import flash_attention as splash_attention

        return splash_attention(q_BTNH, k_BSKH, v_BSKH, causal=causal, segment_ids=segment_ids,
                                sm_scale=sm_scale,
                                interpret=implementation == "pallas_tpu_interpret")
    if implementation not in (None, "xla"):
        raise ValueError(f"implementation must be None, 'xla', 'pallas', 'pallas_interpret', "
                         f"'pallas_tpu' or 'pallas_tpu_interpret'; got {implementation!r}")
    if q_BTNH.dtype == jnp.float16 and jax.default_backend() == "cpu":
        f32 = [x.astype(jnp.float32) for x in (q_BTNH, k_BSKH, v_BSKH)]
        out = dot_product_attention(
            *f32, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
        return out.astype(jnp.float16)
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if segment_ids is not None or (causal and T != S):
        # XLA's entry has no end-aligned causal mask nor segment ids: use the reference
        # formulation (also plain XLA ops, fused by the compiler).
        return attention_reference(
            q_BTNH, k_BSKH, v_BSKH, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, scale=sm_scale, is_causal=causal, implementation="xla"
    )


__all__ = ["attention_reference", "dot_product_attention"]
