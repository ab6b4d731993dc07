"""DeepSpeed's compression quantizers in JAX, with DeepSpeed's numerics.

Each function takes a matrix in PyTorch's layout (``[rows, columns]``: a Linear's
``[out_features, in_features]``, an Embedding's ``[vocab, dim]``) and splits it into
``groups`` as DeepSpeed does, ``x.reshape(groups, -1)``: contiguous runs of rows when
``groups`` divides the row count (per output channel when it equals it). They match
``deepspeed/compression/utils.py`` (``SymQuantizer``, ``AsymQuantizer``,
``TernaryQuantizer``, ``BinaryQuantizer``) and MoQ's ``Quantizer.quantize_highbit``
(``deepspeed/runtime/quantize.py``) on the same tensors (tests/fixtures/ds_compression.json,
written from DeepSpeed 0.16.0 by scripts/make_compression_fixtures.py):

* symmetric, ``b`` bits: ``scale = 2 max|x| / 2^b``; ``round(x / scale)`` clamped to
  ``[-2^(b-1), 2^(b-1) - 1]``, times ``scale``;
* asymmetric: ``scale = (max - min) / 2^b``, ``zero = round(min / scale) * scale``;
  ``round((x - zero) / scale)`` clamped to ``[0, 2^b - 1]``, times ``scale``, plus ``zero``;
* ternary (2 bits): ``+-alpha`` where ``|x| > 0.7 mean|x|`` (``alpha`` the mean of those
  ``|x|``), else 0; binary (1 bit): ``sign(x) mean|x|``.

``round`` is round-half-to-even, as ``torch.round``. Stochastic rounding (MoQ's
``rounding: "stochastic"``) adds uniform noise in ``[-0.5, 0.5)`` before rounding, drawn
from a JAX key. One deviation: a group of zeros (scale 0) quantizes to zeros here, where
DeepSpeed divides by zero and returns NaN.

``bits`` may be a traced integer (MoQ lowers it during training without recompiling):
``quantize`` selects the high-bit, ternary or binary form for it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Kind = Literal["symmetric", "asymmetric"]


def _groups(x: jax.Array, groups: int) -> jax.Array:
    if x.size % groups:
        raise ValueError(f"quantize_groups={groups} does not divide a {x.shape} matrix's "
                         f"{x.size} elements; use a divisor of its row count")
    return x.reshape(groups, -1)


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale == 0, 1.0, scale)


def symmetric_codes(x: jax.Array, bits: jax.Array | int, groups: int = 1, *,
                    noise: jax.Array | None = None, min_value: jax.Array | None = None,
                    max_value: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``symmetric``'s integer codes (fp32 ``[groups, -1]``, in ``[-2^(b-1), 2^(b-1) - 1]``)
    and their scale per group (``[groups, 1]``, or the static range's): ``codes * scale``
    is the quantized tensor (the W8A8 matmul multiplies the codes in integers)."""
    g = _groups(x.astype(jnp.float32), groups)
    q_range = 2.0 ** jnp.asarray(bits, jnp.float32)
    if min_value is None:
        top = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
    else:
        top = jnp.maximum(jnp.abs(min_value), max_value)
    scale = _safe(2 * top / q_range)
    v = g / scale + (0.0 if noise is None else noise.reshape(g.shape))
    return jnp.clip(jnp.round(v), -q_range / 2, q_range / 2 - 1), scale


def symmetric(x: jax.Array, bits: jax.Array | int, groups: int = 1, *,
              noise: jax.Array | None = None, min_value: jax.Array | None = None,
              max_value: jax.Array | None = None) -> jax.Array:
    """``SymQuantizer`` / ``quantize_highbit(symmetric)``; ``min_value`` / ``max_value``:
    a static range (activation quantization), one group."""
    codes, scale = symmetric_codes(x, bits, groups, noise=noise, min_value=min_value,
                                   max_value=max_value)
    return (codes * scale).reshape(x.shape)


def asymmetric(x: jax.Array, bits: jax.Array | int, groups: int = 1, *,
               noise: jax.Array | None = None, min_value: jax.Array | None = None,
               max_value: jax.Array | None = None) -> jax.Array:
    """``AsymQuantizer`` / ``quantize_highbit(asymmetric)``."""
    g = _groups(x.astype(jnp.float32), groups)
    q_range = 2.0 ** jnp.asarray(bits, jnp.float32)
    if min_value is None:
        lo = jnp.min(g, axis=-1, keepdims=True)
        hi = jnp.max(g, axis=-1, keepdims=True)
    else:
        lo, hi = min_value, max_value
    scale = _safe((hi - lo) / q_range)
    zero = jnp.round(lo / scale) * scale
    v = (g - zero) / scale + (0.0 if noise is None else noise.reshape(g.shape))
    out = jnp.clip(jnp.round(v), 0, q_range - 1) * scale + zero
    return out.reshape(x.shape)


def ternary(x: jax.Array, groups: int = 1) -> jax.Array:
    """``TernaryQuantizer`` (2 bits, symmetric)."""
    g = _groups(x.astype(jnp.float32), groups)
    thres = 0.7 * jnp.mean(jnp.abs(g), axis=-1, keepdims=True)
    mask = jnp.abs(g) > thres
    alpha = jnp.sum(jnp.where(mask, jnp.abs(g), 0), -1, keepdims=True) / jnp.maximum(
        jnp.sum(mask, -1, keepdims=True), 1)
    out = alpha * (g > thres) - alpha * (g < -thres)
    return out.reshape(x.shape)


def binary(x: jax.Array, groups: int = 1) -> jax.Array:
    """``BinaryQuantizer`` (1 bit)."""
    g = _groups(x.astype(jnp.float32), groups)
    return (jnp.sign(g) * jnp.mean(jnp.abs(g), axis=-1, keepdims=True)).reshape(x.shape)


def quantize(x: jax.Array, bits: jax.Array | int, groups: int = 1, kind: Kind = "symmetric",
             *, key: jax.Array | None = None, min_bits: int = 3) -> jax.Array:
    """``x`` quantized to ``bits`` as MoQ does: the high-bit form for 3 bits and more,
    ternary at 2, binary at 1 (``min_bits``: the fewest bits ``bits`` can take, so the
    low-bit forms are traced only when reachable). ``key``: stochastic rounding."""
    noise = None if key is None else jax.random.uniform(key, x.shape, jnp.float32, -0.5, 0.5)
    fn = symmetric if kind == "symmetric" else asymmetric
    out = fn(x, jnp.maximum(jnp.asarray(bits), 3), groups, noise=noise)
    if min_bits <= 2:
        out = jnp.where(bits == 2, ternary(x, groups), out)
    if min_bits <= 1:
        out = jnp.where(bits == 1, binary(x, groups), out)
    return out


def topk_mask(scores: jax.Array, ratio: float) -> jax.Array:
    """``TopKBinarizer``: 1 for the ``ceil(ratio * size)`` largest scores, else 0 (ties to
    the earlier index, as a stable descending sort)."""
    flat = scores.reshape(-1)
    k = int(-(-ratio * flat.size // 1))
    order = jnp.argsort(-flat, stable=True)
    mask = jnp.zeros(flat.shape, scores.dtype).at[order[:k]].set(1)
    return mask.reshape(scores.shape)


__all__ = ["asymmetric", "binary", "quantize", "symmetric", "symmetric_codes", "ternary",
           "topk_mask"]
