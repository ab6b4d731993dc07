"""Pallas kernels for int8 matmuls: weight-only W8A16 and W8A8 (int8 x int8 -> int32).

Layout: grid over ``(M // block_m, N // block_n)`` output tiles, both axes independent
("parallel"). Each program sees the whole K extent of its x rows (block ``[block_m, K]``) and of
its weight columns (block ``[K, block_n]``) and walks K in ``block_k`` steps with a
``lax.fori_loop`` carrying an fp32 (W8A16) or int32 (W8A8) accumulator in registers. That form
is chosen because it lowers everywhere we need it:

* interpret mode (CPU tests): the loop is ordinary JAX;
* Triton (GPU): refs are pointers, so ``ref[pl.ds(k * block_k, block_k)]`` loads only that
  K slice; a K *grid* axis with a revisited output block would race on GPU, where every grid
  axis runs in parallel, and the Triton lowering has no scratch accumulators;
* Mosaic (TPU): the full-K blocks live in VMEM (``K * block_n`` int8 bytes, e.g. 1 MiB for
  K = 8192, block_n = 128), which fits; the K loop then runs out of VMEM without DMA overlap.

Dequantization happens in registers: the int8 weight tile is cast to x's dtype (exact: |q| <=
127 fits every float format's mantissa), multiplied on the matrix unit with fp32 accumulation,
and the scale of the channel/group is applied to that fp32 partial product. That is the same
arithmetic as ``x @ (q * scale)`` without rounding ``q * scale`` to bf16, and costs one multiply
per output element instead of one per weight element. Per-group scales need every K block
inside one group, so ``block_k`` must divide ``group_size``.

Shapes: M may be anything (the wrapper pads it to a multiple of ``block_m`` with zero rows and
slices them off; the decode case M = 1..16 runs one 16-row tile). K and N must be multiples of
``block_k`` / ``block_n``: the wrapper raises a ValueError naming the dims otherwise (padding
the weight on every call would copy it, which is the cost this kernel exists to avoid).

The W8A16 kernel is differentiable in x and the scales (a custom VJP in plain XLA; the int8
weight gets no cotangent), so adapters can be trained over frozen int8 weights; W8A8 is
inference-only.

On GPU the kernels are lowered through Triton (``jax.experimental.pallas.triton``
``CompilerParams``); without that jax >= 0.10 defaults to Mosaic GPU, whose ``pallas_call``
path is deprecated. Triton needs power-of-two tiles of at least 16 per dot dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jds.kernels.platform import is_gpu, target_platform
from jds.kernels.quant.reference import check_int8_matmul_args, check_w8a8_args

_DEFAULT_BLOCK_N = 128
_DEFAULT_BLOCK_K = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one kernel launch (static; hashable so it can key the jit cache).

    Attributes:
      block_m: rows of x per program (M is padded up to a multiple of it).
      block_n: output columns per program; must divide N.
      block_k: K step of the in-kernel loop; must divide K (and ``group_size`` if grouped).
    """

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int; got {v!r}")

    def check(self, k: int, n: int, group_size: int | None) -> None:
        """Raise a ValueError naming the dim a block does not divide."""
        if n % self.block_n:
            raise ValueError(
                f"N={n} must be a multiple of block_n={self.block_n}; pass a block_n dividing "
                f"N (a power of two >= 16 on GPU)"
            )
        if k % self.block_k:
            raise ValueError(
                f"K={k} must be a multiple of block_k={self.block_k}; pass a block_k dividing K"
            )
        if group_size is not None and group_size % self.block_k:
            raise ValueError(
                f"block_k={self.block_k} must divide group_size={group_size} so each K step "
                "lies in one scale group"
            )


def _largest_pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    return math.gcd(n, cap) if cap & (cap - 1) == 0 else 1


def _default_block_m(m: int) -> int:
    # Skinny M (decode) gets the smallest tile the matrix units accept.
    for b in (16, 32, 64):
        if m <= b:
            return b
    return 128


