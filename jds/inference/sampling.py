"""Sampling for the inference engine, inside its compiled pass: penalties and logit bias,
greedy / temperature / top-k / top-p, and the log-probabilities OpenAI's API returns.

Per-request state lives on the device beside the KV cache, one row per sequence slot:
``counts [slots, vocab]`` (how often each token was generated so far, updated in the pass
that samples it) and ``bias [slots, vocab]`` (the request's ``logit_bias``, written once
when it is admitted, ``set_row``). They are read only when some row in the pass uses a
penalty or a bias (``lax.cond``), so plain requests pay nothing for them.

Penalties follow OpenAI's definition (and vLLM's): over the tokens generated so far,
``logit - frequency_penalty * count - presence_penalty * (count > 0) + logit_bias``, applied
before temperature, top-k and top-p. Log-probabilities are the model's own distribution,
before all of these (vLLM's default "raw" log-probabilities).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 20  # most alternatives a request may ask for (OpenAI's top_logprobs limit)


def logprobs(logits_SV: jax.Array, tokens_S: jax.Array, want_S: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probability of each row's chosen token and its ``TOP_LOGPROBS`` most
    likely tokens (ids and log-probabilities), computed only when some row asks (``want_S``).

    They are the model's own distribution, before temperature, top-k and top-p (vLLM's
    default "raw" log-probabilities), so they do not change with the sampling settings.
    """
    S, V = logits_SV.shape
    top = min(TOP_LOGPROBS, V)

    def compute(_):
        logp_SV = jax.nn.log_softmax(logits_SV.astype(jnp.float32), axis=-1)
        chosen_S = jnp.take_along_axis(logp_SV, tokens_S[:, None], axis=-1)[:, 0]
        values, ids = jax.lax.top_k(logp_SV, top)
        return chosen_S, values, ids.astype(jnp.int32)

    def skip(_):
        return (jnp.zeros(S, jnp.float32), jnp.zeros((S, top), jnp.float32),
                jnp.zeros((S, top), jnp.int32))

    return jax.lax.cond(jnp.any(want_S), compute, skip, None)


def sample(logits_SV: jax.Array, temperature_S: jax.Array, top_k_S: jax.Array,
            top_p_S: jax.Array, seed_S: jax.Array, pos_S: jax.Array) -> jax.Array:
    """Next token per row: argmax where temperature is 0, else top-k / top-p sampling.

    When every row is greedy (the common serving case) the sort behind top-k / top-p is
    skipped (``lax.cond``).
    """
    logits_SV = logits_SV.astype(jnp.float32)
    greedy_S = jnp.argmax(logits_SV, axis=-1).astype(jnp.int32)

    def sampled(_):
        V = logits_SV.shape[-1]
        t_S = jnp.where(temperature_S > 0, temperature_S, 1.0)
        scaled = logits_SV / t_S[:, None]
        desc = -jnp.sort(-scaled, axis=-1)
        k_S = jnp.where((top_k_S > 0) & (top_k_S < V), top_k_S, V)
        kth = jnp.take_along_axis(desc, (k_S - 1)[:, None], axis=-1)
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        desc = jnp.where(jnp.arange(V)[None] < k_S[:, None], desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        p_S = jnp.where((top_p_S > 0) & (top_p_S < 1), top_p_S, 1.0)
        keep = (before < p_S[:, None]) & jnp.isfinite(desc)
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)
        scaled = jnp.where(scaled < cutoff[:, None], -jnp.inf, scaled)
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed_S, pos_S)
        drawn_S = jax.vmap(jax.random.categorical)(keys, scaled)
        return jnp.where(temperature_S > 0, drawn_S, greedy_S).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature_S > 0), sampled, lambda _: greedy_S, None)


def adjust(logits_SV: jax.Array, counts_SV: jax.Array, bias_SV: jax.Array,
           presence_S: jax.Array, frequency_S: jax.Array, use_bias_S: jax.Array) -> jax.Array:
    """Logits with each row's presence / frequency penalty and logit bias applied (rows
    without them unchanged); skipped when no row has any."""
    active = jnp.any((presence_S != 0) | (frequency_S != 0) | use_bias_S)

    def apply(x):
        counts = counts_SV.astype(jnp.float32)
        x = x - frequency_S[:, None] * counts - presence_S[:, None] * (counts > 0)
        return x + jnp.where(use_bias_S[:, None], bias_SV, 0.0)

    return jax.lax.cond(active, apply, lambda x: x, logits_SV.astype(jnp.float32))


def count(counts_SV: jax.Array, tokens_S: jax.Array, sampled_S: jax.Array) -> jax.Array:
    """``counts_SV`` with each sampling row's new token counted."""
    rows = jnp.arange(counts_SV.shape[0])
    return counts_SV.at[rows, tokens_S].add(sampled_S.astype(counts_SV.dtype))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def set_row(counts_SV: jax.Array, bias_SV: jax.Array, slot: jax.Array, ids_B: jax.Array,
            values_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A new request in ``slot``: its counts zeroed, its bias row set from ``(ids, values)``
    (padding entries carry value 0)."""
    counts_SV = counts_SV.at[slot].set(0)
    row = jnp.zeros(bias_SV.shape[1], bias_SV.dtype).at[ids_B].add(values_B)
    return counts_SV, bias_SV.at[slot].set(row)


__all__ = ["TOP_LOGPROBS", "adjust", "count", "logprobs", "sample", "set_row"]
