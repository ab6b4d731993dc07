"""Pipeline schedules as tick tables: GPipe, 1F1B and interleaved (Megatron's order).

Each schedule is a program per device (the order it runs its forwards and backwards);
one list scheduler (``build_schedule``) runs every device's next action as soon as its
inputs exist, and ``tick_tables`` turns the result into the integer tables the executor
(``executor.py``) scans over. Pure Python and numpy: no JAX tracing here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

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
    "TickTables",
    "build_schedule",
    "check_layers",
    "check_schedule_args",
    "forward_schedule",
    "tick_tables",
]