def resolve_block_sizes(
    m: int,
    k: int,
    n: int,
    group_size: int | None,
    block_m: int | None,
    block_n: int | None,
    block_k: int | None,
) -> BlockSizes:
    """Fill unset tile sizes with defaults for this problem and validate them.

    Defaults: ``block_m`` the smallest of 16/32/64/128 covering M (capped at 128),
    ``block_n`` / ``block_k`` the largest power of two <= 128 dividing N / K (and
    ``group_size``). Explicit values are validated, never silently changed.

    Raises:
      ValueError: when a block does not divide its dim (naming both).
    """
    if block_k is None:
        block_k = _largest_pow2_divisor(k if group_size is None else group_size, _DEFAULT_BLOCK_K)
    blocks = BlockSizes(
        block_m=_default_block_m(m) if block_m is None else block_m,
        block_n=_largest_pow2_divisor(n, _DEFAULT_BLOCK_N) if block_n is None else block_n,
        block_k=block_k,
    )
    blocks.check(k, n, group_size)
    return blocks


def _target(platform: str | None) -> str:
    """The platform the kernel is built for: ``platform``, else ``target_platform()``."""
    target = target_platform() if platform is None else platform
    if target not in ("gpu", "cuda", "rocm", "tpu", "cpu"):
        raise ValueError(f"platform={platform!r}: use 'gpu', 'cuda', 'rocm' or 'tpu'")
    return target


def _check_backend(blocks: BlockSizes, interpret: bool, target: str) -> None:
    """Fail early, outside jit: no compiled kernel on CPU; Triton's tile limits on GPU."""
    if interpret:
        return
    _compiler_params(False, target)
    if is_gpu(target):
        for name, v in dataclasses.asdict(blocks).items():
            if v < 16 or v & (v - 1):
                raise ValueError(
                    f"{name}={v}: the Triton lowering needs power-of-two tiles >= 16; pass an "
                    "explicit block dividing the dim, or pad K/N of the weight once at load time"
                )


def _compiler_params(interpret: bool, target: str):
    """Backend compiler params: Triton on GPU (not the Mosaic GPU default), parallel on TPU."""
    if interpret:
        return None
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    if is_gpu(target):
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=3)
    raise ValueError(
        f"the Pallas int8 kernels compile only on GPU/TPU; backend is {target!r}. Pass "
        "interpret=True to run them on CPU, use the jds.kernels.quant dispatchers "
        "(which take the XLA reference on CPU), or pass platform='gpu'/'tpu' to lower for "
        "another platform ahead of time"
    )


def _pad_rows(x_MK: jax.Array, block_m: int) -> jax.Array:
    pad = -x_MK.shape[0] % block_m
    return jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK


# --------------------------------------------------------------------------------------------
# W8A16: float x, int8 weight.


def _w8a16_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k, group_size, precision):
    # x_ref [bm, K] x.dtype; w_ref [K, bn] int8; s_ref [1 or K // g, bn] f32; o_ref [bm, bn].
    bm, bn = o_ref.shape
    num_k = x_ref.shape[1] // block_k

    def body(kb, acc_MN):
        start = pl.multiple_of(kb * block_k, block_k)
        x_MK = x_ref[:, pl.ds(start, block_k)]
        w_KN = w_ref[pl.ds(start, block_k), :].astype(x_MK.dtype)  # exact: |q| <= 127
        part = jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32, precision=precision)
        if group_size is not None:
            part = part * s_ref[pl.ds(jax.lax.div(start, group_size), 1), :].astype(jnp.float32)
        return acc_MN + part

    acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, bn), jnp.float32))
    if group_size is None:
        acc = acc * s_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "blocks", "interpret", "target"))
