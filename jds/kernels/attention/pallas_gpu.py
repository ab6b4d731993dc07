"""Flash attention in Pallas (Triton backend on GPU), forward and backward.

Same contract as :func:`jds.kernels.attention.reference.attention_reference`: q ``[B, T, N, H]``,
k/v ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention: query head ``n`` reads kv
head ``n // (N // K)``), a causal mask aligned at the end when ``T < S``, optional segment ids
(``T == S``), softmax in fp32, output in q's dtype.

Three kernels, FlashAttention-2 style:

* forward, grid ``(B, N, T / block_q)``: one query block against the kv blocks it can see,
  online softmax with fp32 accumulators; also writes the log-sum-exp of each query row
  (base 2, ``lse2 = m + log2(l)`` on logits pre-multiplied by ``log2(e)``).
* dK/dV, grid ``(B, K, S / block_k_dkv)``: one kv block, looping over the query heads of its
  group and over query blocks; recomputes ``P = exp2(s - lse2)`` and sums the group's
  contributions in fp32 (no per-query-head dK/dV buffer).
* dQ, grid ``(B, N, T / block_q_dq)``: one query block, looping over kv blocks.

``delta = rowsum(dO * O)`` is a plain fused XLA reduction in the wrapper. Sequence lengths are
padded up to the block sizes in the wrapper: padded keys are masked inside the kernels and
padded query rows are sliced off (their zero cotangent makes their backward contribution zero).

On CPU, pass ``interpret=True`` (tests do); the kernels then run through the Pallas
interpreter, with float16 dots done in float32 because XLA:CPU cannot lower fp16 x fp16 -> fp32
dots (the products are exact in fp32, so this only changes rounding of the sums).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)
# Finite so that fully-masked blocks never produce inf - inf = NaN in the online softmax.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_HEAD_DIMS = (64, 128, 256)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MIN_BLOCK = 16  # Triton's tl.dot needs every dimension >= 16.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16) along the sequence axes.

    Attributes:
      block_q: query rows per program in the forward kernel.
      block_k: kv rows per inner-loop step in the forward kernel.
      block_q_dkv: query rows per inner-loop step in the dK/dV kernel.
      block_k_dkv: kv rows per program in the dK/dV kernel.
      block_q_dq: query rows per program in the dQ kernel.
      block_k_dq: kv rows per inner-loop step in the dQ kernel.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 32
    block_q_dq: int = 32
    block_k_dq: int = 32

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        """GPU defaults (untuned starting points) that keep tiles within shared memory.

        Args:
          head_dim: 64, 128 or 256.

        Returns:
          Block sizes: 128x64 forward tiles up to head_dim 128, 64x32 at 256; backward 64x64 at
          head_dim 64, 32x32 above.
        """
        if head_dim <= 64:
            return cls(128, 64, 64, 64, 64, 64)
        if head_dim <= 128:
            return cls(128, 64, 32, 32, 32, 32)
        return cls(64, 32, 32, 32, 32, 32)

    def clamped(self, seq_q: int, seq_kv: int) -> BlockSizes:
        """Shrinks blocks that exceed the (power-of-two rounded) sequence length."""
        cap_q = max(_MIN_BLOCK, pl.next_power_of_2(seq_q))
        cap_k = max(_MIN_BLOCK, pl.next_power_of_2(seq_kv))
        return BlockSizes(
            block_q=min(self.block_q, cap_q),
            block_k=min(self.block_k, cap_k),
            block_q_dkv=min(self.block_q_dkv, cap_q),
            block_k_dkv=min(self.block_k_dkv, cap_k),
            block_q_dq=min(self.block_q_dq, cap_q),
            block_k_dq=min(self.block_k_dq, cap_k),
        )


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) parameters of one flash-attention call."""

    seq_q: int  # real T (before padding)
    seq_kv: int  # real S
    causal: bool
    has_segments: bool
    sm_scale: float
    blocks: BlockSizes
    interpret: bool
    upcast_dots: bool  # fp16 under the CPU interpreter: dot in fp32
    precision: lax.Precision | None  # HIGHEST for fp32 inputs (no tf32 on GPU)

    @property
    def offset(self) -> int:
        """Causal alignment: query ``t`` sees keys ``s <= t + offset``."""
        return self.seq_kv - self.seq_q


