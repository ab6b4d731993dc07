"""Flash attention on TPU: jds's attention contract over JAX's Pallas/Mosaic splash attention.

JAX ships a maintained TPU flash-attention kernel, splash attention
(``jax.experimental.pallas.ops.tpu.splash_attention``: forward and backward kernels, block-
sparse masks, GQA through its MQA variant). Writing another Mosaic kernel would duplicate
it, so this module adapts it to :func:`jds.kernels.attention.reference.attention_reference`'s
contract instead:

- layout ``[batch, seq, heads, head_dim]`` (splash wants ``[heads, seq, head_dim]`` per
  batch element): transposed here, the kernel ``vmap`` ped over batch and kv heads, each
  call the MQA kernel for the ``heads / kv_heads`` query heads sharing one kv head;
- ``sm_scale`` (splash computes ``q k^T`` unscaled): q is scaled first, in fp32;
- a causal mask aligned at the end when ``seq_q < seq_kv`` (splash ``CausalMask`` offset);
- any sequence length: both are padded to the block size; padded keys carry a segment id
  no query has, and padded query rows are sliced off;
- segment ids passed through as splash ``SegmentIds``.

Gradients come from splash's own ``custom_vjp`` (its dq and dkv kernels). On CPU the
kernel runs with ``interpret=True`` (tests). On TPU it is opt-in
(``dot_product_attention(..., implementation="pallas_tpu")``) until it has run there
under the models' sharding (a Pallas call needs a ``shard_map`` over batch and heads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

_BLOCK = 128  # splash's tiles are multiples of 128 along both sequence axes


@functools.lru_cache(maxsize=64)
def _kernel(T: int, S: int, G: int, causal: bool, block: int, interpret: bool):
    if causal:
        one = splash.CausalMask((T, S), offset=S - T)
    else:
        one = splash.FullMask((T, S))
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Concrete mask metadata even when first built under a trace: the kernel is cached and
    # reused across traces, so it must not hold tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa_single_device(
            splash.MultiHeadMask([one] * G), block_sizes=sizes, interpret=interpret)


def flash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block: int = _BLOCK,
    interpret: bool = False,
) -> jax.Array:
    """Attention with the reference's contract, computed by splash attention (TPU).

    Args:
      q_BTNH: queries ``[B, T, N, H]``.
      k_BSKH, v_BSKH: ``[B, S, K, H]`` with ``N % K == 0``.
      causal: causal mask, aligned at the end when ``T < S``.
      segment_ids: optional ``[B, T]`` packing ids (``T == S``).
      sm_scale: softmax scale; default ``H ** -0.5``.
      block: tile size along both sequence axes (a multiple of 128 on TPU).
      interpret: run the Pallas interpreter (any backend; tests on CPU).

    Returns:
      ``[B, T, N, H]`` in q's dtype.

    Raises:
      ValueError: mismatched shapes, or segment ids with ``T != S``.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K or v_BSKH.shape != k_BSKH.shape or k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"attention expects q [B,T,N,H] and k, v [B,S,K,H] with N % K == 0; "
                         f"got {q_BTNH.shape}, {k_BSKH.shape}, {v_BSKH.shape}")
    if segment_ids is not None and (T != S or segment_ids.shape != (B, T)):
        raise ValueError(f"segment_ids must be [B, T] with T == S; got {segment_ids.shape} "
                         f"for T={T}, S={S}")
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    Tp, Sp = -(-T // block) * block, -(-S // block) * block
    # Padding at the front keeps the causal diagonal (aligned at the end) where it was.
    q = jnp.pad((q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype),
                ((0, 0), (Tp - T, 0), (0, 0), (0, 0)))
    k = jnp.pad(k_BSKH, ((0, 0), (Sp - S, 0), (0, 0), (0, 0)))
    v = jnp.pad(v_BSKH, ((0, 0), (Sp - S, 0), (0, 0), (0, 0)))
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg_q = jnp.pad(seg if T == S else jnp.zeros((B, T), jnp.int32), ((0, 0), (Tp - T, 0)),
                    constant_values=-1)  # padded query rows: their own segment
    seg_kv = jnp.pad(seg if T == S else jnp.zeros((B, S), jnp.int32), ((0, 0), (Sp - S, 0)),
                     constant_values=-2)  # padded keys: a segment no query has
    kernel = _kernel(Tp, Sp, G, causal, block, interpret)

    def one(q_GTH, k_SH, v_SH, sq, skv):
        return kernel(q_GTH, k_SH, v_SH, segment_ids=splash.SegmentIds(q=sq, kv=skv))

    q_BKGTH = q.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0))(q_BKGTH, k_BKSH, v_BKSH, seg_q, seg_kv)
    out_BTNH = out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, Tp - T:]
    return out_BTNH.astype(q_BTNH.dtype)


__all__ = ["flash_attention"]
