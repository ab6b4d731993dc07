"""4-bit NormalFloat (NF4) with double-quantized scales, QLoRA's frozen-base format.

NF4 (Dettmers et al., 2023, "QLoRA") maps each weight, divided by the absolute maximum of
its block of 64, to the nearest of 16 levels placed at quantiles of a standard normal
(``NF4_LEVELS``, the paper's and bitsandbytes' table, with an exact zero). Two 4-bit codes
are packed per byte along the input dimension.

Double quantization: the blocks' fp32 absmax constants are quantized again, to int8 after
subtracting their mean. The paper groups 256 consecutive constants per second-level scale;
here the second level is one (mean, scale) pair per output channel, over that column's
``K / 64`` constants: the same 8 bits per 64 weights (0.125 bits/param) for the constants,
and a per-column pair (8 bytes per column) instead of per 256 constants, which keeps every
array's trailing dims equal to the weight's output dims so that tensor parallelism splits
codes, constants and scales alike. Storage: 4 + 8/64 + 64/K bits per parameter (about
4.13 bits, 0.52 bytes, at K >= 4096).

This module is the reference (``jnp``): ``dequantize_nf4`` expands a layer's matrix in the
compute dtype inside the layer scan, which XLA fuses into the matmul's operand; there is no
Pallas kernel for it yet.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A layer matrix ``[*in, *out]`` stored as NF4 (``quantize_nf4``).

    Attributes:
      codes: uint8 ``[K / 2, *out]``: two 4-bit level indices per byte (K = prod(in)).
      absmax_q: int8 ``[K / 64, *out]``: the blocks' absmax, double-quantized.
      absmax_scale, absmax_mean: fp32 ``[*out]``: ``absmax = absmax_q * scale + mean``.
      in_shape: the input dims ``*in`` (static).
    """

    codes: jax.Array
    absmax_q: jax.Array
    absmax_scale: jax.Array
    absmax_mean: jax.Array
    in_shape: tuple = dataclasses.field(metadata={"static": True}, default=())


def check_nf4_shape(k: int, what: str = "weight") -> None:
    """Raise ``ValueError`` unless the input size ``k`` splits into blocks of 64."""
    if k % BLOCK:
        raise ValueError(f"NF4 quantizes blocks of {BLOCK} inputs; {what} has {k} inputs, "
                         f"not a multiple of {BLOCK} (use quantize_base='int8' for it)")


def quantize_nf4(w: jax.Array, n_in: int = 1) -> NF4Weight:
    """NF4-quantize ``w [*in, *out]`` (the first ``n_in`` dims are inputs).

    Raises:
      ValueError: the input size is not a multiple of 64.
    """
    in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
    k = math.prod(in_shape)
    check_nf4_shape(k)
    w32 = jnp.asarray(w, jnp.float32).reshape(k // BLOCK, BLOCK, *out_shape)
    absmax = jnp.max(jnp.abs(w32), axis=1)  # [G, *out]
    x = w32 / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    levels = jnp.asarray(NF4_LEVELS)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = jnp.searchsorted(mids, x).astype(jnp.uint8).reshape(k, *out_shape)
    packed = (codes[0::2] << 4) | codes[1::2]
    mean = jnp.mean(absmax, axis=0)
    centred = absmax - mean
    scale = jnp.max(jnp.abs(centred), axis=0) / 127.0
    q = jnp.clip(jnp.round(centred / jnp.where(scale == 0, 1.0, scale)), -127, 127)
    return NF4Weight(codes=packed, absmax_q=q.astype(jnp.int8), absmax_scale=scale,
                     absmax_mean=mean, in_shape=in_shape)


def dequantize_nf4(w: NF4Weight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The matrix ``[*in, *out]`` an ``NF4Weight`` stands for, in ``dtype``."""
    out_shape = tuple(w.codes.shape[1:])
    k = math.prod(w.in_shape)
    hi, lo = w.codes >> 4, w.codes & 0xF
    codes = jnp.stack([hi, lo], axis=1).reshape(k, *out_shape)
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    absmax = (w.absmax_q.astype(jnp.float32) * w.absmax_scale + w.absmax_mean)
    values = values.reshape(k // BLOCK, BLOCK, *out_shape) * absmax[:, None]
    return values.reshape(*w.in_shape, *out_shape).astype(dtype)


__all__ = ["BLOCK", "NF4Weight", "NF4_LEVELS", "check_nf4_shape", "dequantize_nf4",
           "quantize_nf4"]
