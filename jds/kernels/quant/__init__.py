"""Int8 quantization and quantized matmuls, dispatched by backend.

* ``quantize`` / ``dequantize``: symmetric int8 weights, per output channel (scale ``[1, N]``)
  or per group of ``group_size`` input rows (scale ``[K // group_size, N]``).
* ``quantize_activations``: per-token int8 activations for W8A8.
* ``int8_matmul``: weight-only W8A16, ``x @ dequantize(w_int8, scale)`` in x's dtype.
* ``w8a8_matmul``: int8 x int8 -> int32, scaled per token and per output channel.

Dispatch: on GPU/TPU the matmuls run the Pallas kernels (``pallas.py``); on any other backend
(CPU) the plain-XLA reference (``reference.py``), so the compiled-kernel path is never taken on
CPU; the platform is ``jds.kernels.platform.target_platform()``, the default backend unless a
program is being lowered for another one. ``interpret=True`` forces the Pallas kernel in
interpret mode on any backend (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jds.kernels.platform import is_gpu, target_platform
from jds.kernels.quant.pallas import BlockSizes, int8_matmul_pallas, w8a8_matmul_pallas
from jds.kernels.quant.reference import (
    dequantize,
    expected_scale_shape,
    int8_matmul_reference,
    quantize,
    quantize_activations,
    w8a8_matmul_reference,
)


def use_pallas(interpret: bool = False) -> bool:
    """Whether the dispatchers take the Pallas kernel: in interpret mode, or when building for
    GPU/TPU (``jds.kernels.platform.target_platform``)."""
    target = target_platform()
    return interpret or is_gpu(target) or target == "tpu"


def int8_matmul(
    x_MK: jax.Array,
    w_int8_KN: jax.Array,
    scale: jax.Array,
    *,
    group_size: int | None = None,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Weight-only int8 matmul (W8A16): ``x @ dequantize(w_int8, scale)``, fp32 accumulation.

    Args:
      x_MK: activations ``[..., K]`` (fp32/bf16/fp16).
      w_int8_KN: int8 weight ``[K, N]`` from :func:`quantize`.
      scale: fp32 scale ``[1, N]`` or ``[K // group_size, N]``.
      group_size: group size of the quantization, or ``None`` for per channel.
      interpret: force the Pallas kernel in interpret mode (any backend).
      block_m: Pallas tile rows (ignored by the reference path).
      block_n: Pallas tile columns; must divide N.
      block_k: Pallas K step; must divide K and ``group_size``.

    Returns:
      ``[..., N]`` in ``x_MK.dtype``.

    Raises:
      ValueError: on wrong dtypes or shapes, naming the argument and the expected shape.
    """
    if use_pallas(interpret):
        return int8_matmul_pallas(
            x_MK,
            w_int8_KN,
            scale,
            group_size=group_size,
            interpret=interpret,
            block_m=block_m,
            block_n=block_n,
            block_k=block_k,
        )
    return int8_matmul_reference(x_MK, w_int8_KN, scale, group_size=group_size)


def w8a8_matmul(
    x_int8_MK: jax.Array,
    x_scale_M1: jax.Array,
    w_int8_KN: jax.Array,
    w_scale_1N: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.float32,
    interpret: bool = False,
) -> jax.Array:
    """W8A8 matmul: exact int32 ``x_int8 @ w_int8``, then ``* x_scale * w_scale`` in fp32.

    Args:
      x_int8_MK: int8 activations ``[M, K]`` from :func:`quantize_activations`.
      x_scale_M1: fp32 per-token scale ``[M, 1]``.
      w_int8_KN: int8 weight ``[K, N]`` from per-channel :func:`quantize`.
      w_scale_1N: fp32 per-output-channel scale ``[1, N]``.
      out_dtype: output dtype (fp32 or bf16).
      interpret: force the Pallas kernel in interpret mode (any backend).

    Returns:
      ``[M, N]`` in ``out_dtype``.

    Raises:
      ValueError: on wrong dtypes or shapes, naming the argument and the expected shape.
    """
    if use_pallas(interpret):
        return w8a8_matmul_pallas(
            x_int8_MK,
            x_scale_M1,
            w_int8_KN,
            w_scale_1N,
            out_dtype=out_dtype,
            interpret=interpret,
        )
    return w8a8_matmul_reference(x_int8_MK, x_scale_M1, w_int8_KN, w_scale_1N, out_dtype=out_dtype)


__all__ = [
    "BlockSizes",
    "dequantize",
    "expected_scale_shape",
    "int8_matmul",
    "int8_matmul_pallas",
    "int8_matmul_reference",
    "quantize",
    "quantize_activations",
    "use_pallas",
    "w8a8_matmul",
    "w8a8_matmul_pallas",
    "w8a8_matmul_reference",
]
