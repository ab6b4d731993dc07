"""Int8 quantization and quantized matmuls in plain ``jnp``: the spec the Pallas kernels meet.

Weights are stored ``[K, N]`` (input features K, output features N), as the models' dense
layers hold them. Quantization is symmetric (no zero point):

* per output channel: one fp32 scale per column, ``scale`` of shape ``[1, N]``;
* per group: one fp32 scale per ``group_size`` consecutive input rows of each column,
  ``scale`` of shape ``[K // group_size, N]``.

``scale = max|w| / 127`` over the reduced elements, ``w_int8 = clip(round(w / scale), -127,
127)``; an all-zero channel/group gets ``scale = 0`` and ``w_int8 = 0`` (no division by zero).
Rounding to nearest bounds the error elementwise: ``|dequantize(quantize(w)) - w| <= scale / 2``.

Activations (W8A8) are quantized per token: one scale per row of ``x [..., K]``.

This module also owns the argument checks shared with the kernels (``check_int8_matmul_args``,
``check_w8a8_args``), so both paths reject the same inputs with the same messages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_QMAX = 127.0


def _canonical_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a {ndim}-D weight")
    return axis % ndim


def _check_group_size(group_size: int | None, k: int, what: str) -> None:
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None; got {group_size!r}")
    if k % group_size:
        raise ValueError(
            f"group_size={group_size} must divide {what}={k}; pick a divisor of {k} "
            "(or group_size=None for one scale per output channel)"
        )


def expected_scale_shape(
    w_shape: tuple[int, ...], *, axis: int = 0, group_size: int | None = None
) -> tuple[int, ...]:
    """Shape of the scale for a weight of ``w_shape`` quantized over ``axis``.

    Args:
      w_shape: 2-D weight shape, e.g. ``(K, N)``.
      axis: the reduced (input) axis.
      group_size: rows per group along ``axis``; ``None`` for one scale per channel.

    Returns:
      ``w_shape`` with ``axis`` replaced by 1 (per channel) or by ``size // group_size``.
    """
    axis = _canonical_axis(axis, len(w_shape))
    shape = list(w_shape)
    shape[axis] = 1 if group_size is None else w_shape[axis] // group_size
    return tuple(shape)


def quantize(
    w_KN: jax.Array, *, axis: int = 0, group_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization of a 2-D weight, per output channel or per group.

    Args:
      w_KN: float weight, ``[K, N]`` with the input axis at ``axis`` (0 by default).
      axis: the input (reduced) axis: the scale is shared along it.
      group_size: ``None`` for one scale per output channel (scale ``[1, N]``), or g dividing
        K for one scale per g consecutive input rows (scale ``[K // g, N]``).

    Returns:
      ``(w_int8, scale)``: int8 weight of ``w_KN``'s shape with values in [-127, 127], and the
      fp32 scale (``max|w| / 127`` per channel or group; 0 where the group is all zero).

    Raises:
      ValueError: if ``w_KN`` is not a 2-D floating array, or ``group_size`` does not divide K.
    """
    if w_KN.ndim != 2 or not jnp.issubdtype(w_KN.dtype, jnp.floating):
        raise ValueError(
            f"quantize expects a 2-D floating weight; got shape {w_KN.shape} dtype {w_KN.dtype}"
        )
    axis = _canonical_axis(axis, 2)
    _check_group_size(group_size, w_KN.shape[axis], f"w.shape[{axis}]")
    w = jnp.moveaxis(w_KN.astype(jnp.float32), axis, 0)  # [K, N]
    k, n = w.shape
    g = k if group_size is None else group_size
    w_GgN = w.reshape(k // g, g, n)
    scale_G1N = jnp.max(jnp.abs(w_GgN), axis=1, keepdims=True) / _QMAX
    safe = jnp.where(scale_G1N == 0, 1.0, scale_G1N)
    q_GgN = jnp.clip(jnp.round(w_GgN / safe), -_QMAX, _QMAX).astype(jnp.int8)
    q = jnp.moveaxis(q_GgN.reshape(k, n), 0, axis)
    scale = jnp.moveaxis(scale_G1N.reshape(k // g, n), 0, axis)
    return q, scale


def dequantize(
    w_int8: jax.Array, scale: jax.Array, *, axis: int = 0, group_size: int | None = None
) -> jax.Array:
    """Inverse of :func:`quantize`: ``w_int8 * scale`` (broadcast over groups) in fp32.

    Args:
      w_int8: int8 weight ``[K, N]`` (input axis at ``axis``).
      scale: fp32 scale as returned by :func:`quantize` with the same ``axis``/``group_size``.
      axis: the input axis.
      group_size: the group size used to quantize, or ``None`` for per channel.

    Returns:
      fp32 weight of ``w_int8``'s shape.

    Raises:
      ValueError: on a non-int8 weight or a scale of the wrong shape.
    """
    if w_int8.ndim != 2 or w_int8.dtype != jnp.int8:
        raise ValueError(
            f"w_int8 must be a 2-D int8 array; got shape {w_int8.shape} dtype {w_int8.dtype}"
        )
    axis = _canonical_axis(axis, 2)
    _check_group_size(group_size, w_int8.shape[axis], f"w_int8.shape[{axis}]")
    want = expected_scale_shape(w_int8.shape, axis=axis, group_size=group_size)
    if scale.shape != want:
        raise ValueError(
            f"scale must have shape {want} for w_int8 {w_int8.shape} with axis={axis}, "
            f"group_size={group_size}; got {scale.shape}"
        )
    w = jnp.moveaxis(w_int8, axis, 0).astype(jnp.float32)  # [K, N]
    s = jnp.moveaxis(scale.astype(jnp.float32), axis, 0)  # [G, N]
    k, n = w.shape
    g = k // s.shape[0]
    out = (w.reshape(k // g, g, n) * s[:, None, :]).reshape(k, n)
    return jnp.moveaxis(out, 0, axis)


def quantize_activations(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-token int8 quantization of activations.

    Args:
      x_MK: float activations ``[..., K]``; each row (token) gets its own scale.

    Returns:
      ``(x_int8 [..., K], x_scale [..., 1])`` with ``x_scale = max|row| / 127`` in fp32
      (0 for an all-zero row).

    Raises:
      ValueError: if ``x_MK`` is not floating or has no feature axis.
    """
    if x_MK.ndim < 1 or not jnp.issubdtype(x_MK.dtype, jnp.floating):
        raise ValueError(
            f"quantize_activations expects floating [..., K]; got {x_MK.shape} {x_MK.dtype}"
        )
    x = x_MK.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / _QMAX
    safe = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x / safe), -_QMAX, _QMAX).astype(jnp.int8), scale


def check_int8_matmul_args(
    x_MK: jax.Array, w_int8_KN: jax.Array, scale: jax.Array, group_size: int | None
) -> None:
    """Validate W8A16 matmul arguments (shared by the reference and the Pallas kernel).

    Raises:
      ValueError: naming the offending argument and the expected shape/dtype.
    """
    if x_MK.ndim < 1 or not jnp.issubdtype(x_MK.dtype, jnp.floating):
        raise ValueError(f"x must be a floating [..., K] array; got {x_MK.shape} {x_MK.dtype}")
    if w_int8_KN.dtype != jnp.int8:
        raise ValueError(
            f"w_int8 must be int8 (quantize the weight with jds.kernels.quant.quantize); "
            f"got dtype {w_int8_KN.dtype}"
        )
    if w_int8_KN.ndim != 2:
        raise ValueError(f"w_int8 must be 2-D [K, N]; got shape {w_int8_KN.shape}")
    k, n = w_int8_KN.shape
    if x_MK.shape[-1] != k:
        raise ValueError(
            f"x's last dim ({x_MK.shape[-1]}) must equal w_int8's K = w_int8.shape[0] ({k}); "
            f"got x {x_MK.shape}, w_int8 {w_int8_KN.shape}"
        )
    _check_group_size(group_size, k, "K")
    want = expected_scale_shape((k, n), axis=0, group_size=group_size)
    if scale.shape != want:
        raise ValueError(
            f"scale must have shape {want} (K={k}, N={n}, group_size={group_size}); "
            f"got {scale.shape}"
        )
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"scale must be floating (fp32); got dtype {scale.dtype}")


def check_w8a8_args(
    x_int8_MK: jax.Array, x_scale_M1: jax.Array, w_int8_KN: jax.Array, w_scale_1N: jax.Array
) -> None:
    """Validate W8A8 matmul arguments (shared by the reference and the Pallas kernel).

    Raises:
      ValueError: naming the offending argument and the expected shape/dtype.
    """
    for name, a in (("x_int8", x_int8_MK), ("w_int8", w_int8_KN)):
        if a.dtype != jnp.int8:
            raise ValueError(f"{name} must be int8; got dtype {a.dtype}")
    if x_int8_MK.ndim != 2 or w_int8_KN.ndim != 2:
        raise ValueError(
            f"x_int8 must be [M, K] and w_int8 [K, N]; got {x_int8_MK.shape}, {w_int8_KN.shape}"
        )
    (m, k), (kw, n) = x_int8_MK.shape, w_int8_KN.shape
    if k != kw:
        raise ValueError(
            f"x_int8's K ({k}) must equal w_int8's K ({kw}); "
            f"got x_int8 {x_int8_MK.shape}, w_int8 {w_int8_KN.shape}"
        )
    if x_scale_M1.shape != (m, 1):
        raise ValueError(f"x_scale must have shape {(m, 1)} (per token); got {x_scale_M1.shape}")
    if w_scale_1N.shape != (1, n):
        raise ValueError(
            f"w_scale must have shape {(1, n)} (per output channel); got {w_scale_1N.shape}"
        )


def int8_matmul_reference(
    x_MK: jax.Array, w_int8_KN: jax.Array, scale: jax.Array, *, group_size: int | None = None
) -> jax.Array:
    """W8A16 spec: dequantize the weight to fp32, matmul in fp32, cast to ``x.dtype``.

    Args:
      x_MK: activations ``[..., K]`` (fp32/bf16/fp16).
      w_int8_KN: int8 weight ``[K, N]``.
      scale: fp32 scale ``[1, N]`` (per channel) or ``[K // group_size, N]`` (per group).
      group_size: the group size the weight was quantized with, or ``None``.

    Returns:
      ``[..., N]`` in ``x_MK.dtype``.

    Raises:
      ValueError: on wrong dtypes or shapes (see :func:`check_int8_matmul_args`).
    """
    check_int8_matmul_args(x_MK, w_int8_KN, scale, group_size)
    w = dequantize(w_int8_KN, scale, group_size=group_size)
    out = jnp.dot(x_MK.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x_MK.dtype)


def w8a8_matmul_reference(
    x_int8_MK: jax.Array,
    x_scale_M1: jax.Array,
    w_int8_KN: jax.Array,
    w_scale_1N: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """W8A8 spec: exact int32 product, then ``acc * x_scale * w_scale`` in fp32.

    Args:
      x_int8_MK: int8 activations ``[M, K]`` (from :func:`quantize_activations`).
      x_scale_M1: fp32 per-token scale ``[M, 1]``.
      w_int8_KN: int8 weight ``[K, N]``.
      w_scale_1N: fp32 per-output-channel scale ``[1, N]``.
      out_dtype: output dtype (fp32 or bf16).

    Returns:
      ``[M, N]`` in ``out_dtype``.

    Raises:
      ValueError: on wrong dtypes or shapes (see :func:`check_w8a8_args`).
    """
    check_w8a8_args(x_int8_MK, x_scale_M1, w_int8_KN, w_scale_1N)
    acc = jnp.dot(x_int8_MK, w_int8_KN, preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * x_scale_M1.astype(jnp.float32)
    return (out * w_scale_1N.astype(jnp.float32)).astype(out_dtype)