def _w8a16_call(x_MK, w_int8_KN, scale, *, group_size, blocks: BlockSizes, interpret, target):
    m = x_MK.shape[0]
    k, n = w_int8_KN.shape
    xp = _pad_rows(x_MK, blocks.block_m)
    mp = xp.shape[0]
    bm, bn = blocks.block_m, blocks.block_n
    # HIGHEST keeps fp32 inputs in IEEE fp32 (Triton would otherwise use tf32).
    precision = jax.lax.Precision.HIGHEST if x_MK.dtype == jnp.float32 else None
    kernel = functools.partial(
        _w8a16_kernel, block_k=blocks.block_k, group_size=group_size, precision=precision
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), x_MK.dtype),
        grid=(mp // bm, n // bn),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, bn), lambda i, j: (0, j)),
            pl.BlockSpec((scale.shape[0], bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, target),
        name="int8_w8a16_matmul",
    )(xp, w_int8_KN, scale.astype(jnp.float32))
    return out[:m]


def int8_matmul_pallas(
    x_MK: jax.Array,
    w_int8_KN: jax.Array,
    scale: jax.Array,
    *,
    group_size: int | None = None,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Weight-only int8 matmul (W8A16) as a Pallas kernel: ``x @ dequantize(w_int8, scale)``.

    Args:
      x_MK: activations ``[..., K]`` (fp32/bf16/fp16); leading dims are flattened into M.
      w_int8_KN: int8 weight ``[K, N]``.
      scale: fp32 scale ``[1, N]`` (per channel) or ``[K // group_size, N]`` (per group).
      group_size: the group size the weight was quantized with, or ``None``.
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
      block_m: rows per tile (default 16/32/64/128 by M); M is padded to a multiple of it.
      block_n: output columns per tile; must divide N (default: largest power of two <= 128).
      block_k: K step; must divide K and ``group_size`` (default: as ``block_n``).
      platform: the platform to build the kernel for, ``"gpu"`` (Triton) or ``"tpu"``
        (Mosaic); default ``jds.kernels.platform.target_platform()``. Set it to lower
        ahead of time for another platform, e.g. with
        ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` on a CPU host.

    Returns:
      ``[..., N]`` in ``x_MK.dtype`` (fp32 accumulation).

    Raises:
      ValueError: on wrong dtypes/shapes, blocks not dividing K/N, or a CPU backend without
        ``interpret=True``.
    """
    check_int8_matmul_args(x_MK, w_int8_KN, scale, group_size)
    k, n = w_int8_KN.shape
    lead = x_MK.shape[:-1]
    x2 = x_MK.reshape(-1, k)
    blocks = resolve_block_sizes(x2.shape[0], k, n, group_size, block_m, block_n, block_k)
    target = _target(platform)
    _check_backend(blocks, interpret, target)
    call = functools.partial(_w8a16_call, group_size=group_size, blocks=blocks,
                             interpret=interpret, target=target)
    out = _w8a16_differentiable(x2, w_int8_KN, scale, call)
    return out.reshape(*lead, n)


# The kernel is forward-only (a pallas_call has no transpose). Its VJP is plain XLA:
# dx = g @ dequantize(w).T, scaled per group before the product so no dequantized weight is
# materialised; dscale[g, n] = sum_m g[m, n] * (x_g @ q_g)[m, n], which XLA drops when nothing
# asks for it (frozen int8 weights, e.g. adapters trained over them); no cotangent for the int8
# weight (an integer input: float0).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _w8a16_differentiable(x_MK, w_int8_KN, scale, call):
    return call(x_MK, w_int8_KN, scale)


def _w8a16_fwd(x_MK, w_int8_KN, scale, call):
    return call(x_MK, w_int8_KN, scale), (x_MK, w_int8_KN, scale)


def _w8a16_bwd(call, res, g_MN):
    x_MK, w_int8_KN, scale = res
    (m, k), n, groups = x_MK.shape, w_int8_KN.shape[1], scale.shape[0]
    hi = jax.lax.Precision.HIGHEST
    q_GKN = w_int8_KN.reshape(groups, k // groups, n).astype(jnp.float32)
    g_MN = g_MN.astype(jnp.float32)
    gs_MGN = g_MN[:, None, :] * scale.astype(jnp.float32)[None]
    dx = jnp.einsum("mgn,gkn->mgk", gs_MGN, q_GKN, precision=hi).reshape(m, k)
    part_MGN = jnp.einsum("mgk,gkn->mgn", x_MK.astype(jnp.float32).reshape(m, groups, -1),
                          q_GKN, precision=hi)
    dscale = jnp.einsum("mn,mgn->gn", g_MN, part_MGN, precision=hi)
    dw = np.zeros(w_int8_KN.shape, jax.dtypes.float0)
    return dx.astype(x_MK.dtype), dw, dscale.astype(scale.dtype)


_w8a16_differentiable.defvjp(_w8a16_fwd, _w8a16_bwd)


# --------------------------------------------------------------------------------------------
# W8A8: int8 x, int8 weight, int32 accumulation.


def _w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k):
    # x_ref [bm, K] int8; xs_ref [bm, 1] f32; w_ref [K, bn] int8; ws_ref [1, bn] f32.
    bm, bn = o_ref.shape
    num_k = x_ref.shape[1] // block_k

    def body(kb, acc_MN):
        start = pl.multiple_of(kb * block_k, block_k)
        x_MK = x_ref[:, pl.ds(start, block_k)]
        w_KN = w_ref[pl.ds(start, block_k), :]
        return acc_MN + jnp.dot(x_MK, w_KN, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, bn), jnp.int32))
    out = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("blocks", "out_dtype", "interpret", "target"))
def _w8a8_call(
    x_int8_MK, x_scale_M1, w_int8_KN, w_scale_1N, *, blocks, out_dtype, interpret, target
):
    m, k = x_int8_MK.shape
    n = w_int8_KN.shape[1]
    bm, bn = blocks.block_m, blocks.block_n
    xp = _pad_rows(x_int8_MK, bm)
    xsp = _pad_rows(x_scale_M1.astype(jnp.float32), bm)
    mp = xp.shape[0]
    out = pl.pallas_call(
        functools.partial(_w8a8_kernel, block_k=blocks.block_k),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(mp // bm, n // bn),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((k, bn), lambda i, j: (0, j)),
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, target),
        name="int8_w8a8_matmul",
    )(xp, xsp, w_int8_KN, w_scale_1N.astype(jnp.float32))
    return out[:m]


def w8a8_matmul_pallas(
    x_int8_MK: jax.Array,
    x_scale_M1: jax.Array,
    w_int8_KN: jax.Array,
    w_scale_1N: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.float32,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    platform: str | None = None,
) -> jax.Array:
    """W8A8 matmul as a Pallas kernel: int32 ``x_int8 @ w_int8`` scaled per token and channel.

    Args:
      x_int8_MK: int8 activations ``[M, K]`` (from ``quantize_activations``).
      x_scale_M1: fp32 per-token scale ``[M, 1]``.
      w_int8_KN: int8 weight ``[K, N]`` (per-channel ``quantize``).
      w_scale_1N: fp32 per-output-channel scale ``[1, N]``.
      out_dtype: output dtype (fp32 or bf16); the scaling is done in fp32.
      interpret: run in Pallas interpret mode.
      block_m: rows per tile (M is padded to a multiple of it).
      block_n: output columns per tile; must divide N.
      block_k: K step; must divide K.
      platform: the platform to build the kernel for, ``"gpu"`` (Triton) or ``"tpu"``
        (Mosaic); default ``jds.kernels.platform.target_platform()``. Set it to lower
        ahead of time for another platform, e.g. with
        ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` on a CPU host.

    Returns:
      ``[M, N]`` in ``out_dtype``.

    Raises:
      ValueError: on wrong dtypes/shapes, blocks not dividing K/N, or a CPU backend without
        ``interpret=True``.
    """
    check_w8a8_args(x_int8_MK, x_scale_M1, w_int8_KN, w_scale_1N)
    (m, k), n = x_int8_MK.shape, w_int8_KN.shape[1]
    blocks = resolve_block_sizes(m, k, n, None, block_m, block_n, block_k)
    target = _target(platform)
    _check_backend(blocks, interpret, target)
    return _w8a8_call(
        x_int8_MK,
        x_scale_M1,
        w_int8_KN,
        w_scale_1N,
        blocks=blocks,
        out_dtype=jnp.dtype(out_dtype),
        interpret=interpret,
        target=target,
    )