def _cost(cfg: _Config, B: int, N: int, H: int, matmuls: int, arrays: list) -> pl.CostEstimate:
    """The kernel's cost for XLA's scheduler and ``jds.profiling``: ``matmuls`` products of
    ``[T, H] x [H, S]`` size per (batch, head), counted dense (no causal discount, as the XLA
    path computes and as MFU counts attention), one exp per score, every operand and result
    read or written once."""
    scores = B * N * cfg.seq_q * cfg.seq_kv
    return pl.CostEstimate(flops=2 * matmuls * scores * H, transcendentals=scores,
                           bytes_accessed=sum(int(a.size) * a.dtype.itemsize for a in arrays))


def _dot(a: jax.Array, b: jax.Array, cfg: _Config, *, trans_a=False, trans_b=False) -> jax.Array:
    """2-D matmul with fp32 accumulation."""
    if cfg.upcast_dots:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return pl.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=cfg.precision)


def _mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    cfg: _Config,
    kv_padded: bool,
) -> jax.Array | None:
    """``[block_q, block_k]`` visibility mask, or None when everything is visible."""
    mask = None

    def _and(m, new):
        return new if m is None else jnp.logical_and(m, new)

    if cfg.causal:
        mask = _and(mask, q_pos[:, None] + cfg.offset >= k_pos[None, :])
    if kv_padded:
        mask = _and(mask, (k_pos < cfg.seq_kv)[None, :])
    if q_seg is not None:
        mask = _and(mask, q_seg[:, None] == k_seg[None, :])
    return mask


def _cdiv(a, b: int):
    """Ceil-division of a traced non-negative int32 by a static int."""
    return lax.div(a + (b - 1), b)


def _num_kv_blocks(q_block_end, block_k: int, cfg: _Config):
    """kv blocks a query block ending (exclusive) at ``q_block_end`` must visit."""
    n_real = pl.cdiv(cfg.seq_kv, block_k)  # skip blocks made only of padding
    if not cfg.causal:
        return n_real
    return jnp.minimum(n_real, _cdiv(q_block_end + cfg.offset, block_k))


# --------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config, kv_padded: bool):
    if cfg.has_segments:
        qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    block_q, block_k = cfg.blocks.block_q, cfg.blocks.block_k
    head_dim = q_ref.shape[-1]
    qi = pl.program_id(2)
    q_pos = qi * block_q + jnp.arange(block_q)
    q = q_ref[...]
    q_seg = qseg_ref[...] if cfg.has_segments else None
    qk_scale = cfg.sm_scale * _LOG2E

    def body(j, carry):
        acc, m_prev, l_prev = carry
        k_slice = pl.ds(j * block_k, block_k)
        k = k_ref[k_slice, :]
        v = v_ref[k_slice, :]
        s = _dot(q, k, cfg, trans_b=True) * qk_scale  # [block_q, block_k], log2 domain
        k_seg = kseg_ref[k_slice] if cfg.has_segments else None
        mask = _mask(q_pos, j * block_k + jnp.arange(block_k), q_seg, k_seg, cfg, kv_padded)
        if mask is not None:
            s = jnp.where(mask, s, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = correction * l_prev + jnp.sum(p, axis=-1)
        acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, cfg)
        return acc, m_next, l_next

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    n_kv = _num_kv_blocks((qi + 1) * block_q, block_k, cfg)
    acc, m, l = lax.fori_loop(0, n_kv, body, carry)
    # Every real query row sees at least one real key (causal needs T <= S; segment ids let a
    # row see itself), so l >= 1 there; padded rows are finite and dropped by the wrapper.
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _forward(q, k, v, q_seg, k_seg, cfg: _Config):
    """Runs the forward kernel on padded inputs; returns (out, lse2 ``[B, N, T_pad]``)."""
    B, T_pad, N, H = q.shape
    S_pad, K = k.shape[1], k.shape[2]
    G = N // K
    bq = cfg.blocks.block_q
    grid = (B, N, T_pad // bq)
    in_specs = [
        pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
        pl.BlockSpec((None, S_pad, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0)),
        pl.BlockSpec((None, S_pad, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0)),
    ]
    args = [q, k, v]
    if cfg.has_segments:
        in_specs += [  # q segment ids per query block, kv segment ids whole
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, S_pad), lambda b, n, i: (b, 0)),
        ]
        args += [q_seg, k_seg]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, kv_padded=S_pad != cfg.seq_kv)
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, N, T_pad), jnp.float32),
        ],
        compiler_params=_compiler_params(bq * cfg.blocks.block_k, H, cfg),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, B, N, H, 2, [*args, q, q]),  # QK^T, PV; reads, writes O
        name="jds_flash_attention_fwd",
    )(*args)
    return out, lse


