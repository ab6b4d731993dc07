"""Pipeline parallelism inside one SPMD program: GPipe, 1F1B and interleaved schedules.

The layer stack is split over the mesh's ``stage`` axis (the rules map ``layers`` to
``stage``). The schedule is explicit: a ``shard_map`` that is manual over ``stage`` only
runs a ``lax.scan`` over *ticks*; at every tick each stage does what the schedule's table
says for it — the forward of one micro-batch through one of its layer chunks, the backward
(a ``jax.vjp``) of one, or nothing — and then two ``ppermute`` s move activations one stage
forward and cotangents one stage back. The other mesh axes stay automatic inside the map,
so ZeRO 0-3 (each stage's states sharded over its data group, ZeRO-3 weights gathered per
layer) and tensor parallelism compose with every schedule unchanged. DeepSpeed forbids its
pipeline with ZeRO-2/3 and MaxText has no 1F1B; here the three are one executor driven by
three tables.

Schedules (``pipeline.schedule``), with ``p`` stages, ``m`` micro-batches
(``gradient_accumulation_steps``, as in DeepSpeed) and ``v`` virtual stages per device:

- ``gpipe``: every forward, then every backward. Each stage holds all ``m`` micro-batches'
  inputs at the turn.
- ``1f1b``: ``p - s - 1`` warm-up forwards on stage ``s``, then one forward and one
  backward alternately, then the remaining backwards. In-flight micro-batches per stage are
  bounded by ``p``, not ``m``.
- ``interleaved`` (Megatron's): each device holds ``v`` chunks of ``L / (p v)`` layers —
  device ``s`` runs virtual stages ``s, s + p, ...`` — so the fill and drain cost ``1/v``
  as much; ``m`` must be a multiple of ``p``.

Each table comes from one list scheduler (``build_schedule``): every device has its
program order and runs its next action as soon as its inputs exist, so the tables (and the
bubble ``jds explain --pipeline`` prints) are what the executor runs, tick for tick.

Design choices, and why:

- **Stage-granular recomputation.** A stage keeps only the *input* of each in-flight
  micro-batch; its backward re-runs the stage's forward under ``jax.vjp``. Keeping the
  ``vjp`` residuals instead would store a copy of every weight the residuals close over
  (they are indistinguishable from activations once traced). The price is one extra
  forward per stage and micro-batch (DeepSpeed pays it too with activation
  checkpointing); the saved-activation buffer is exactly "in-flight micro-batches x one
  activation", the quantity the schedules differ in. Inside that recomputation the model's
  ``remat`` mode applies, and ``pipeline.activation_checkpoint_interval = k`` checkpoints
  every ``k`` layers (DeepSpeed's meaning).
- **Embeddings and the LM head are replicated over ``stage``** (still ZeRO-sharded over
  the data group) and used only by the first and last virtual stage; their gradients are
  summed over ``stage`` once per step, as DeepSpeed all-reduces tied embeddings between
  its first and last stage. Sharding them over ``stage`` would save ``(p-1)/p`` of their
  bytes but put a collective of every stage inside the first and last stage's work.
- **Interleaved weights move once per step.** The state keeps the layer stack in model
  order (checkpoints, conversion and restore onto other layouts stay layout-free), so for
  ``v > 1`` the step permutes the stack into pipeline order (an all-to-all over ``stage``)
  and the gradients back. Keeping it permuted at rest would save that transfer.
- Partitioning: the layer stacks are homogeneous, so DeepSpeed's ``partition_method``
  ``"parameters"`` and ``"uniform"`` give the same split (``L / p`` layers per stage);
  ``"type:..."`` has no meaning here and is refused. Layer counts that do not divide are
  refused with the numbers to change.

Data-parallel gradient reduction: under ZeRO 0/1 (gradients replicated) each backward
keeps per-data-shard weight gradients (``vmap`` with ``spmd_axis_name``, as the plain step's
``_local_grads``) and they are all-reduced once after the schedule, not once per
micro-batch; under ZeRO-2/3 each backward's gradients are reduce-scattered into the
sharded accumulator, as ZeRO-2/3 do. Known cost: every tick sends one activation each
way, also when a stage idles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jds.partitioning.rules import active_rules, traced_sharding, use_rules

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved")

PyTree = Any


# ------------------------------------------------------------------------------ schedules
@dataclasses.dataclass(frozen=True)
class Action:
    """One unit of work: the forward ``"F"`` or backward ``"B"`` of micro-batch ``mb``
    through this device's layer chunk ``chunk`` (virtual stage ``chunk * p + device``)."""

    kind: str
    mb: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def _programs(schedule: str, p: int, m: int, v: int) -> list[list[Action]]:
    """Each device's actions in program order."""
    F = lambda i, c=0: Action("F", i, c)  # noqa: E731
    B = lambda i, c=0: Action("B", i, c)  # noqa: E731
    progs = []
    for s in range(p):
        if schedule == "gpipe":
            progs.append([F(i) for i in range(m)] + [B(i) for i in range(m)])
        elif schedule == "1f1b":
            warm = min(p - s - 1, m)
            prog = [F(i) for i in range(warm)]
            for i in range(m - warm):
                prog += [F(warm + i), B(i)]
            prog += [B(i) for i in range(m - warm, m)]
            progs.append(prog)
        else:  # interleaved (Megatron-LM's order): micro-batches in groups of p per chunk
            fwd = [F(g * p + j, c) for g in range(m // p) for c in range(v) for j in range(p)]
            bwd = [B(g * p + j, c) for g in range(m // p) for c in reversed(range(v))
                   for j in range(p)]
            warm = min((p - s - 1) * 2 + (v - 1) * p, m * v)
            prog = fwd[:warm]
            for i in range(m * v - warm):
                prog += [fwd[warm + i], bwd[i]]
            prog += bwd[m * v - warm:]
            progs.append(prog)
    return progs


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule as a table of ticks.

    Attributes:
      name: ``"gpipe" | "1f1b" | "interleaved"``.
      stages, micro_batches, virtual_stages: ``p``, ``m``, ``v``.
      ticks: ``ticks[t][s]`` is the ``Action`` device ``s`` runs at tick ``t`` (or None).
    """

    name: str
    stages: int
    micro_batches: int
    virtual_stages: int
    ticks: tuple[tuple[Action | None, ...], ...]

    @property
    def bubble_fraction(self) -> float:
        """Idle cells of the table over all cells (a forward and a backward = one tick)."""
        cells = len(self.ticks) * self.stages
        idle = sum(a is None for row in self.ticks for a in row)
        return idle / cells

    @property
    def theoretical_bubble(self) -> float:
        """``(p - 1) / (v m + p - 1)``: the fill-and-drain fraction with equal-time ticks.

        (Megatron-LM writes the ratio to useful time, ``(p - 1) / (v m)``.)
        """
        p, m, v = self.stages, self.micro_batches, self.virtual_stages
        return (p - 1) / (v * m + p - 1)

    def in_flight(self) -> list[int]:
        """Most micro-batch inputs each device holds at once (forward done, backward not)."""
        peak = []
        for s in range(self.stages):
            live, most = 0, 0
            for row in self.ticks:
                a = row[s]
                if a is not None:
                    live += 1 if a.kind == "F" else -1
                most = max(most, live)
            peak.append(most)
        return peak

    def render(self) -> str:
        """The tick-by-tick table, one row per tick, one column per stage."""
        width = max(5, *(len(str(a)) for row in self.ticks for a in row if a is not None))
        head = "tick  " + "  ".join(f"{'stage ' + str(s):>{width}}" for s in range(self.stages))
        rows = [head]
        for t, row in enumerate(self.ticks):
            cells = "  ".join(f"{(str(a) if a else '.'):>{width}}" for a in row)
            rows.append(f"{t:>4}  {cells}")
        return "\n".join(rows)

    def report(self) -> str:
        """Table, bubble measured from it, and theory (``jds explain --pipeline``)."""
        p, m, v = self.stages, self.micro_batches, self.virtual_stages
        lines = [
            f"pipeline schedule {self.name}: stages p={p}, micro-batches m={m}"
            + (f", virtual stages v={v}" if v > 1 else ""),
            self.render(),
            f"ticks: {len(self.ticks)} (a forward or a backward of one micro-batch through "
            f"one {'chunk' if v > 1 else 'stage'} per tick)",
            f"bubble (idle cells / all cells, from the table): {self.bubble_fraction:.4f}",
            f"theory (p-1)/(v*m+p-1) = {p - 1}/({v}*{m}+{p - 1}) = {self.theoretical_bubble:.4f}",
            f"micro-batch inputs held per stage (peak): {self.in_flight()}",
        ]
        return "\n".join(lines)


def check_schedule_args(schedule: str, p: int, m: int, v: int) -> None:
    """Raise ``ValueError`` naming the config key when the schedule cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline.schedule={schedule!r}: choose one of {list(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"pipeline needs stages, micro-batches and virtual stages >= 1; got "
                         f"p={p}, m={m}, v={v}")
    if v > 1 and schedule != "interleaved":
        raise ValueError(f"pipeline.virtual_stages={v} needs pipeline.schedule='interleaved' "
                         f"(got {schedule!r}); or set virtual_stages to 1")
    if schedule == "interleaved" and m % p:
        raise ValueError(
            f"pipeline.schedule='interleaved' runs micro-batches in groups of mesh.stage={p}; "
            f"gradient_accumulation_steps={m} is not a multiple of {p}"
        )


def forward_schedule(stages: int, micro_batches: int, virtual_stages: int = 1) -> Schedule:
    """Forwards only (evaluation): every micro-batch through every virtual stage, chunk by
    chunk, as early as its input exists. Any ``micro_batches`` works."""
    p, m, v = stages, micro_batches, virtual_stages
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"pipeline needs stages, micro-batches and virtual stages >= 1; got "
                         f"p={p}, m={m}, v={v}")
    progs = [[Action("F", i, c) for c in range(v) for i in range(m)] for _ in range(p)]
    return Schedule("forward", p, m, v, _list_schedule(progs, "forward", p, v))


def build_schedule(schedule: str, stages: int, micro_batches: int, virtual_stages: int = 1
                   ) -> Schedule:
    """List-schedule each device's program into ticks.

    A forward of virtual stage ``k`` may run once the forward of ``k - 1`` ran in an
    earlier tick (its output arrives at the end of that tick); a backward once its own
    forward ran and, except on the last virtual stage, the backward of ``k + 1``.

    Raises:
      ValueError: an unknown schedule or arguments it cannot run with.
    """
    p, m, v = stages, micro_batches, virtual_stages
    check_schedule_args(schedule, p, m, v)
    progs = _programs(schedule, p, m, v)
    return Schedule(schedule, p, m, v, _list_schedule(progs, schedule, p, v))


def _list_schedule(progs: list[list[Action]], name: str, p: int, v: int
                   ) -> tuple[tuple[Action | None, ...], ...]:
    """Run each device's program in order, an action as soon as its inputs exist."""
    K = p * v
    done: dict[tuple[str, int, int], int] = {}  # (kind, mb, virtual stage) -> tick
    pos = [0] * p
    ticks: list[tuple[Action | None, ...]] = []
    while any(pos[s] < len(progs[s]) for s in range(p)):
        t = len(ticks)
        row: list[Action | None] = []
        for s in range(p):
            a = progs[s][pos[s]] if pos[s] < len(progs[s]) else None
            if a is not None:
                k = a.chunk * p + s
                if a.kind == "F":
                    ready = k == 0 or done.get(("F", a.mb, k - 1), t) < t
                else:
                    ready = done.get(("F", a.mb, k), t) < t and (
                        k == K - 1 or done.get(("B", a.mb, k + 1), t) < t)
                if not ready:
                    a = None
            row.append(a)
        for s, a in enumerate(row):
            if a is not None:
                done[(a.kind, a.mb, a.chunk * p + s)] = t
                pos[s] += 1
        if all(a is None for a in row):
            raise RuntimeError(f"pipeline schedule {name} deadlocked at tick {t}")
        ticks.append(tuple(row))
    return tuple(ticks)


# ------------------------------------------------------------------------------ executor
# Per-tick work codes: what a device does at a tick, given its virtual stage.
IDLE, F_FIRST, F_MID, F_LAST, B_FIRST, B_MID, B_LAST = range(7)


@dataclasses.dataclass(frozen=True)
class TickTables:
    """The schedule as integer tables ``[ticks, stages]`` the compiled scan indexes.

    Attributes:
      code: work code (``IDLE``, ``F_FIRST`` ... ``B_LAST``).
      mb, chunk: micro-batch and layer chunk of the work.
      x_slot: activation-buffer slot read by the work (its stage input).
      g_slot: cotangent-buffer slot read by a backward.
      x_recv, g_recv: slot the activation / cotangent arriving at the end of the tick is
        stored in (``x_slots`` / ``g_slots``: a scratch slot, nothing arrives).
      x_slots, g_slots: live slots needed (buffers hold one more, the scratch slot).
    """

    code: np.ndarray
    mb: np.ndarray
    chunk: np.ndarray
    x_slot: np.ndarray
    g_slot: np.ndarray
    x_recv: np.ndarray
    g_recv: np.ndarray
    x_slots: int
    g_slots: int

    def stacked(self) -> np.ndarray:
        """``[ticks, 7, stages]`` int32, the scan's per-tick input."""
        return np.stack([self.code, self.mb, self.chunk, self.x_slot, self.g_slot,
                         self.x_recv, self.g_recv], axis=1).astype(np.int32)


def _assign_slots(intervals: list[tuple[int, int, Any]]) -> tuple[dict[Any, int], int]:
    """Interval colouring: ``(first tick, last tick, key)`` -> slot, fewest slots."""
    ends: list[int] = []  # last tick each slot is busy
    slot_of: dict[Any, int] = {}
    for start, end, key in sorted(intervals, key=lambda x: x[0]):
        for j, busy in enumerate(ends):
            if busy < start:
                ends[j] = end
                slot_of[key] = j
                break
        else:
            slot_of[key] = len(ends)
            ends.append(end)
    return slot_of, len(ends)


def tick_tables(sched: Schedule) -> TickTables:
    """Compile ``sched`` into ``TickTables``: work codes and buffer slots per tick.

    An activation sent by virtual stage ``k - 1`` at tick ``t`` is stored at the end of
    ``t`` and held until the backward of ``k`` for that micro-batch (forward and backward
    both read it); a cotangent from ``k + 1`` is held until the backward of ``k``. Slots
    are reused as soon as they are free, so the buffers hold the schedule's peak.
    """
    p, v = sched.stages, sched.virtual_stages
    K = p * v
    when: dict[tuple[str, int, int], int] = {}
    for t, row in enumerate(sched.ticks):
        for s, a in enumerate(row):
            if a is not None:
                when[(a.kind, a.mb, a.chunk * p + s)] = t
    x_iv: list[list] = [[] for _ in range(p)]
    g_iv: list[list] = [[] for _ in range(p)]
    for (kind, mb, k), t in when.items():
        if kind != "F":
            continue
        s = k % p
        last_use = when.get(("B", mb, k), t)  # forward-only schedules: the forward itself
        if k > 0:
            x_iv[s].append((when[("F", mb, k - 1)] + 1, last_use, (mb, k)))
        if k < K - 1 and ("B", mb, k) in when:
            g_iv[s].append((when[("B", mb, k + 1)] + 1, last_use, (mb, k)))
    x_slot_of, g_slot_of, nx, ng = [], [], 0, 0
    for s in range(p):
        xs, n1 = _assign_slots(x_iv[s])
        gs, n2 = _assign_slots(g_iv[s])
        x_slot_of.append(xs)
        g_slot_of.append(gs)
        nx, ng = max(nx, n1), max(ng, n2)
    T = len(sched.ticks)
    shape = (T, p)
    code, mb_t, chunk_t = np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, int)
    x_slot, g_slot = np.full(shape, nx), np.full(shape, ng)
    x_recv, g_recv = np.full(shape, nx), np.full(shape, ng)
    for t, row in enumerate(sched.ticks):
        for s, a in enumerate(row):
            if a is None:
                continue
            k = a.chunk * p + s
            first, last = k == 0, k == K - 1
            mb_t[t, s], chunk_t[t, s] = a.mb, a.chunk
            if k > 0:
                x_slot[t, s] = x_slot_of[s][(a.mb, k)]
            if a.kind == "F":
                code[t, s] = F_FIRST if first else F_LAST if last else F_MID
                if not last:  # the output arrives at the next virtual stage
                    r = (s + 1) % p
                    x_recv[t, r] = x_slot_of[r][(a.mb, k + 1)]
            else:
                code[t, s] = B_FIRST if first else B_LAST if last else B_MID
                if not last:
                    g_slot[t, s] = g_slot_of[s][(a.mb, k)]
                if not first:  # the input cotangent goes back to the previous stage
                    r = (s - 1) % p
                    g_recv[t, r] = g_slot_of[r][(a.mb, k - 1)]
    return TickTables(code, mb_t, chunk_t, x_slot, g_slot, x_recv, g_recv, nx, ng)


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


def check_layers(n_layers: int, stages: int, virtual_stages: int) -> None:
    """Raise ``ValueError`` when ``n_layers`` does not split evenly over the stages."""
    chunks = stages * virtual_stages
    if n_layers % chunks:
        lo = n_layers // chunks * chunks
        hint = f"{lo} or {lo + chunks}" if lo else f"{chunks}"
        raise ValueError(
            f"the model's {n_layers} layers do not split into mesh.stage={stages} x "
            f"pipeline.virtual_stages={virtual_stages} = {chunks} equal chunks; use a model "
            f"with {hint} layers, or another stage count (uneven stages are not supported)"
        )


__all__ = [
    "SCHEDULES",
    "Action",
    "Schedule",
    "StageFns",
    "TickTables",
    "build_schedule",
    "forward_schedule",
    "check_layers",
    "check_schedule_args",
    "from_pipeline_order",
    "local_specs",
    "make_pipeline_grads",
    "tick_tables",
    "to_pipeline_order",
]
