"""Paged attention for TPU in Pallas (Mosaic): each token of a ragged batch attends over its
own sequence's KV-cache blocks, read straight from HBM by DMA.

Same contract as :func:`jds.inference.kv_cache.paged_attention_reference` and the GPU kernel
(:mod:`jds.kernels.attention.paged`): q ``[tokens, heads, head_dim]``, the cache either one
layer's ``[num_blocks, block_size, kv_heads, head_dim]`` or the engine's stacked
``[layers, num_blocks, ...]`` with ``layer``; a block table and a position per token; causal
over ``0..position``; softmax in fp32.

Why not the GPU kernel: it hands the kernel the whole page pool as one block, which Triton
sees as a pointer; Mosaic would copy that block into VMEM (a few MiB at most), so on TPU the
pool stays in HBM (``memory_space=ANY``) and the kernel copies only the blocks a token
reads. Why not JAX's ``ragged_paged_attention``: it wants k and v interleaved in one
``[pages, page_size, 2 * kv_heads, head_dim]`` cache and sequence-grouped queries, and it
looks up the TPU generation while lowering; this kernel takes the engine's cache as it is.

Grid ``(tokens,)``; the block tables, positions and layer are scalar-prefetched into SMEM.
A program walks its token's blocks ``0..position // block_size`` and, for each, copies the
``[block_size, kv_heads, head_dim]`` K and V tiles into VMEM (two buffers: the copy of block
``j + 1`` is in flight while block ``j`` is used), then runs an online softmax per kv head
over the ``heads / kv_heads`` query heads that share it. Tested on CPU with TPU interpret
mode (``interpret=True``: DMAs and semaphores simulated) and lowered for TPU from the CPU
host; not yet run on a TPU, so the engine takes it only when asked
(``attention: "pallas_tpu"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jds.kernels.attention.paged import paged_operands

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(tables_ref, pos_ref, layer_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems,
            *, block_size: int, kv_heads: int, scale: float):
    n = pl.program_id(0)
    pos = pos_ref[n]
    layer = layer_ref[0]
    # lax.div/rem, not // and %: Python's floor semantics lower through sign(), which Mosaic
    # lowers per TPU generation (and so not from a CPU host); pos and j are >= 0 anyway.
    n_blocks = lax.div(pos, block_size) + 1
    Q, H = q_ref.shape
    G = Q // kv_heads

    def copies(j, slot):
        blk = tables_ref[n, j]
        return (pltpu.make_async_copy(k_hbm.at[layer, blk], k_buf.at[slot], sems.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[layer, blk], v_buf.at[slot], sems.at[1, slot]))

    for c in copies(0, 0):
        c.start()
    q = q_ref[...].astype(jnp.float32) * scale  # [Q, H]

    def body(j, carry):
        slot = lax.rem(j, 2)
        for c in copies(j, slot):
            c.wait()

        @pl.when(j + 1 < n_blocks)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        k_SKH = k_buf[slot].astype(jnp.float32)  # [bs, K, H]
        v_SKH = v_buf[slot].astype(jnp.float32)
        kpos = j * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
        visible = kpos <= pos  # [1, bs]
        out = []
        for h in range(kv_heads):
            m, l, acc = carry[h]
            q_GH = q[h * G:(h + 1) * G]
            s = lax.dot_general(q_GH, k_SKH[:, h, :], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [G, bs]
            s = jnp.where(visible, s, _MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))  # [G, 1]
            p = jnp.exp(s - m_new)
            corr = jnp.exp(m - m_new)
            l_new = l * corr + jnp.sum(p, axis=-1, keepdims=True)
            acc_new = acc * corr + jnp.dot(p, v_SKH[:, h, :],
                                           preferred_element_type=jnp.float32)  # [G, H]
            out.append((m_new, l_new, acc_new))
        return tuple(out)

    init = tuple((jnp.full((G, 1), _MASK_VALUE, jnp.float32), jnp.zeros((G, 1), jnp.float32),
                  jnp.zeros((G, H), jnp.float32)) for _ in range(kv_heads))
    final = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = jnp.concatenate([acc / l for _, l, acc in final], axis=0).astype(o_ref.dtype)


def paged_attention_tpu(
    q_NQH: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    tables_NM: jax.Array,
    positions_N: jax.Array,
    *,
    sm_scale: float | None = None,
    layer: jax.Array | int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of a flat batch of tokens over their paged KV cache (Pallas, TPU).

    Args:
      q_NQH: queries ``[tokens, heads, head_dim]``; heads a multiple of kv_heads.
      k_pages, v_pages: ``[num_blocks, block_size, kv_heads, head_dim]``, or with ``layer``
        the stacked ``[layers, num_blocks, ...]`` (left in HBM; blocks are copied by DMA).
      tables_NM: int32 ``[tokens, max_blocks]``: each token's sequence block table.
      positions_N: int32 ``[tokens]``: each token's position (it sees ``0..position``).
      sm_scale: softmax scale; default ``head_dim ** -0.5``.
      layer: the layer of a stacked cache (an int or a traced scalar), or None.
      interpret: run in TPU interpret mode (any backend; DMAs simulated), for tests.

    Returns:
      ``[tokens, heads, head_dim]`` in q's dtype.

    Raises:
      ValueError: mismatched shapes, or a cache stored as uint16 bits (a CPU engine's).
    """
    k_pages, v_pages, layer = paged_operands("paged_attention_tpu", q_NQH, k_pages, v_pages,
                                             tables_NM, positions_N, layer)
    N, Q, H = q_NQH.shape
    _, _, bs, K, _ = k_pages.shape
    if k_pages.dtype == jnp.uint16:
        raise ValueError("paged_attention_tpu reads float caches; this one holds uint16 bits "
                         "(a CPU engine's storage): use attention='reference' on CPU")
    scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    kernel = functools.partial(_kernel, block_size=bs, kv_heads=K, scale=scale)
    page = pltpu.VMEM((2, bs, K, H), k_pages.dtype)
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(N,),
            in_specs=[pl.BlockSpec((None, Q, H), lambda n, *_: (n, 0, 0)),
                      pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((None, Q, H), lambda n, *_: (n, 0, 0)),
            scratch_shapes=[page, page, pltpu.SemaphoreType.DMA((2, 2))],
        ),
        out_shape=jax.ShapeDtypeStruct((N, Q, H), q_NQH.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jds_paged_attention_tpu",
    )
    return call(tables_NM.astype(jnp.int32), positions_N.astype(jnp.int32),
                jnp.asarray(layer, jnp.int32).reshape(1), q_NQH, k_pages, v_pages)


__all__ = ["paged_attention_tpu"]
