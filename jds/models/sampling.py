"""A simple sampler: ``generate(model, prompt_ids, max_new_tokens, ...)``.

For the end-of-run sample of ``jds train`` and quick checks, not serving (the inference
engine owns KV caches and batching). There is no KV cache: each step runs the model over a
fixed-size buffer of ``len(prompt) + max_new_tokens`` tokens (capped to the model's
positions) and reads the logits at the last filled position; causal attention makes the
unfilled tail irrelevant. The whole rollout is one ``lax.fori_loop`` in one jitted function,
so it compiles once per buffer length and ``top_k`` / greedy choice, whatever the prompt
length, temperature or seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _rollout(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    buf_1S: jax.Array,
    start: jax.Array,
    temperature: jax.Array,
    key: jax.Array,
    *,
    top_k: int | None,
    greedy: bool,
) -> jax.Array:
    """Fill ``buf_1S[0, start:]`` one sampled token at a time."""
    model = nnx.merge(graphdef, state)
    S = buf_1S.shape[1]

    def step(pos: jax.Array, buf_1S: jax.Array) -> jax.Array:
        logits_SV = model(buf_1S)[0]
        logits_V = jax.lax.dynamic_index_in_dim(logits_SV, pos - 1, keepdims=False)
        logits_V = logits_V.astype(jnp.float32)
        if greedy:
            tok = jnp.argmax(logits_V)
        else:
            if top_k is not None:
                kth = jax.lax.top_k(logits_V, top_k)[0][-1]
                logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
            tok = jax.random.categorical(jax.random.fold_in(key, pos), logits_V / temperature)
        return jax.lax.dynamic_update_index_in_dim(buf_1S, tok.astype(buf_1S.dtype)[None], pos, 1)

    return jax.lax.fori_loop(start, S, step, buf_1S)


_rollout_jit = jax.jit(_rollout, static_argnames=("graphdef", "top_k", "greedy"))


def generate(
    model: nnx.Module,
    prompt_ids: Sequence[int] | np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Sample a continuation of ``prompt_ids``.

    Args:
      model: a ``Llama`` or ``GPT2`` module.
      prompt_ids: at least one token id in ``[0, vocab_size)``.
      max_new_tokens: tokens to generate; fewer come back when the prompt plus these would
        exceed the model's maximum positions.
      temperature: softmax temperature; ``0`` means greedy (argmax).
      top_k: sample among the ``top_k`` most likely tokens only (``None``: all).
      seed: sampling seed; the same seed gives the same tokens.

    Returns:
      The generated token ids only (not the prompt).

    Raises:
      ValueError: empty or out-of-range prompt, a prompt that fills the model's positions,
        negative ``max_new_tokens`` or ``temperature``, or ``top_k`` outside ``[1, vocab]``.
    """
    cfg = model.config
    vocab, max_pos = cfg.vocab_size, cfg.max_positions
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    P = prompt.size
    if P == 0:
        raise ValueError("prompt_ids is empty; give at least one token")
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(
            f"prompt_ids hold ids in [{prompt.min()}, {prompt.max()}]; vocab_size is {vocab}"
        )
    if P >= max_pos:
        raise ValueError(
            f"the prompt ({P} tokens) leaves no room within the model's {max_pos} positions"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] or None; got {top_k}")
    S = min(P + max_new_tokens, max_pos)
    if S == P:
        return []
    buf_1S = np.zeros((1, S), np.int32)
    buf_1S[0, :P] = prompt
    graphdef, state = nnx.split(model)
    greedy = temperature == 0
    out_1S = _rollout_jit(
        graphdef,
        state,
        jnp.asarray(buf_1S),
        jnp.asarray(P, jnp.int32),
        jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        jax.random.key(seed),
        top_k=None if greedy else top_k,
        greedy=greedy,
    )
    return [int(t) for t in np.asarray(out_1S)[0, P:]]


__all__ = ["generate"]
