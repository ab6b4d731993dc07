"""Pieces shared by the model families: parameter creation, input checks, positions, and
running a stack of layers with ``lax.scan`` under a rematerialisation policy.

Per-family maths (RMSNorm and RoPE for Llama, LayerNorm and learned positions for GPT-2)
lives in the family's own module.

Rematerialisation policies (``model.remat``):

- ``"none"``: every activation of every layer is kept for the backward pass.
- ``"full"``: only each layer's input is kept; the whole layer is recomputed in backward.
- ``"dots"``: ``jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims``. It saves the
  outputs of matmuls without batch dimensions — the projection and MLP matmuls, all
  ``O(B*T*D)`` or ``O(B*T*F)`` — and recomputes everything else, notably the attention
  scores and probabilities, whose einsums carry batch dimensions and are ``O(B*N*T*T)``.
  ``dots_saveable`` would also save those ``T*T`` tensors, which is exactly the memory that
  remat is meant to free at long sequence lengths, so it is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REMAT_MODES: tuple[str, ...] = ("none", "full", "dots")


def normal_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float, dtype: Any
) -> nnx.Param:
    """A ``normal(0, std)`` parameter carrying its logical ``axes``."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def const_param(
    shape: tuple[int, ...], axes: tuple[str | None, ...], fill: float, dtype: Any
) -> nnx.Param:
    """A constant parameter (zeros for biases, ones for norm scales) with logical ``axes``."""
    return nnx.Param(jnp.full(shape, fill, dtype), axes=axes)


def stacked_params(module: nnx.Module) -> dict[str, jax.Array]:
    """The ``nnx.Param`` arrays held directly by ``module``, by attribute name.

    Used on the module that holds the layer-stacked weights: every value has a leading
    ``layers`` dimension, so the dict can be scanned over as it is.
    """
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def check_remat(remat: str) -> None:
    """Raise ``ValueError`` unless ``remat`` is one of ``REMAT_MODES``."""
    if remat not in REMAT_MODES:
        raise ValueError(f"remat must be one of {list(REMAT_MODES)}; got {remat!r}")


def remat_wrap(fn: Callable, remat: str) -> Callable:
    """Wrap a layer function in ``jax.checkpoint`` according to ``remat``.

    ``prevent_cse=False`` because the function always runs inside ``lax.scan``, which
    already stops XLA from merging the recomputation back into the forward pass.
    """
    check_remat(remat)
    if remat == "none":
        return fn
    policy = (
        jax.checkpoint_policies.nothing_saveable
        if remat == "full"
        else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    )
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def scan_layers(
    block_fn: Callable[..., jax.Array],
    params_L: dict[str, jax.Array],
    x: jax.Array,
    *args: Any,
    remat: str = "none",
) -> jax.Array:
    """Run ``x = block_fn(params_l, x, *args)`` for every layer ``l`` with ``lax.scan``.

    Compile time stays constant in depth: the block is traced once.

    Args:
      block_fn: ``(params_layer, x, *args) -> x``, a plain function of one layer's weights.
      params_L: weights with a leading ``layers`` dimension.
      x: the residual stream, e.g. ``x_BTD``.
      *args: per-call inputs shared by every layer (positions, segment ids).
      remat: ``"none" | "full" | "dots"`` (see the module docstring).

    Returns:
      The residual stream after the last layer.
    """
    fn = remat_wrap(block_fn, remat)

    def body(carry: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        return fn(p, carry, *args), None

    out, _ = jax.lax.scan(body, x, params_L)
    return out


def check_inputs(
    input_ids_BT: Any, segment_ids_BT: Any, *, vocab_size: int, max_positions: int
) -> None:
    """Validate token ids before a forward pass.

    Shapes and dtypes are checked always (they are static); the id range only when the ids
    are concrete — under ``jit`` the engine validates on the host instead.

    Raises:
      ValueError: not ``[B, T]`` integers, ``T`` above ``max_positions``, ``segment_ids``
        of another shape, or (concrete ids only) an id outside ``[0, vocab_size)``.
    """
    shape = getattr(input_ids_BT, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {shape}")
    if not jnp.issubdtype(input_ids_BT.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers; got dtype {input_ids_BT.dtype}")
    if shape[1] > max_positions:
        raise ValueError(
            f"sequence length {shape[1]} exceeds the model's max positions ({max_positions}); "
            "use shorter sequences or a config with more positions"
        )
    if segment_ids_BT is not None and tuple(segment_ids_BT.shape) != tuple(shape):
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids_BT.shape)} must equal input_ids shape "
            f"{tuple(shape)}"
        )
    if isinstance(input_ids_BT, jax.core.Tracer) or shape[0] * shape[1] == 0:
        return
    if isinstance(input_ids_BT, jax.Array) and not input_ids_BT.is_fully_addressable:
        return
    ids = np.asarray(input_ids_BT)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"input_ids hold ids in [{lo}, {hi}] (min id {lo}, max id {hi}) but vocab_size is "
            f"{vocab_size}; ids must lie in [0, {vocab_size}). Check the tokenizer or the model"
        )


def positions_from_segments(segment_ids_BT: jax.Array | None, B: int, T: int) -> jax.Array:
    """Token positions ``[B, T]``: ``0..T-1``, restarting at every segment boundary.

    With packed sequences (``segment_ids``) each document starts again at position 0, as it
    would have unpacked.
    """
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None:
        return t_BT
    starts_BT = jnp.concatenate(
        [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    first_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)
    return t_BT - first_BT


__all__ = [
    "REMAT_MODES",
    "check_inputs",
    "check_remat",
    "const_param",
    "normal_param",
    "positions_from_segments",
    "remat_wrap",
    "scan_layers",
    "stacked_params",
]
