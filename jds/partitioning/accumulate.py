"""Gradient accumulation in place: a layer scan whose backward pass adds each layer's
gradients straight into the step's fp32 accumulator.

With gradient accumulation, the train step scans over micro-batches and adds each
micro-batch's gradients to an fp32 accumulator. For a stacked decoder the gradients of the
``[layers, ...]`` weights come out of JAX's transpose of the forward layer scan, which
stacks them in a *fresh* buffer (its stacked cotangents start from zeros) and only then is
that buffer added to the accumulator: two full-size gradient buffers live at once. Under
ZeRO 0/1 that is 4 bytes/param more than DeepSpeed keeps (issue 19: an 8-layer Llama on 8
devices, fp32, peaked at 20.7 / 13.7 bytes/param for stages 0/1 against the ZeRO table's
16 / 9).

``scan_accumulating`` is the same forward scan with its own backward (a ``jax.custom_vjp``):
the forward saves, per layer, the residuals of ``jax.vjp`` of the layer (what the layer's
checkpoint policy keeps; the layer's weights are not saved again, the backward reads them
from the stack), and the backward is a reverse scan whose carry holds the accumulator
itself; each layer's weight gradients are added into their ``[l]`` slice
(``dynamic_update_slice``, in place). The accumulator enters the loss as an input whose
"gradient" is the updated accumulator, so the step's ``value_and_grad`` returns it
directly. XLA's scheduler controls could not get there (the scan transpose's zero-started
buffer is JAX's, not a scheduling choice); rewriting the backward did.

Cost, measured on CPU against JAX's own backward in the same run
(``scripts/bench_accumulate.py``: llama-tiny, fp32, accumulation 4, 8 x 128 tokens per
micro-batch, same losses to the last bit): 1.027x the step time on one device, 1.025x on 8
simulated devices under ZeRO-1. Only steps with more than one micro-batch take this path
(one micro-batch has no accumulator to add into).

How the accumulator reaches the layer scan: ``make_gradients`` opens ``gradient_sink``
around the loss with the trainable parameters and the accumulator; ``scan_layers`` looks
its stacked weights up by identity (the very arrays the step passed in, so a weight that a
wrapper transformed first — MoQ's fake quantization, a pruning mask — is not found and
keeps JAX's own backward, with its gradient flowing through the wrapper as before). Only
what the context names is touched, and only while the loss is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass
class _Sink:
    by_id: dict[int, tuple[int, jax.Array]]  # id(param leaf) -> (leaf index, accumulator)
    used: set[int] = dataclasses.field(default_factory=set)


_SINK: contextvars.ContextVar[_Sink | None] = contextvars.ContextVar("jds_gradient_sink",
                                                                     default=None)


@contextlib.contextmanager
def gradient_sink(params: PyTree, accumulators: PyTree) -> Iterator[set[int]]:
    """While tracing a loss: let layer scans accumulate the gradients of ``params``' leaves
    into ``accumulators``' (the same tree structure) in place.

    Yields the set of leaf indices (in ``jax.tree.leaves(params)`` order) whose gradient
    went into its accumulator: for those, the gradient of the loss with respect to the
    accumulator *is* the updated accumulator, and the gradient with respect to the
    parameter is zero.
    """
    leaves = jax.tree.leaves(params)
    accs = jax.tree.leaves(accumulators)
    if len(leaves) != len(accs):
        raise ValueError(f"gradient_sink: {len(leaves)} parameters, {len(accs)} accumulators")
    sink = _Sink({id(x): (i, a) for i, (x, a) in enumerate(zip(leaves, accs, strict=True))})
    token = _SINK.set(sink)
    try:
        yield sink.used
    finally:
        _SINK.reset(token)


def sink_for(params_L: dict[str, jax.Array]) -> dict[str, jax.Array] | None:
    """The accumulators of ``params_L``'s entries that an open ``gradient_sink`` names (by
    identity), or None when it names none of them (or no sink is open)."""
    sink = _SINK.get()
    if sink is None:
        return None
    found = {k: sink.by_id[id(v)] for k, v in params_L.items() if id(v) in sink.by_id}
    if not found:
        return None
    if any(acc.shape != params_L[k].shape for k, (_, acc) in found.items()):
        return None
    for i, _ in found.values():
        sink.used.add(i)
    return {k: acc for k, (_, acc) in found.items()}


@jax.custom_batching.custom_vmap
def add_at(acc: jax.Array, g: jax.Array, i: jax.Array) -> jax.Array:
    """``acc.at[i].add(g)`` along the leading axis, as a ``dynamic_update_slice`` (in place).

    Its own batching rule: JAX batches a dynamic-update-slice as a scatter, which XLA:CPU
    handles less well inside the backward loop (ZeRO 0/1 ``vmap`` their per-shard
    gradients: issue 19's ZeRO-1 peak was 10.37 bytes/param with the scatter, 9.96 with
    this); batched over the accumulator with one index, it is still one slice update."""
    cur = jax.lax.dynamic_index_in_dim(acc, i, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(acc, cur + g.astype(acc.dtype), i, 0)


@add_at.def_vmap
def _add_at_vmap(axis_size, in_batched, acc, g, i):
    acc_b, g_b, i_b = in_batched
    if i_b:  # a batched index: the general (scatter) form
        return jax.vmap(lambda a, b, j: a.at[j].add(b.astype(a.dtype)),
                        in_axes=(0 if acc_b else None, 0 if g_b else None, 0))(acc, g, i), True
    if not acc_b:
        acc = jnp.broadcast_to(acc, (axis_size, *acc.shape))
    if not g_b:
        g = jnp.broadcast_to(g, (axis_size, *g.shape))
    start = (jnp.zeros((), jnp.int32), jnp.asarray(i, jnp.int32)) + (jnp.zeros((), jnp.int32),) * (
        acc.ndim - 2)
    cur = jax.lax.dynamic_slice(acc, start, (axis_size, 1, *acc.shape[2:]))
    new = cur + g[:, None].astype(acc.dtype)
    return jax.lax.dynamic_update_slice(acc, new, start), True


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def scan_accumulating(layer: Callable[..., tuple[jax.Array, Any]], params_L: dict[str, jax.Array],
                      acc_L: dict[str, jax.Array], x: jax.Array, *args: Any
                      ) -> tuple[jax.Array, Any]:
    """``lax.scan`` of ``x, aux_l = layer(params_l, x, *args)`` over the layers (``(x,
    aux_L)``, the per-layer outputs stacked), whose backward pass adds the gradients of
    ``params_L[k]`` (for ``k`` in ``acc_L``) into ``acc_L[k]``.

    The forward value is the plain scan's; ``aux`` (layer state: running statistics) carries
    no gradient. Differentiated, the cotangent returned for ``acc_L[k]`` is ``acc_L[k]``
    plus the gradient of ``params_L[k]`` (fp32, in place), and ``params_L[k]`` gets none;
    entries not in ``acc_L`` get their stacked gradient as usual.
    ``args`` must carry no gradient (positions, segment ids): integer arrays or None.
    """
    names = sorted(params_L)
    sunk = [k for k in names if k in acc_L]
    plan: dict[str, Any] = {}

    def plain(params_L, x):
        return jax.lax.scan(lambda h, p: layer(p, h, *args), x, params_L)

    @jax.custom_vjp
    def run(params_L, acc_L, x):
        del acc_L
        return plain(params_L, x)

    def run_fwd(params_L, acc_L, x):
        # Differentiated: the sunk weights, and the other float weights the step is taking
        # gradients of (not frozen ones: a LoRA base gets none, as under JAX's own scan).
        diff = sunk + [k for k in names if k not in acc_L and params_L[k].perturbed
                       and _is_float(params_L[k].value)]
        params_L = {k: v.value for k, v in params_L.items()}
        acc_L = {k: v.value for k, v in acc_L.items()}
        plan["diff"] = diff

        def fwd_body(h, p):
            rest = {k: v for k, v in p.items() if k not in diff}
            out, vjp, aux = jax.vjp(lambda d, h_: layer({**rest, **d}, h_, *args),
                                    {k: p[k] for k in diff}, h, has_aux=True)
            leaves, treedef = jax.tree.flatten(vjp)
            weights = [p[k] for k in names]
            where, kept = [], []
            for r in leaves:  # a residual that is a weight of this layer: read from the stack
                hit = next((j for j, w in enumerate(weights) if r is w), None)
                if hit is None:
                    where.append((False, len(kept)))
                    kept.append(r)
                else:
                    where.append((True, hit))
            plan["treedef"], plan["where"] = treedef, where
            return out, (kept, jax.lax.stop_gradient(aux))

        out, (res, aux_L) = jax.lax.scan(fwd_body, x.value, params_L)
        return (out, aux_L), (res, params_L, acc_L)

    def run_bwd(saved, ct):
        res, params_L, acc_L = saved
        ct_out = ct[0]  # the layer state's cotangent: none flows back through statistics
        if isinstance(ct_out, jax.custom_derivatives.SymbolicZero):
            ct_out = jnp.zeros(ct_out.shape, ct_out.dtype)
        n = jax.tree.leaves(params_L)[0].shape[0]
        free = [k for k in plan["diff"] if k not in acc_L]

        def body(carry, xs):
            ct_h, acc = carry
            res_l, p_l, i = xs
            weights = [p_l[k] for k in names]
            leaves = [weights[j] if is_weight else res_l[j] for is_weight, j in plan["where"]]
            ct_p, ct_h = jax.tree.unflatten(plan["treedef"], leaves)(ct_h)
            acc = {k: add_at(acc[k], ct_p[k], i) for k in sunk}
            return (ct_h, acc), {k: ct_p[k] for k in free}

        (ct_x, acc), ct_free = jax.lax.scan(body, (ct_out, dict(acc_L)),
                                            (res, params_L, jnp.arange(n)), reverse=True)
        ct_params = {k: ct_free.get(k) for k in params_L}
        return ct_params, acc, ct_x

    run.defvjp(run_fwd, run_bwd, symbolic_zeros=True)
    return run(params_L, acc_L, x)


def args_carry_no_gradient(args: tuple) -> bool:
    """Whether every array in ``args`` is non-float (so ``scan_accumulating`` may take them)."""
    return not any(_is_float(a) for a in jax.tree.leaves(args))


__all__ = ["args_carry_no_gradient", "gradient_sink", "scan_accumulating", "sink_for"]
