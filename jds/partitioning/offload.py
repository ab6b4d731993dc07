"""ZeRO-Offload as memory kinds: the fp32 master weights and optimizer state (and, under
ZeRO-3, the parameters) in host memory, the update streamed through the device inside the
one compiled train step.

Every array of the train state has a sharding, and a sharding has a memory kind:
``device``, ``pinned_host`` or ``unpinned_host`` (JAX's memory kinds; the CPU backend has
them too). DeepSpeed's ``zero_optimization.offload_optimizer: {"device": "cpu"}`` is, in
jds, nothing more than the host memory kind on the shardings of ``state.master`` and
``state.opt_state`` (``pin_memory`` picks ``pinned_host`` or ``unpinned_host``), with the
ZeRO stage's partitioning unchanged: under stage 1-3 every data-parallel device's host
holds its own shard. The compute copy
(bf16/fp16 ``state.params``), the gradients and the activations stay in device memory, so
the persistent device bytes are DeepSpeed's ZeRO-Offload figures (2 bytes/param of bf16
parameters under stage 1/2, ``2/Nd`` under stage 3). ``ratio`` (DeepSpeed's Twin-Flow)
gives the host kind to that share of the parameters' states only.

**Where the update runs.** ``streamed_update`` brings the states to the device a chunk at a
time inside the compiled step, after the gradients exist, applies the optax update there
and sends the results back to host memory; the next chunk's host-to-device copy is ordered
after the previous-but-one chunk's results (double buffering, with
``jax.lax.optimization_barrier``), so the device holds at most two chunks of
master/optimizer state at any time, not the whole 12 bytes/param. A chunk is one parameter
leaf (for jds's scanned models, one weight matrix of every layer: ``[layers, ...]``) or
several small leaves merged up to the size of the largest one. XLA schedules the copies as
asynchronous transfers on GPU and TPU, so they overlap the update of the chunk before.

Not taken: running the update on the host with ``jax.experimental.compute_on("device_host")``
(DeepSpeed's CPU-Adam path, which moves fewer bytes: gradients down and bf16 weights up).
In JAX 0.10 an array in ``pinned_host`` memory is *typed* as host memory inside ``jit``, and
``jax.lax`` refuses to mix it with device-typed values; optax and jds's optimizers create
device-typed arrays inside ``update`` (the step counter's increment under the skip
condition, a ``jnp.where`` in LAMB), so a host-side update fails to trace for Adam under
``lax.cond`` and for LAMB at all (tried; ``ValueError: memory_space of all inputs passed to
select_n must be the same``). The streamed update needs no such typing: every optimizer
computes on device arrays, as without offload. On a GPU the streamed update also keeps the
optimizer on the fast processor (DeepSpeed's CPU Adam is what its users find slow); that it
is the faster of the two there is reasoning, not yet a measurement (no GPU so far).

**Parameter offload** (ZeRO-Infinity's ``offload_param: {"device": "cpu"}``, stage 3): the
parameters (the compute copy and frozen ones) rest in host memory too, sharded as ZeRO-3
shards them. The model's ``ParamGather`` copies each parameter to the device at its point
of use — one layer's shard inside the layer scan, then the usual per-layer all-gather — so
the device never holds more than the layers in flight. Under JAX's memory-space typing the
cotangent of a host-resident parameter is host-resident: each layer's gradient shard goes
back to host memory in the backward scan, as in DeepSpeed, and the step brings the
gradients back to the device (ZeRO-3-sharded, ``4/Nd`` bytes/param) to accumulate and
clip them. With both offloads, the device's persistent state is empty: everything but the
batch is a host-memory argument of the compiled step.

**Chunking by zero-size leaves.** The optimizers jds builds (``jds.optim``: Adam, AdamW,
LAMB, Lion) are per-leaf: a leaf's new value and moments depend only on that leaf and the
scalar step counts. So one chunk's update is ``tx.update`` on the whole tree with every
leaf outside the chunk replaced by a zero-size array (no work, no bytes), and the chunk's
leaves are read back from its result; scalar states (the counts) are equal in every
chunk's result. A transformation with cross-leaf state (a global norm kept in the state)
would not be per-leaf; jds builds none.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

PyTree = Any

HOST_KINDS: tuple[str, ...] = ("pinned_host", "unpinned_host")
DEVICE_KIND = "device"


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """Which states live in host memory, and which memory kind that is.

    Attributes:
      optimizer: the memory kind of the fp32 master weights and the optimizer state
        (``"pinned_host"``/``"unpinned_host"``), or None (device memory).
      params: the memory kind of the parameters (compute copy and frozen ones) at rest
        (ZeRO-3's ``offload_param``), or None (device memory).
      ratio: the fraction of them offloaded (DeepSpeed's Twin-Flow ``ratio``): whole
        parameters, in tree order, until that fraction of the parameters is reached; the
        rest stay in device memory and are updated there.
    """

    optimizer: str | None = None
    ratio: float = 1.0
    params: str | None = None
    nvme_path: str | None = None
    buffer_count: int = 4
    params_nvme_path: str | None = None
    pipeline_write: bool = False

    @property
    def any(self) -> bool:
        """Whether anything is offloaded."""
        return self.optimizer is not None or self.params is not None

    @property
    def nvme(self) -> bool:
        """Whether the master weights and optimizer state live on NVMe
        (``jds.partitioning.nvme``; ``optimizer`` is then their host memory kind when they
        are read back for a checkpoint)."""
        return self.nvme_path is not None

    def describe(self) -> str:
        """One line for logs and ``jds estimate``."""
        parts = []
        if self.params_nvme_path is not None:
            parts.append(f"parameters on NVMe under {self.params_nvme_path} (in host memory "
                         f"({self.params}) during a step)")
        elif self.params is not None:
            parts.append(f"parameters in host memory ({self.params})")
        if self.nvme:
            parts.append(f"master weights and optimizer state on NVMe under {self.nvme_path} "
                         f"({self.buffer_count} host buffers)")
        elif self.optimizer is not None:
            share = "" if self.ratio >= 1 else f" for a {self.ratio:g} share of the parameters"
            parts.append(f"master weights and optimizer state in host memory "
                         f"({self.optimizer}){share}")
        return "; ".join(parts) or "no offload"

    def place(self, shardings: PyTree, shapes: PyTree) -> PyTree:
        """The master weights' shardings with this plan's memory kinds.

        Args:
          shardings: ``NamedSharding`` per trainable parameter (device memory).
          shapes: the parameters (anything with ``.shape``), to count the ratio's share.
        """
        if self.optimizer is None:
            return shardings
        if self.ratio >= 1:
            return with_kind(shardings, self.optimizer)
        leaves, treedef = jax.tree.flatten(shardings)
        sizes = [int(np.prod(x.shape)) for x in treedef.flatten_up_to(shapes)]
        total, used, out = sum(sizes), 0, []
        for sh, size in zip(leaves, sizes, strict=True):
            # whole parameters, while the offloaded share stays nearest to the ratio
            host = abs(used + size - self.ratio * total) <= abs(used - self.ratio * total)
            used += size if host else 0
            out.append(sh.with_memory_kind(self.optimizer if host else DEVICE_KIND))
        return treedef.unflatten(out)


def _memory_kinds(devices: Sequence[jax.Device]) -> set[str]:
    try:
        return {m.kind for m in devices[0].addressable_memories()}
    except (AttributeError, NotImplementedError, RuntimeError):
        return {DEVICE_KIND}


def _host_kind(key: str, pin: bool, devices: Sequence[jax.Device], what: str) -> str:
    kind = "pinned_host" if pin else "unpinned_host"
    kinds = _memory_kinds(devices)
    if kind not in kinds:
        raise ValueError(
            f"{key}: the {devices[0].platform} devices have no {kind!r} memory space (they "
            f"have {sorted(kinds)}), so {what} cannot be placed in host memory; "
            + ("set pin_memory to false, or " if kind == "pinned_host"
               and "unpinned_host" in kinds else "")
            + "remove the offload section")
    return kind


def offload_plan(zero: Any, devices: Sequence[jax.Device] | None = None) -> OffloadPlan:
    """The ``OffloadPlan`` of a ``zero_optimization`` section.

    ``offload_optimizer.device: "cpu"`` (or DeepSpeed's deprecated ``cpu_offload: true``)
    offloads the master weights and optimizer state, to ``pinned_host`` unless
    ``pin_memory`` (or ``cpu_offload_use_pin_memory``) is false; ``ratio`` (stage 3;
    DeepSpeed's Twin-Flow) offloads that share of the parameters' states.
    ``offload_param.device: "cpu"`` (or ``cpu_offload_param: true``; stage 3 only, as in
    DeepSpeed) keeps the parameters in host memory. ``offload_optimizer.device: "nvme"``
    keeps the master weights and optimizer state in swap files under ``nvme_path``
    (``jds.partitioning.nvme``); ``offload_param.device: "nvme"`` keeps the parameters in
    swap files between steps, in host memory during a step (stage 3).

    Raises:
      ValueError: the devices have no memory space of the requested kind, parameter
        offload without stage 3, an NVMe ``nvme_path`` missing, not a folder or not
        writable, or a partial NVMe offload (naming the key).
    """
    devices = jax.devices() if devices is None else devices
    opt, par = zero.offload_optimizer, zero.offload_param
    optimizer = params = nvme_path = None
    if (opt is not None and opt.device in ("cpu", "nvme")) or (
            opt is None and bool(zero.cpu_offload)):
        key = ("zero_optimization.offload_optimizer" if opt is not None
               else "zero_optimization.cpu_offload")
        pin = opt.pin_memory if opt is not None else zero.cpu_offload_use_pin_memory is not False
        optimizer = _host_kind(key, pin, devices, "the optimizer state")
        if opt is not None and opt.device == "nvme":
            from jds.partitioning.nvme import check_nvme_path

            nvme_path = check_nvme_path(key, opt.nvme_path)
            if opt.ratio < 1:
                raise ValueError(f"{key}.ratio: a partial offload ({opt.ratio:g}) is built for "
                                 "device \"cpu\" only; use ratio 1 with \"nvme\"")
    params_nvme_path = None
    if (par is not None and par.device in ("cpu", "nvme")) or (
            par is None and bool(zero.cpu_offload_param)):
        key = ("zero_optimization.offload_param" if par is not None
               else "zero_optimization.cpu_offload_param")
        if zero.stage != 3:
            raise ValueError(f"{key}: parameter offload needs zero_optimization.stage 3 (as in "
                             f"DeepSpeed), got stage {zero.stage}")
        pin = par.pin_memory if par is not None else zero.cpu_offload_use_pin_memory is not False
        params = _host_kind(key, pin, devices, "the parameters")
        if par is not None and par.device == "nvme":
            from jds.partitioning.nvme import check_nvme_path

            params_nvme_path = check_nvme_path(key, par.nvme_path)
    return OffloadPlan(optimizer=optimizer, params=params,
                       ratio=1.0 if opt is None else float(opt.ratio), nvme_path=nvme_path,
                       buffer_count=4 if opt is None else int(opt.buffer_count),
                       params_nvme_path=params_nvme_path,
                       pipeline_write=opt is not None and bool(opt.pipeline_write))


def with_kind(shardings: PyTree, kind: str | None) -> PyTree:
    """``shardings`` (a tree of ``NamedSharding``) in memory ``kind`` (None: unchanged)."""
    if kind is None:
        return shardings
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                        is_leaf=lambda s: isinstance(s, NamedSharding))


def memory_kind(x: Any) -> str:
    """The memory kind of an array or ``ShapeDtypeStruct`` (``"device"`` when unset;
    ``"nvme"`` for a leaf in swap files, ``jds.partitioning.nvme.OnDisk``)."""
    if getattr(x, "memory_kind", None) == "nvme":
        return "nvme"
    sharding = getattr(x, "sharding", None)
    kind = getattr(sharding, "memory_kind", None)
    return DEVICE_KIND if kind is None else kind


def bytes_by_kind(tree: PyTree) -> dict[str, int]:
    """Per-device bytes of ``tree``'s leaves, by memory kind (``{"device": n, ...}``)."""
    from jds.partitioning.memory import shard_bytes

    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        kind = memory_kind(x)
        out[kind] = out.get(kind, 0) + shard_bytes(x)
    return out


def available_host_memory() -> int | None:
    """Bytes of host memory available to allocate (``MemAvailable`` in ``/proc/meminfo``,
    else ``sysconf``), or None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(state: PyTree, plan: OffloadPlan, local_devices: int,
                      available: int | None = None) -> int:
    """Refuse an offload whose host-resident states do not fit this host, before any
    array is made.

    Args:
      state: the train state's shapes with their shardings (``ShapeDtypeStruct``s).
      plan: the offload plan (for the error's key names).
      local_devices: this process's devices: each holds its own shard in host memory.
      available: host bytes available (default ``available_host_memory()``).

    Returns:
      The host bytes the offloaded states need on this process.

    Raises:
      ValueError: they need more than is available (naming the keys and both sizes).
    """
    need = bytes_by_kind(state)
    need = sum(v for k, v in need.items() if k != DEVICE_KIND) * local_devices
    available = available_host_memory() if available is None else available
    if available is not None and need > available:
        keys = [k for k, on in (("offload_optimizer", plan.optimizer),
                                ("offload_param", plan.params)) if on]
        raise ValueError(
            f"zero_optimization.{' and '.join(keys)}: the offloaded states need "
            f"{need / 2**20:,.1f} MiB of host memory on this process ({local_devices} "
            f"device(s)), but {available / 2**20:,.1f} MiB is available; free host memory, "
            "offload a share (offload_optimizer.ratio, stage 3), or spread the run over more "
            "hosts")
    return need


# XLA's memory space number for host memory in layouts (``f32[2,4]{1,0:S(5)}``).
_HOST_SPACE = "S(5)"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")


def _arrays(text: str) -> list[tuple[int, bool]]:
    """``(bytes, in host memory)`` of each array type in an HLO shape list."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out.append((n * _DTYPE_BYTES[dtype], _HOST_SPACE in (layout or "")))
    return out


def entry_memory(hlo_text: str) -> dict[str, int]:
    """Per-device bytes of a compiled program's arguments and outputs by memory space, read
    from its entry layout (``compiled.as_text()``), and the host bytes outputs alias.

    ``memory_analysis()`` on XLA:CPU counts host-memory arguments as device arguments
    (``host_argument_size_in_bytes`` stays 0), so the split is read from the layouts, where
    a host-memory array carries memory space 5 (``{1,0:S(5)}``).

    Returns:
      ``argument_device``, ``argument_host``, ``output_device``, ``output_host``,
      ``alias_host`` (host bytes of outputs that reuse a donated argument's buffer).
    """
    start = hlo_text.find("entry_computation_layout={")
    if start < 0:
        raise ValueError("no entry_computation_layout in the HLO text")
    depth, i = 0, start + len("entry_computation_layout=")
    while i < len(hlo_text):  # to the layout's closing brace
        depth += {"{": 1, "}": -1}.get(hlo_text[i], 0)
        if depth == 0:
            break
        i += 1
    layout = hlo_text[start + len("entry_computation_layout={"):i]
    arrow = layout.rindex(")->")
    args, outs = _arrays(layout[:arrow]), _arrays(layout[arrow + 3:])
    alias_host = 0
    am = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*entry_computation_layout", hlo_text)
    if am is not None:
        for param in re.findall(r"\((\d+), \{[^}]*\}, [\w-]+\)", am.group(1)):
            size, host = args[int(param)]
            alias_host += size if host else 0
    total = lambda xs, host: sum(b for b, h in xs if h == host)  # noqa: E731
    return {"argument_device": total(args, False), "argument_host": total(args, True),
            "output_device": total(outs, False), "output_host": total(outs, True),
            "alias_host": alias_host}


def chunk_leaves(sizes: Sequence[int], limit: int = 0) -> list[list[int]]:
    """Leaf indices grouped into update chunks: each leaf alone, or neighbouring leaves
    merged while the chunk stays within ``limit`` or the largest leaf's size, whichever is
    larger (``sizes``: bytes or elements per leaf).
    """
    budget = max(max(sizes, default=0), limit)
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        chunks.append(current)
    return chunks


def _empty_like(x: jax.Array) -> jax.Array:
    return jnp.zeros((0,), x.dtype)


@dataclasses.dataclass(frozen=True)
class OffloadedStates:
    """The shardings ``streamed_update`` moves states between (trees like the states).

    Attributes:
      opt_device, opt_home: the optimizer state in device memory (where a chunk is
        computed) and in its own, host, memory (where results go).
      master_device, master_home: the same for the fp32 master weights; None in fp32
        training, where the weights are the device-resident params.
    """

    opt_device: PyTree
    opt_home: PyTree
    master_device: PyTree | None = None
    master_home: PyTree | None = None


def leaf_owners(tx: optax.GradientTransformation, opt_state: PyTree, treedef: Any
                ) -> list[int]:
    """Which parameter leaf (index in ``treedef``'s order) each leaf of ``opt_state``
    belongs to; -1 for a state that is not per-parameter (a scalar step count)."""
    n = treedef.num_leaves
    return jax.tree.leaves(optax.tree_map_params(
        tx, lambda _, i: i, opt_state, treedef.unflatten(list(range(n))),
        transform_non_params=lambda _: -1))


def update_chunk(tx: optax.GradientTransformation, treedef: Any, o_treedef: Any,
                 grads: list, opt: list, weights: list, *, finite: jax.Array,
                 factor: jax.Array | None) -> tuple[list, list]:
    """One chunk's optax update: ``tx.update`` on the whole trees, every leaf outside the
    chunk zero-size (see the module docstring), the gradients scaled by the clipping
    ``factor``; a step whose gradients are not ``finite`` keeps the old values.

    Args:
      treedef, o_treedef: the structures of the parameters and of the optimizer state.
      grads, opt, weights: their leaves (flat lists).

    Returns:
      ``(new weight leaves, new optimizer-state leaves)``.
    """
    if factor is not None:
        grads = [g * factor.astype(g.dtype) for g in grads]
    old_w = treedef.unflatten(weights)
    updates, new_o = tx.update(treedef.unflatten(grads), o_treedef.unflatten(opt), old_w)
    new_w = treedef.flatten_up_to(optax.apply_updates(old_w, updates))
    pick = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return ([pick(a, b) for a, b in zip(new_w, weights, strict=True)],
            [pick(a, b) for a, b in zip(o_treedef.flatten_up_to(new_o), opt, strict=True)])


def streamed_update(
    tx: optax.GradientTransformation,
    grads: PyTree,
    opt_state: PyTree,
    weights: PyTree,
    where: OffloadedStates,
    *,
    finite: jax.Array,
    factor: jax.Array | None,
    compute_dtype: Any = None,
) -> tuple[PyTree, PyTree, PyTree | None]:
    """The optax update of host-resident states, streamed through the device chunk by chunk.

    Args:
      tx: the optax transformation (per-leaf; see the module docstring).
      grads: fp32 gradients on device.
      opt_state: the optimizer state (host memory).
      weights: the fp32 weights: the master copy in host memory when
        ``where.master_device`` is set, else the device-resident params (fp32 training).
      where: the device and home shardings of the states.
      finite: whether the gradients are finite; a step that is not keeps the old states.
      factor: the gradient clipping factor, or None.
      compute_dtype: with master weights, the dtype of the compute copy made from each
        chunk's new weights while they are on device.

    Returns:
      ``(new weights, new optimizer state, new compute copy or None)``: the first two in
      their home memory, the compute copy (mixed precision) in device memory.
    """
    g_leaves, treedef = jax.tree.flatten(grads)
    w_leaves = treedef.flatten_up_to(weights)
    n = len(g_leaves)
    owner = leaf_owners(tx, opt_state, treedef)
    o_leaves, o_treedef = jax.tree.flatten(opt_state)
    o_dev = o_treedef.flatten_up_to(where.opt_device)
    o_home = o_treedef.flatten_up_to(where.opt_home)
    on_host = where.master_device is not None
    w_dev = treedef.flatten_up_to(where.master_device) if on_host else None
    w_home = treedef.flatten_up_to(where.master_home) if on_host else None
    scalars = [j for j, i in enumerate(owner) if i < 0]

    new_w: list[Any] = [None] * n
    new_p: list[Any] = [None] * n
    new_o: list[Any] = [None] * len(o_leaves)
    done: list[Any] = []  # each chunk's host-bound results, for the double-buffering order
    for c, chunk in enumerate(chunk_leaves([int(np.prod(g.shape)) for g in g_leaves])):
        keep = set(chunk)
        mine = [j for j, i in enumerate(owner) if i in keep] + (scalars if c == 0 else [])
        host_in = ([o_leaves[j] for j in mine], [w_leaves[i] for i in chunk] if on_host else [])
        if c >= 2:  # this chunk's copy starts once chunk c-2's results have left the device
            host_in, _ = jax.lax.optimization_barrier((host_in, done[c - 2]))
        o_in = dict(zip(mine, host_in[0], strict=True))
        w_in = dict(zip(chunk, host_in[1], strict=True)) if on_host else {}
        # this chunk's leaves on device; every other leaf zero-size (no work, no bytes)
        o_sel = [jax.device_put(o_in.get(j, o_leaves[j]), o_dev[j])
                 if j in o_in or owner[j] < 0 else _empty_like(o_leaves[j])
                 for j in range(len(o_leaves))]
        w_sel = [(jax.device_put(w_in[i], w_dev[i]) if on_host else w_leaves[i])
                 if i in keep else _empty_like(w_leaves[i]) for i in range(n)]
        g_sel = [g_leaves[i] if i in keep else _empty_like(g_leaves[i]) for i in range(n)]
        upd_w, upd_o = update_chunk(tx, treedef, o_treedef, g_sel, o_sel, w_sel,
                                    finite=finite, factor=factor)
        out = []
        for j in mine:
            new_o[j] = jax.device_put(upd_o[j], o_home[j])
            out.append(new_o[j])
        for i in chunk:
            w = upd_w[i]
            if on_host:
                new_p[i] = w.astype(compute_dtype)
                w = jax.device_put(w, w_home[i])
                out.append(w)
            new_w[i] = w
        done.append(out)
    params = treedef.unflatten(new_p) if on_host else None
    return treedef.unflatten(new_w), o_treedef.unflatten(new_o), params


__all__ = [
    "DEVICE_KIND",
    "HOST_KINDS",
    "OffloadPlan",
    "OffloadedStates",
    "available_host_memory",
    "bytes_by_kind",
    "check_host_memory",
    "chunk_leaves",
    "entry_memory",
    "leaf_owners",
    "memory_kind",
    "offload_plan",
    "streamed_update",
    "update_chunk",
    "with_kind",
]