def _compiler_params(tile_elems: int, head_dim: int, cfg: _Config):
    """Triton launch parameters (ignored by the interpreter)."""
    if cfg.interpret:
        return None
    num_warps = 4 if tile_elems <= 64 * 64 and head_dim <= 64 else 8
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


# --------------------------------------------------------------------------------------------
# Backward.


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, kv_padded):
    if cfg.has_segments:
        qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    block_q, block_k = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    G, head_dim = q_ref.shape[1], q_ref.shape[2]
    kj = pl.program_id(2)
    k_pos = kj * block_k + jnp.arange(block_k)
    k = k_ref[...]
    v = v_ref[...]
    k_seg = kseg_ref[...] if cfg.has_segments else None
    qk_scale = cfg.sm_scale * _LOG2E
    n_q = pl.cdiv(cfg.seq_q, block_q)  # skip query blocks made only of padding
    if cfg.causal:
        # First query row that sees this kv block's first key: t + offset >= kj * block_k.
        lo = lax.div(jnp.maximum(kj * block_k - cfg.offset, 0), block_q)
    else:
        lo = 0

    def q_body(i, carry, g):
        dk, dv = carry
        q_slice = pl.ds(i * block_q, block_q)
        q = q_ref[q_slice, g, :]
        do = do_ref[q_slice, g, :]
        lse = lse_ref[g, q_slice]
        delta = delta_ref[g, q_slice]
        s = _dot(q, k, cfg, trans_b=True) * qk_scale
        p = jnp.exp2(s - lse[:, None])  # [block_q, block_k]
        q_seg = qseg_ref[q_slice] if cfg.has_segments else None
        mask = _mask(i * block_q + jnp.arange(block_q), k_pos, q_seg, k_seg, cfg, kv_padded)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, cfg, trans_a=True)
        dp = _dot(do, v, cfg, trans_b=True)
        ds = p * (dp - delta[:, None]) * cfg.sm_scale
        dk = dk + _dot(ds.astype(q.dtype), q, cfg, trans_a=True)
        return dk, dv

    def g_body(g, carry):
        return lax.fori_loop(lo, n_q, functools.partial(q_body, g=g), carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, G, g_body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, kv_padded):
    if cfg.has_segments:
        qseg_ref, kseg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    block_q, block_k = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    head_dim = q_ref.shape[-1]
    qi = pl.program_id(2)
    q_pos = qi * block_q + jnp.arange(block_q)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_seg = qseg_ref[...] if cfg.has_segments else None
    qk_scale = cfg.sm_scale * _LOG2E

    def body(j, dq):
        k_slice = pl.ds(j * block_k, block_k)
        k = k_ref[k_slice, :]
        v = v_ref[k_slice, :]
        s = _dot(q, k, cfg, trans_b=True) * qk_scale
        p = jnp.exp2(s - lse[:, None])
        k_seg = kseg_ref[k_slice] if cfg.has_segments else None
        mask = _mask(q_pos, j * block_k + jnp.arange(block_k), q_seg, k_seg, cfg, kv_padded)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, cfg, trans_b=True)
        ds = p * (dp - delta[:, None]) * cfg.sm_scale
        return dq + _dot(ds.astype(k.dtype), k, cfg)

    n_kv = _num_kv_blocks((qi + 1) * block_q, block_k, cfg)
    dq = lax.fori_loop(0, n_kv, body, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward_kernels(q, k, v, q_seg, k_seg, out, lse, do, cfg: _Config):
    """dQ, dK, dV for padded inputs (``do`` zero on padded query rows)."""
    B, T_pad, N, H = q.shape
    S_pad, K = k.shape[1], k.shape[2]
    G = N // K
    kv_padded = S_pad != cfg.seq_kv
    # delta = rowsum(dO * O): one fused XLA reduction, [B, N, T_pad] fp32.
    delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), out.astype(jnp.float32))

    # dK/dV: one program per (batch, kv head, kv block), looping over the group's query heads.
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    in_specs = [
        pl.BlockSpec((None, T_pad, G, H), lambda b, h, j: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
        pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
        pl.BlockSpec((None, T_pad, G, H), lambda b, h, j: (b, 0, h, 0)),
        pl.BlockSpec((None, G, T_pad), lambda b, h, j: (b, h, 0)),
        pl.BlockSpec((None, G, T_pad), lambda b, h, j: (b, h, 0)),
    ]
    args = [q, k, v, do, lse, delta]
    if cfg.has_segments:
        in_specs += [  # q segment ids whole, kv segment ids per kv block
            pl.BlockSpec((None, T_pad), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
        ]
        args += [q_seg, k_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, kv_padded=kv_padded),
        grid=(B, K, S_pad // bk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_compiler_params(bq * bk, H, cfg),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, B, N, H, 4, [*args, k, v]),  # QK^T, dP, dV, dK
        name="jds_flash_attention_dkdv",
    )(*args)

    # dQ: one program per (batch, query head, query block), looping over kv blocks.
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    in_specs = [
        pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
        pl.BlockSpec((None, S_pad, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0)),
        pl.BlockSpec((None, S_pad, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0)),
        pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
    ]
    args = [q, k, v, do, lse, delta]
    if cfg.has_segments:
        in_specs += [  # q segment ids per query block, kv segment ids whole
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, S_pad), lambda b, n, i: (b, 0)),
        ]
        args += [q_seg, k_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, kv_padded=kv_padded),
        grid=(B, N, T_pad // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(bq * bk, H, cfg),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, B, N, H, 3, [*args, q]),  # QK^T, dP, dQ
        name="jds_flash_attention_dq",
    )(*args)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom_vjp over padded inputs.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, k_seg, cfg: _Config):
    return _forward(q, k, v, q_seg, k_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, cfg: _Config):
    out, lse = _forward(q, k, v, q_seg, k_seg, cfg)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, q_seg, k_seg, out, lse = res
    dq, dk, dv = _backward_kernels(q, k, v, q_seg, k_seg, out, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis1(x: jax.Array, to: int, value=0) -> jax.Array:
    extra = to - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _validate(q, k, v, segment_ids, causal, blocks: BlockSizes | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"flash_attention: {name} must have rank 4 ([batch, seq, heads, head_dim]); "
                f"got shape {x.shape}"
            )
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise ValueError(
                f"flash_attention: {name} dtype {x.dtype} unsupported; use bfloat16, float16 "
                "or float32"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); "
            "cast them to one dtype"
        )
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must have one shape")
    B, T, N, H = q.shape
    if k.shape[0] != B:
        raise ValueError(f"flash_attention: batch of q ({B}) and k ({k.shape[0]}) differ")
    if k.shape[3] != H:
        raise ValueError(f"flash_attention: head_dim of q ({H}) and k/v ({k.shape[3]}) differ")
    if H not in _HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {H} unsupported; use one of {_HEAD_DIMS}")
    if N % k.shape[2]:
        raise ValueError(
            f"flash_attention: q heads ({N}) must be a multiple of k/v kv_heads ({k.shape[2]})"
        )
    S = k.shape[1]
    if causal and T > S:
        raise ValueError(
            f"flash_attention: causal needs seq_q ({T}) <= seq_kv ({S}) (the mask is aligned "
            "at the end, so earlier query rows would see no key)"
        )
    if segment_ids is not None:
        if T != S:
            raise ValueError(f"flash_attention: segment_ids need seq_q == seq_kv; got {T} and {S}")
        if segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"flash_attention: segment_ids must be integers of shape {(B, T)}; got "
                f"{segment_ids.dtype}{tuple(segment_ids.shape)}"
            )
    if blocks is not None:
        for field in dataclasses.fields(blocks):
            size = getattr(blocks, field.name)
            if size < _MIN_BLOCK or size & (size - 1):
                raise ValueError(
                    f"flash_attention: block_sizes.{field.name}={size} must be a power of two "
                    f">= {_MIN_BLOCK}"
                )


