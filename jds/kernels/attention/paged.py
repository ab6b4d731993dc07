"""Paged attention in Pallas: each token of a ragged batch attends over its own sequence's
KV-cache blocks, without gathering them into a dense copy first.

Same contract as :func:`jds.inference.kv_cache.paged_attention_reference` (the reference):
q ``[tokens, heads, head_dim]``, pages ``[num_blocks, block_size, kv_heads, head_dim]``,
a block table per token ``[tokens, max_blocks]`` and each token's position; the token
attends causally to positions ``0..position`` of its sequence; softmax in fp32.

Grid ``(tokens, kv_heads)``: one program holds the ``heads / kv_heads`` query heads that
share a kv head and walks the token's blocks ``0..position // block_size`` (a loop whose
trip count is the token's own context, so short sequences cost little), reading each block
straight from the page pool by its table entry, with an online softmax in fp32. Decode
attention is memory-bound, so the scores are elementwise products and sums (no ``tl.dot``,
which would need 16 query rows per program); block_size and head_dim must be powers of two
for the GPU lowering, and a kv group whose head count is not one (12 heads over 4 kv heads)
is padded to the next power of two with zero query rows.

The reference gathers ``[tokens, max_context, kv_heads, head_dim]`` for every token; this
kernel reads each visible block once per (token, kv head). On CPU it runs with
``interpret=True`` (the tests); on GPU it lowers through Triton (explicit Triton compiler
params: without them jax >= 0.10 picks Mosaic GPU, which rejects this kernel's 16-byte
copies). It has not yet run on a GPU, but its Triton lowering is checked on CPU by
``tests/test_kernel_lowering.py``; the inference engine takes it only when asked
(``attention: "pallas"``). It is a GPU kernel: on TPU the whole-pool block would be copied
into VMEM, so the engine refuses it there; ``paged_tpu.py`` is the TPU kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(q_ref, k_ref, v_ref, t_ref, p_ref, l_ref, o_ref, *, block_size: int,
            scale: float):
    # k_ref/v_ref: the whole stacked pool [layers, blocks, bs, H] of this kv head (a pointer
    # on GPU); l_ref: the layer.
    q = q_ref[...].astype(jnp.float32) * scale  # [G, H]
    G, H = q.shape
    pos = p_ref[0]
    layer = l_ref[0]
    n_blocks = lax.div(pos, block_size) + 1

    def body(j, carry):
        m, l, acc = carry
        blk = t_ref[j]
        k, v = k_ref[layer, blk], v_ref[layer, blk]  # [bs, H]
        if k.dtype == jnp.uint16:  # a CPU cache's raw bits of q's dtype
            k = lax.bitcast_convert_type(k, q_ref.dtype)
            v = lax.bitcast_convert_type(v, q_ref.dtype)
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G, bs]
        kpos = j * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
        s = jnp.where(kpos <= pos, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        l_new = l * corr + jnp.sum(p, axis=-1)
        acc_new = acc * corr[:, None] + jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        return m_new, l_new, acc_new

    init = (jnp.full((G,), _MASK_VALUE, jnp.float32), jnp.zeros((G,), jnp.float32),
            jnp.zeros((G, H), jnp.float32))
    _, l, acc = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def paged_operands(name, q_NQH, k_pages, v_pages, tables_NM, positions_N, layer):
    """Check a paged-attention call's shapes (``name`` leads the error) and return the cache
    as a stack ``[layers, blocks, block_size, kv_heads, head_dim]`` with its layer (a single
    layer's pages become a stack of one, layer 0). Shared by the GPU and TPU kernels."""
    N, Q, H = q_NQH.shape
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    if v_pages.shape != k_pages.shape or k_pages.shape[-1] != H or Q % k_pages.shape[-2]:
        raise ValueError(f"{name}: q {q_NQH.shape}, k_pages {k_pages.shape}, v_pages "
                         f"{v_pages.shape}: need equal page shapes, the same head_dim and heads "
                         "a multiple of kv_heads")
    if tables_NM.shape[0] != N or positions_N.shape != (N,):
        raise ValueError(f"{name}: tables {tables_NM.shape} and positions "
                         f"{positions_N.shape} must have one row per token ({N})")
    return k_pages, v_pages, layer


def paged_attention(
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
    """Causal attention of a flat batch of tokens over their paged KV cache (Pallas).

    Args:
      q_NQH: queries ``[tokens, heads, head_dim]``; heads a multiple of kv_heads.
      k_pages, v_pages: ``[num_blocks, block_size, kv_heads, head_dim]``, or with ``layer``
        the stacked cache ``[layers, num_blocks, ...]`` (read in place, never sliced).
      tables_NM: int32 ``[tokens, max_blocks]``: each token's sequence block table.
      positions_N: int32 ``[tokens]``: each token's position (it sees ``0..position``).
      sm_scale: softmax scale; default ``head_dim ** -0.5``.
      layer: the layer of a stacked cache (an int or a traced scalar), or None.
      interpret: run the Pallas interpreter (any backend; tests on CPU).

    Returns:
      ``[tokens, heads, head_dim]`` in q's dtype.

    Raises:
      ValueError: mismatched shapes.
    """
    k_pages, v_pages, layer = paged_operands("paged_attention", q_NQH, k_pages, v_pages,
                                             tables_NM, positions_N, layer)
    N, Q, H = q_NQH.shape
    L, B, bs, K, _ = k_pages.shape
    if not interpret:
        for name, v in (("block_size", bs), ("head_dim", H)):
            if v & (v - 1):
                raise ValueError(
                    f"paged_attention: {name}={v}; the Triton lowering needs a power of two "
                    "(set kv_block_size accordingly), or use attention='reference'"
                )
    G = Q // K
    # Triton arrays must have power-of-two sizes: pad the query heads of a kv group (e.g. 3
    # for 12 heads over 4 kv heads) with zero rows, sliced off the output.
    Gp = 1 << (G - 1).bit_length()
    M = tables_NM.shape[1]
    scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    q_NKGH = q_NQH.reshape(N, K, G, H)
    if Gp != G:
        q_NKGH = jnp.pad(q_NKGH, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    kernel = functools.partial(_kernel, block_size=bs, scale=scale)
    out = pl.pallas_call(
        kernel,
        grid=(N, K),
        in_specs=[
            pl.BlockSpec((None, None, Gp, H), lambda n, k: (n, k, 0, 0)),
            pl.BlockSpec((L, B, bs, None, H), lambda n, k: (0, 0, 0, k, 0)),
            pl.BlockSpec((L, B, bs, None, H), lambda n, k: (0, 0, 0, k, 0)),
            pl.BlockSpec((None, M), lambda n, k: (n, 0)),
            pl.BlockSpec((1,), lambda n, k: (n,)),
            pl.BlockSpec((1,), lambda n, k: (0,)),
        ],
        out_specs=pl.BlockSpec((None, None, Gp, H), lambda n, k: (n, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((N, K, Gp, H), q_NQH.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        name="jds_paged_attention",
    )(q_NKGH, k_pages, v_pages, tables_NM.astype(jnp.int32), positions_N.astype(jnp.int32),
      jnp.asarray(layer, jnp.int32).reshape(1))
    out = out[:, :, :G] if Gp != G else out
    return out.reshape(N, Q, H)


__all__ = ["paged_attention", "paged_operands"]
