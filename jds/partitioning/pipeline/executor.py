"""The pipeline executor: one ``shard_map``, manual over ``stage``, scanning the schedule's
tick table (see ``jds.partitioning.pipeline`` for the design).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jds.partitioning.pipeline.schedules import Schedule, tick_tables
from jds.partitioning.rules import active_rules, traced_sharding, use_rules

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageFns:
    """The model cut at stage boundaries (pure functions of parameter pytrees).

    Attributes:
      embed: ``(shared, ids_BT) -> x_BTD`` (the first virtual stage's prologue).
      layers: ``(chunk, x_BTD) -> x_BTD``, a chunk of the layer stack.
      loss: ``(shared, x_BTD, ids_BT, labels_BT) -> summed cross-entropy`` (fp32 scalar;
        the last virtual stage's epilogue: final norm, LM head, loss).
    """

    embed: Callable[[PyTree, jax.Array], jax.Array]
    layers: Callable[[PyTree, jax.Array], jax.Array]
    loss: Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def _without(spec: PartitionSpec, axis: str) -> PartitionSpec:
    out = []
    for e in spec:
        if e == axis:
            e = None
        elif isinstance(e, tuple):
            e = tuple(a for a in e if a != axis) or None
            if isinstance(e, tuple) and len(e) == 1:
                e = e[0]
        out.append(e)
    return PartitionSpec(*out)


def local_specs(specs: PyTree, axis: str = "stage") -> PyTree:
    """``specs`` with ``axis`` dropped: the layout of the per-stage blocks inside the
    ``shard_map`` (which is manual over ``axis``)."""
    return jax.tree.map(lambda s: _without(s, axis), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_pipeline_grads(
    fns: StageFns,
    sched: Schedule,
    mesh: jax.sharding.Mesh,
    *,
    shared_grad_specs: PyTree,
    layer_grad_specs: PyTree,
    act_spec: PartitionSpec | None = None,
    local_grads: tuple[tuple[str, ...], int] | None = None,
    forward_only: bool = False,
    axis: str = "stage",
) -> Callable[..., tuple[PyTree, PyTree, jax.Array]]:
    """Build ``grads(shared, layers, ids_ABT, labels_ABT, seed) -> (d_shared, d_layers, ce)``.

    Args:
      fns: the model's stage functions.
      sched: the schedule (``build_schedule``); ``sched.micro_batches`` must equal the
        batch's leading axis.
      mesh: the device mesh; ``axis`` is its pipeline axis.
      shared_grad_specs: per-leaf ``PartitionSpec`` of the shared (non-layer) gradients
        *inside* the map (``local_specs``): ZeRO-2/3 keep them sharded.
      layer_grad_specs: same for the stacked-layer gradients (one stage's block).
      act_spec: layout of one ``[B, T, D]`` activation inside the map; the buffers carry
        it with a leading slot axis.
      local_grads: ``(data axes, n)`` when the gradients are replicated over the data group
        (ZeRO 0/1): each backward then keeps per-data-shard weight gradients (a ``vmap``
        over the ``n`` batch shards with ``spmd_axis_name``, as the non-pipelined step
        does), and they are summed once after the schedule — one all-reduce per step
        instead of one per micro-batch. None: XLA reduces inside each backward (right for
        ZeRO-2/3, whose gradients are reduce-scattered per micro-batch anyway).
      forward_only: evaluation (``sched`` from ``forward_schedule``): no backward branches
        and no gradient buffers; the gradients come back as empty tuples.

    The returned function takes the shared (embedding, head) parameters replicated over
    ``axis``, the layer stack in pipeline order (sharded over ``axis`` on its first
    dimension; ``to_pipeline_order``), the batch ``[m, B, T]``, and the loss seed (the
    cotangent of the summed cross-entropy: ``loss_scale / valid targets``). It returns the
    fp32 gradients of ``seed * sum(cross-entropy)`` and the summed cross-entropy.
    """
    p, v, m = sched.stages, sched.virtual_stages, sched.micro_batches
    tables = tick_tables(sched)
    rows = tables.stacked()
    fwd_ring = [(s, (s + 1) % p) for s in range(p)]
    bwd_ring = [(s, (s - 1) % p) for s in range(p)]

    def constrain_tree(tree, specs):
        return jax.tree.map(
            lambda x, sp: jax.lax.with_sharding_constraint(x, traced_sharding(mesh, sp)),
            tree, specs)

    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if local_grads is not None:
        d_axes, n_shards = local_grads
        lead = (n_shards,)
        l_specs = jax.tree.map(lambda sp: PartitionSpec(d_axes, *sp), layer_grad_specs,
                               is_leaf=is_spec)
        s_specs = jax.tree.map(lambda sp: PartitionSpec(d_axes, *sp), shared_grad_specs,
                               is_leaf=is_spec)
    else:
        lead, l_specs, s_specs = (), layer_grad_specs, shared_grad_specs
    L0 = len(lead)  # the accumulators' layer axis

    def vjp(fn, params, batched, cot, *, cot_batched=True, diff_x=True):
        """Cotangents of ``fn(params, *batched)`` at ``cot``: ``(d_params, d_batched[0])``
        (``d_batched[0]`` is None unless ``diff_x``). With ``local_grads`` the batch is
        split into its data shards and ``d_params`` keeps a leading per-shard axis."""
        def grads(b, c):
            if diff_x:
                _, f = jax.vjp(lambda p, x: fn(p, x, *b[1:]), params, b[0])
                return f(c)
            _, f = jax.vjp(lambda p: fn(p, *b), params)
            return f(c)[0], None

        if local_grads is None:
            return grads(batched, cot)
        axes_, n = local_grads

        def split(a):
            return a.reshape(n, a.shape[0] // n, *a.shape[1:])

        mesh_, rules = active_rules()
        with use_rules(mesh_, {**rules, "batch": ()}):  # the shard axis carries the batch
            d_p, d_x = jax.vmap(grads, in_axes=(0, 0 if cot_batched else None),
                                spmd_axis_name=axes_)(
                tuple(split(a) for a in batched), split(cot) if cot_batched else cot)
        return d_p, None if d_x is None else d_x.reshape(batched[0].shape)

    def run(shared, layers, ids_ABT, labels_ABT, seed):
        if ids_ABT.shape[0] != m:
            raise ValueError(f"pipeline schedule built for {m} micro-batches, batch has "
                             f"{ids_ABT.shape[0]}")
        s = jax.lax.axis_index(axis)
        n_local = int(jax.tree.leaves(layers)[0].shape[0])
        Lc = n_local // v
        x0 = jax.eval_shape(fns.embed, shared, ids_ABT[0])

        def buffer(n):
            buf = jnp.zeros((n + 1, *x0.shape), x0.dtype)
            if act_spec is not None:
                spec = PartitionSpec(None, *act_spec)
                buf = jax.lax.with_sharding_constraint(buf, traced_sharding(mesh, spec))
            return buf

        if forward_only:
            acc_l, acc_s = (), ()
        else:
            acc_l = constrain_tree(jax.tree.map(
                lambda a: jnp.zeros(lead + a.shape, jnp.float32), layers), l_specs)
            acc_s = constrain_tree(jax.tree.map(
                lambda a: jnp.zeros(lead + a.shape, jnp.float32), shared), s_specs)
        init = (buffer(tables.x_slots), buffer(tables.g_slots), acc_l, acc_s,
                jnp.zeros((), jnp.float32))

        def tick(carry, row):
            xbuf, gbuf, acc_l, acc_s, ce = carry
            code, mb, c, xs, gs, xr, gr = (row[j, s] for j in range(7))
            ids, labels = ids_ABT[mb], labels_ABT[mb]
            chunk = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, c * Lc, Lc, 0),
                                 layers)
            x_in, g_in = xbuf[xs], gbuf[gs]
            zero_x = jnp.zeros(x0.shape, x0.dtype)

            def add_layers(acc, d):
                def one(a, g):
                    old = jax.lax.dynamic_slice_in_dim(a, c * Lc, Lc, L0)
                    return jax.lax.dynamic_update_slice_in_dim(
                        a, old + g.astype(jnp.float32), c * Lc, L0)
                return constrain_tree(jax.tree.map(one, acc, d), l_specs)

            def add_shared(acc, d):
                new = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, d)
                return constrain_tree(new, s_specs)

            def idle(ops):
                acc_l, acc_s, ce = ops
                return acc_l, acc_s, ce, zero_x, zero_x

            def f_first(ops):
                acc_l, acc_s, ce = ops
                return acc_l, acc_s, ce, fns.layers(chunk, fns.embed(shared, ids)), zero_x

            def f_mid(ops):
                acc_l, acc_s, ce = ops
                return acc_l, acc_s, ce, fns.layers(chunk, x_in), zero_x

            def f_last(ops):
                acc_l, acc_s, ce = ops
                ce = ce + fns.loss(shared, fns.layers(chunk, x_in), ids, labels)
                return acc_l, acc_s, ce, zero_x, zero_x

            def b_first(ops):
                acc_l, acc_s, ce = ops
                (d_sh, d_ch), _ = vjp(
                    lambda p, i: fns.layers(p[1], fns.embed(p[0], i)), (shared, chunk),
                    (ids,), g_in, diff_x=False)
                return add_layers(acc_l, d_ch), add_shared(acc_s, d_sh), ce, zero_x, zero_x

            def b_mid(ops):
                acc_l, acc_s, ce = ops
                d_ch, dx = vjp(fns.layers, chunk, (x_in,), g_in)
                return add_layers(acc_l, d_ch), acc_s, ce, zero_x, dx.astype(x0.dtype)

            def b_last(ops):
                acc_l, acc_s, ce = ops
                (d_sh, d_ch), dx = vjp(
                    lambda p, x, i, lab: fns.loss(p[0], fns.layers(p[1], x), i, lab),
                    (shared, chunk), (x_in, ids, labels), seed.astype(jnp.float32),
                    cot_batched=False)
                return (add_layers(acc_l, d_ch), add_shared(acc_s, d_sh), ce, zero_x,
                        dx.astype(x0.dtype))

            branches = [idle, f_first, f_mid, f_last]
            if not forward_only:
                branches += [b_first, b_mid, b_last]
            acc_l, acc_s, ce, send_x, send_g = jax.lax.switch(code, branches, (acc_l, acc_s, ce))
            recv_x = jax.lax.ppermute(send_x, axis, fwd_ring)
            recv_g = jax.lax.ppermute(send_g, axis, bwd_ring)
            xbuf = jax.lax.dynamic_update_index_in_dim(xbuf, recv_x, xr, 0)
            gbuf = jax.lax.dynamic_update_index_in_dim(gbuf, recv_g, gr, 0)
            return (xbuf, gbuf, acc_l, acc_s, ce), None

        (_, _, acc_l, acc_s, ce), _ = jax.lax.scan(tick, init, jnp.asarray(rows))
        if forward_only:
            return (), (), jax.lax.psum(ce, axis)
        if local_grads is not None:  # the step's one data-parallel all-reduce
            acc_l = constrain_tree(jax.tree.map(lambda a: a.sum(0), acc_l), layer_grad_specs)
            acc_s = jax.tree.map(lambda a: a.sum(0), acc_s)
        acc_s = jax.lax.psum(acc_s, axis)
        acc_s = constrain_tree(acc_s, shared_grad_specs)
        return acc_s, acc_l, jax.lax.psum(ce, axis)

    stage_spec, rep = PartitionSpec(axis), PartitionSpec()
    return jax.shard_map(
        run, mesh=mesh, in_specs=(rep, stage_spec, rep, rep, rep),
        out_specs=(rep, stage_spec, rep), axis_names={axis}, check_vma=False,
    )


def _reorder(layers: PyTree, first: int, second: int) -> PyTree:
    """Swap the two leading factors of every stack's layer axis: ``[first, second, Lc]``
    becomes ``[second, first, Lc]`` (flattened back)."""
    def perm(a):
        Lc = a.shape[0] // (first * second)
        return a.reshape(first, second, Lc, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return jax.tree.map(perm, layers)


def to_pipeline_order(layers: PyTree, stages: int, virtual_stages: int) -> PyTree:
    """The layer stack ``[L, ...]`` reordered so that device ``s``'s contiguous block holds
    its virtual stages ``s, s + p, ...`` (identity for ``v = 1``)."""
    if virtual_stages == 1:
        return layers
    return _reorder(layers, virtual_stages, stages)


def from_pipeline_order(layers: PyTree, stages: int, virtual_stages: int) -> PyTree:
    """Inverse of ``to_pipeline_order``."""
    if virtual_stages == 1:
        return layers
    return _reorder(layers, stages, virtual_stages)


__all__ = [
    "StageFns",
    "from_pipeline_order",
    "local_specs",
    "make_pipeline_grads",
    "to_pipeline_order",
]