def flash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Flash attention (Pallas kernels, differentiable) with GQA, causal and segment masks.

    Args:
      q_BTNH: queries ``[batch, seq_q, heads, head_dim]``; head_dim 64, 128 or 256.
      k_BSKH: keys ``[batch, seq_kv, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
      v_BSKH: values, same shape and dtype as keys.
      causal: query ``t`` sees keys ``s <= t + seq_kv - seq_q`` (aligned at the end, as the
        reference); needs ``seq_q <= seq_kv``.
      segment_ids: optional ``[batch, seq]`` integer packing ids, shared by queries and keys
        (needs ``seq_q == seq_kv``); a query sees only keys of its own segment.
      sm_scale: softmax scale, default ``head_dim ** -0.5``.
      block_sizes: tile sizes; default :meth:`BlockSizes.for_head_dim`. Blocks larger than the
        sequence are shrunk to it (rounded up to a power of two, at least 16).
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns:
      ``[batch, seq_q, heads, head_dim]`` in q's dtype.

    Raises:
      ValueError: on bad ranks, shapes, dtypes, head_dim, block sizes or masks.
    """
    q, k, v = q_BTNH, k_BSKH, v_BSKH
    _validate(q, k, v, segment_ids, causal, block_sizes)
    T, H = q.shape[1], q.shape[3]
    S = k.shape[1]
    blocks = (block_sizes or BlockSizes.for_head_dim(H)).clamped(T, S)
    dtype = jnp.dtype(q.dtype)
    cfg = _Config(
        seq_q=T,
        seq_kv=S,
        causal=causal,
        has_segments=segment_ids is not None,
        sm_scale=float(H**-0.5 if sm_scale is None else sm_scale),
        blocks=blocks,
        interpret=interpret,
        upcast_dots=interpret and dtype == jnp.float16 and jax.default_backend() == "cpu",
        precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None,
    )
    # Blocks are powers of two, so the largest one along an axis is a multiple of the others.
    q_mult = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    k_mult = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
    T_pad, S_pad = pl.cdiv(T, q_mult) * q_mult, pl.cdiv(S, k_mult) * k_mult
    q_seg = k_seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg = _pad_axis1(seg, T_pad, value=-1)
        k_seg = _pad_axis1(seg, S_pad, value=-1)  # padded keys are masked anyway
    out = _flash(
        _pad_axis1(q, T_pad), _pad_axis1(k, S_pad), _pad_axis1(v, S_pad), q_seg, k_seg, cfg
    )
    return out[:, :T]


__all__ = ["BlockSizes", "flash_attention"]
