"""ZeRO-Infinity's NVMe tier: the fp32 master weights and the optimizer state in files,
swapped through host buffers and updated on the device a chunk at a time
(``NvmeOptimizer``), and the parameters in files between steps (``NvmeParams``).

``zero_optimization.offload_optimizer: {"device": "nvme", "nvme_path": ...}``. Where the
``"cpu"`` device gives those states a host memory kind (``jds.partitioning.offload``), this
tier keeps them in a swap folder under ``nvme_path``, one raw file per state leaf and
distinct shard this process holds (a ZeRO shard under stages 1-3), and the train state
holds ``OnDisk`` descriptions of them (shape, dtype, home sharding) in their place.

**A step.** The compiled train step computes the gradients, the loss-scale update, the
global norm and the clipping factor, as without offload, and hands the gradients out in
the optimizer's layout instead of updating (``StepConfig.update_outside``). Then
``NvmeOptimizer.update`` streams the states through the device a chunk at a time: a chunk
is neighbouring parameters up to ``zero_optimization.sub_group_size`` elements (DeepSpeed's
sub-groups; a larger parameter is a chunk of its own), with their master weights and
optimizer moments. A reader thread reads chunk after chunk from the files into fresh
host buffers and puts them on the device; the main thread runs the chunk's optax update
(one compiled function per chunk, the per-leaf update the ``"cpu"`` tier streams too,
``offload.update_chunk``); a writer thread brings the results back and writes them over
the chunk's files. Reads run ahead and writes behind while the device updates, within a
host-memory budget of ``buffer_count`` buffers, each one state tensor of the largest
chunk (DeepSpeed's meaning: buffers for the optimizer's state tensors of a sub-group; with
Adam under mixed precision a chunk takes 3, master weights and two moments, so
``buffer_count >= 6`` lets one chunk be read while another is updated). Host memory for
the states therefore stays at ``buffer_count`` tensors, whatever the model's size; the
device holds the compute copy, the gradients and the chunks in flight. Fewer, larger
chunks mean fewer compiled functions (each costs a compilation and, on XLA:CPU, about 2
MiB of code: a 16-layer MLP split per parameter held 70 MB more than one chunk did).

**Why files and threads, not TensorStore or ``io_callback``.** Each process reads and
writes only its own shards, whole, in one pass: a raw file per shard and
``readinto``/``write`` on a fresh buffer is the whole job, and Python's file calls
release the GIL, so the I/O overlaps the device's work with no extra dependency. With
the loop on the host the buffers in flight are counted and bounded (``_Budget``); inside
one compiled step (``io_callback``), XLA would decide when each read happens and how many
are alive.

**Crash safety.** The swap folder is scratch, private to one engine
(``nvme_path/jds-swap-<pid>-<random>``, removed when the engine closes or the process
exits): checkpoints never point into it, so a crash mid-step leaves the last checkpoint
as it was. An update that fails half-way leaves some chunks updated and some not; the
engine then refuses to train until a checkpoint is loaded (``load_checkpoint`` rewrites
every file).

**Checkpoints** are written by Orbax from the swap files one leaf at a time
(``for_checkpoint``: jds's streaming ``LazyLeaf`` writer, the one the converters use; the
same on-disk format, so a checkpoint of an NVMe run restores onto any run, offloaded or
not, and back); the next update waits until the save has read them. Restoring reads them
a chunk at a time into the files (Orbax partial restores). A fresh state does not pass
through host memory whole either: its master weights and moments are made on the device a
chunk at a time from the fresh fp32 weights and written out (``init_from``), so a model
whose optimizer state exceeds host memory can start.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jds.partitioning.offload import DEVICE_KIND, chunk_leaves, leaf_owners, update_chunk

PyTree = Any
NVME_KIND = "nvme"  # what ``offload.memory_kind`` reports for an ``OnDisk`` leaf


@dataclasses.dataclass(frozen=True, eq=False)
class OnDisk:
    """A train-state leaf whose values live in a swap file (``SwapStore``).

    It has what the state's consumers read from a leaf without its values: ``shape``,
    ``dtype``, ``ndim``, ``size`` and ``sharding`` (the home sharding, host memory: where
    a checkpoint restores it), and ``memory_kind`` ``"nvme"``.
    """

    key: str
    shape: tuple[int, ...]
    dtype: Any
    sharding: NamedSharding

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    memory_kind = NVME_KIND


def on_disk(x: Any) -> bool:
    """Whether ``x`` is an ``OnDisk`` leaf."""
    return isinstance(x, OnDisk)


def _index_key(index: tuple, shape: Sequence[int]) -> tuple:
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _raw(a: np.ndarray) -> memoryview:
    """The bytes of a contiguous array (any dtype, bfloat16 included) for file I/O."""
    return memoryview(a.reshape(-1).view(np.uint8))


def _aligned(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A fresh buffer on a 64-byte boundary: on the CPU backend ``device_put`` then uses it
    in place instead of copying it (XLA:CPU's alignment). From the heap: a fresh anonymous
    ``mmap`` per buffer (tried) read 12.6 MB in 9 ms instead of 1.3 ms, every page faulted
    in anew."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


class _Budget:
    """Bytes of host buffers in flight, at most ``limit`` (one request larger than the
    limit is let through alone, so nothing deadlocks)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.peak = limit, 0, 0
        self._cv = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Take ``n`` bytes (False, taking nothing, once ``stop`` is set)."""
        with self._cv:
            self._cv.wait_for(lambda: stop.is_set() or self.used == 0
                              or self.used + n <= self.limit)
            if stop.is_set():
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


class SwapStore:
    """One process's swap files: a raw file per leaf and distinct shard it holds.

    Args:
      nvme_path: the folder to make the swap folder in (must exist and be writable).
    """

    def __init__(self, nvme_path: str | os.PathLike) -> None:
        self.folder = tempfile.mkdtemp(prefix=f"jds-swap-{os.getpid()}-",
                                       dir=os.fspath(nvme_path))
        # leaf key -> [(index key, file path, shard shape, devices)]
        self._shards: dict[str, list[tuple[tuple, str, tuple, list]]] = {}
        # removed when the store goes, or at exit (a finalizer's atexit default)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def close(self) -> None:
        """Remove the swap folder."""
        self._finalizer()

    def _layout(self, leaf: OnDisk, sharding: NamedSharding) -> list:
        if leaf.key not in self._shards:
            groups: dict[tuple, list] = {}
            for dev, index in sharding.addressable_devices_indices_map(leaf.shape).items():
                groups.setdefault(_index_key(index, leaf.shape), []).append(dev)
            shard_shape = tuple(sharding.shard_shape(leaf.shape))
            self._shards[leaf.key] = [
                (k, os.path.join(self.folder, f"{leaf.key}.{i}"), shard_shape, devs)
                for i, (k, devs) in enumerate(sorted(groups.items()))]
        return self._shards[leaf.key]

    def write(self, leaf: OnDisk, value: jax.Array) -> None:
        """Write ``value`` (laid out as ``leaf.sharding``, any memory kind) to its files."""
        by_index = {_index_key(s.index, leaf.shape): s for s in value.addressable_shards}
        for k, path, _, _ in self._layout(leaf, leaf.sharding):
            data = np.ascontiguousarray(np.asarray(by_index[k].data))
            with open(path, "wb", buffering=0) as f:
                f.write(_raw(data))

    def read_whole(self, leaf: OnDisk) -> np.ndarray:
        """``leaf``'s whole value, assembled from its shard files (a process that holds
        every shard: a single-process run)."""
        out = np.empty(leaf.shape, np.dtype(leaf.dtype))
        for k, path, shard_shape, _ in self._layout(leaf, leaf.sharding):
            buf = np.empty(shard_shape, out.dtype)
            with open(path, "rb", buffering=0) as f:
                f.readinto(_raw(buf))
            out[tuple(slice(a, b) for a, b in k)] = buf
        return out

    def read(self, leaf: OnDisk, sharding: NamedSharding) -> jax.Array:
        """``leaf``'s values as an array laid out as ``sharding`` (same partitioning as
        ``leaf.sharding``, in device or host memory), one fresh host buffer per shard."""
        arrays, devices = [], []
        for _, path, shard_shape, devs in self._layout(leaf, leaf.sharding):
            buf = _aligned(shard_shape, np.dtype(leaf.dtype))
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(_raw(buf))
            if got != buf.nbytes:
                raise OSError(f"{path}: read {got} of {buf.nbytes} bytes (the swap file is "
                              "short; was the swap folder changed under the run?)")
            for d in devs:
                arrays.append(jax.device_put(buf, jax.sharding.SingleDeviceSharding(
                    d, memory_kind=sharding.memory_kind)))
                devices.append(d)
        order = {d: i for i, d in enumerate(devices)}
        local = [arrays[order[d]] for d in sharding.addressable_devices_indices_map(leaf.shape)]
        return jax.make_array_from_single_device_arrays(leaf.shape, sharding, local)


@dataclasses.dataclass(frozen=True)
class _Chunk:
    params: list[int]  # parameter leaves updated together
    states: list[int]  # their optimizer-state leaves
    nbytes: int  # host bytes of the chunk's master weights and states


class NvmeOptimizer:
    """The master weights and optimizer state of a run in a ``SwapStore``, and their update.

    Args:
      tx: the optax transformation (per-leaf, as ``offload.streamed_update`` needs).
      state: the train state's shapes (``jax.ShapeDtypeStruct`` leaves, or arrays):
        ``init_from`` makes its master weights and optimizer state in the files.
      shardings: the state's shardings (``state_shardings``; host memory kinds).
      param_shardings: the compute copy's shardings (device memory).
      compute_dtype: the compute copy's dtype.
      nvme_path: the folder for the swap folder.
      buffer_count: host buffers for state tensors in flight (see the module docstring).
      sub_group_size: elements (this process's) of parameters updated together, as
        DeepSpeed's ``zero_optimization.sub_group_size``: neighbouring parameters merge
        into one chunk up to this size; a larger parameter is a chunk of its own.
      write_behind: DeepSpeed's ``pipeline_write``: the update returns before the last
        chunks are written, and the writes run on while the next step computes its
        gradients (a failed write is then reported by the next step, a save or a read);
        False: every write is done when ``update`` returns.
    """

    def __init__(self, tx: optax.GradientTransformation, state: Any, shardings: Any, *,
                 param_shardings: PyTree, compute_dtype: Any,
                 nvme_path: str | os.PathLike, buffer_count: int,
                 sub_group_size: int = 10**9, write_behind: bool = False) -> None:
        self.tx, self.compute_dtype, self.write_behind = tx, compute_dtype, write_behind
        self.mixed = state.master is not None
        self.store = SwapStore(nvme_path)
        weights = state.master if self.mixed else state.params
        w_leaves, self.treedef = jax.tree.flatten(weights)
        self.owner = leaf_owners(tx, state.opt_state, self.treedef)
        o_leaves, self.o_treedef = jax.tree.flatten(state.opt_state)
        self.o_home = self.o_treedef.flatten_up_to(shardings.opt_state)
        self.w_home = self.treedef.flatten_up_to(shardings.master) if self.mixed else None
        self.p_shardings = self.treedef.flatten_up_to(param_shardings)
        self.w_like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in w_leaves]
        self.o_like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in o_leaves]
        # the leaves that go to disk: every master leaf, every per-parameter state
        self.w_disk = [OnDisk(f"master{i}", tuple(x.shape), x.dtype, self.w_home[i])
                       for i, x in enumerate(w_leaves)] if self.mixed else None
        self.o_disk = [OnDisk(f"opt{j}", tuple(x.shape), x.dtype, self.o_home[j])
                       if self.owner[j] >= 0 else None for j, x in enumerate(o_leaves)]
        # a tensor: one parameter's fp32 state (its master weights, or a moment) as this
        # process keeps it; chunks of up to sub_group_size elements (DeepSpeed's sub-groups)
        if self.mixed:
            tensor = [swap_bytes(d) for d in self.w_disk]
        else:
            tensor = [max([swap_bytes(self.o_disk[j]) for j, o in enumerate(self.owner)
                           if o == i], default=0) for i in range(len(w_leaves))]
        self.chunks = []
        for ps in chunk_leaves([t // 4 for t in tensor], sub_group_size):
            keep = set(ps)
            states = [j for j, i in enumerate(self.owner) if i in keep]
            disk = [self.o_disk[j] for j in states] + (
                [self.w_disk[i] for i in ps] if self.mixed else [])
            self.chunks.append(_Chunk(ps, states, sum(swap_bytes(d)
                                                      for d in disk)))
        self._chunk_of = {id(d): c for c, chunk in enumerate(self.chunks) for d in (
            [self.o_disk[j] for j in chunk.states]
            + ([self.w_disk[i] for i in chunk.params] if self.mixed else []))}
        # one buffer: the largest chunk's tensor (DeepSpeed: a sub-group's state tensor)
        self.buffer_bytes = max([sum(tensor[i] for i in c.params) for c in self.chunks],
                                default=0)
        self.budget_bytes = max(1, buffer_count) * self.buffer_bytes
        self.budget = _Budget(self.budget_bytes)  # held from a read until its write is done
        self._pending: list[Future] = []  # the last update's writes, still running
        self._write_error: BaseException | None = None
        self._updates: dict[int, Callable] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="jds-nvme-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jds-nvme-write")

    # --------------------------------------------------------------------------- state
    def attach(self, state: Any) -> Any:
        """``state`` with this store's ``OnDisk`` leaves in the places of the master weights
        and per-parameter optimizer states (whatever is there: None from the compiled step,
        stale arrays)."""
        o_leaves = self.o_treedef.flatten_up_to(state.opt_state)
        opt = self.o_treedef.unflatten([x if d is None else d
                                        for d, x in zip(self.o_disk, o_leaves, strict=True)])
        master = self.treedef.unflatten(self.w_disk) if self.mixed else state.master
        return state.replace(master=master, opt_state=opt)

    def init_from(self, state: Any, weights: PyTree) -> Any:
        """Make the fresh master weights and optimizer state from the fp32 ``weights``
        (device memory) chunk by chunk, straight into the swap files, so host memory never
        holds more than a chunk of them; returns ``state`` (the rest of the fresh state,
        without them) with ``OnDisk`` leaves in their places."""
        self.settle()
        w_leaves = self.treedef.flatten_up_to(weights)
        dev = lambda sh: sh.with_memory_kind(DEVICE_KIND)  # noqa: E731
        empty = lambda like: jnp.zeros((0,), like.dtype)  # noqa: E731
        for chunk in self.chunks:
            def init(w, chunk=chunk):
                w_in = dict(zip(chunk.params, w, strict=True))
                full = [w_in.get(i, empty(like)) for i, like in enumerate(self.w_like)]
                o = self.o_treedef.flatten_up_to(self.tx.init(self.treedef.unflatten(full)))
                return w if self.mixed else [], [o[j] for j in chunk.states]

            out = ([dev(self.w_home[i]) for i in chunk.params] if self.mixed else [],
                   [dev(self.o_home[j]) for j in chunk.states])
            ws, os_ = jax.jit(init, out_shardings=out)([w_leaves[i] for i in chunk.params])
            for j, x in zip(chunk.states, os_, strict=True):
                self.store.write(self.o_disk[j], x)
            if self.mixed:
                for i, x in zip(chunk.params, ws, strict=True):
                    self.store.write(self.w_disk[i], x)
            del ws, os_
        return self.attach(state)

    def settle(self) -> None:
        """Before every file is written anew (a restore, a fresh state): the pending writes
        done, their error forgotten."""
        try:
            self.flush()
        except BaseException:
            pass
        self._write_error = None

    def materialise(self, tree: PyTree) -> PyTree:
        """``tree`` (a state field) with its ``OnDisk`` leaves read into host memory, laid
        out as their home shardings."""
        self.flush()
        return jax.tree.map(lambda x: self.store.read(x, x.sharding) if on_disk(x) else x,
                            tree)

    def chunk_of(self, leaf: Any) -> int | None:
        """The update chunk an ``OnDisk`` leaf of this store belongs to (None for any other
        leaf): checkpoints restore the swap files a chunk at a time."""
        return self._chunk_of.get(id(leaf)) if on_disk(leaf) else None

    def for_checkpoint(self, tree: PyTree) -> PyTree:
        """``tree`` (a state field) ready for Orbax (``for_checkpoint``)."""
        self.flush()
        return for_checkpoint(self.store, tree)

    def disk_bytes(self) -> int:
        """Bytes this process keeps in its swap files."""
        return sum(swap_bytes(d) for d in self.disk_leaves)

    @property
    def disk_leaves(self) -> list[OnDisk]:
        """The leaves kept in swap files."""
        return [d for d in self.o_disk if d is not None] + list(self.w_disk or [])

    def close(self) -> None:
        """Stop the I/O threads and remove the swap folder."""
        self.settle()
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.store.close()

    # -------------------------------------------------------------------------- update
    def _update_fn(self, c: int) -> Callable:
        """The compiled update of chunk ``c``: ``(grads, states, weights, scalars, finite,
        factor) -> (new weights, new states, new scalars, new compute copy)``."""
        if c in self._updates:
            return self._updates[c]
        chunk, n, n_o = self.chunks[c], len(self.w_like), len(self.o_like)
        scalars = [j for j, i in enumerate(self.owner) if i < 0]
        empty = lambda like: jnp.zeros((0,), like.dtype)  # noqa: E731

        def update(g, o, w, s, finite, factor):
            o_in = dict(zip(chunk.states, o, strict=True)) | dict(zip(scalars, s, strict=True))
            w_in = dict(zip(chunk.params, w, strict=True))
            g_in = dict(zip(chunk.params, g, strict=True))
            g_sel = [g_in.get(i, empty(self.w_like[i])) for i in range(n)]
            w_sel = [w_in.get(i, empty(self.w_like[i])) for i in range(n)]
            o_sel = [o_in.get(j, empty(self.o_like[j])) for j in range(n_o)]
            new_w, new_o = update_chunk(self.tx, self.treedef, self.o_treedef, g_sel, o_sel,
                                        w_sel, finite=finite, factor=factor)
            ws = [new_w[i] for i in chunk.params]
            p = [x.astype(self.compute_dtype) for x in ws] if self.mixed else ws
            return ws, [new_o[j] for j in chunk.states], [new_o[j] for j in scalars], p

        dev = lambda sh: sh.with_memory_kind(DEVICE_KIND)  # noqa: E731
        w_out = ([dev(self.w_home[i]) for i in chunk.params] if self.mixed
                 else [self.p_shardings[i] for i in chunk.params])
        out = (w_out, [dev(self.o_home[j]) for j in chunk.states],
               [dev(self.o_home[j]) for j in scalars],
               [self.p_shardings[i] for i in chunk.params])
        fn = jax.jit(update, out_shardings=out, donate_argnums=(1, 2) if self.mixed else (1,))
        self._updates[c] = fn
        return fn

    def _read_chunk(self, c: int) -> tuple[list, list]:
        chunk = self.chunks[c]
        dev = lambda d: d.sharding.with_memory_kind(DEVICE_KIND)  # noqa: E731
        o = [self.store.read(self.o_disk[j], dev(self.o_disk[j])) for j in chunk.states]
        w = ([self.store.read(self.w_disk[i], dev(self.w_disk[i])) for i in chunk.params]
             if self.mixed else [])
        return o, w

    def _reads(self, out: queue.Queue, stop: threading.Event, budget: _Budget) -> None:
        """The reader thread: chunk after chunk, within the host-memory budget, until the
        main thread stops it."""
        for c, chunk in enumerate(self.chunks):
            if not budget.acquire(chunk.nbytes, stop):
                return
            try:
                out.put((c, self._read_chunk(c)))
            except BaseException as e:  # handed to the main thread, which raises it
                budget.release(chunk.nbytes)
                out.put((c, e))
                return

    def _write_chunk(self, c: int, ws: list, os_: list, budget: _Budget) -> None:
        chunk = self.chunks[c]
        try:
            for j, x in zip(chunk.states, os_, strict=True):
                self.store.write(self.o_disk[j], x)
            if self.mixed:
                for i, x in zip(chunk.params, ws, strict=True):
                    self.store.write(self.w_disk[i], x)
        finally:
            budget.release(chunk.nbytes)

    def flush(self) -> None:
        """Wait for the last update's writes (they run on while the next step computes its
        gradients: DeepSpeed's ``pipeline_write``). Every read of the files, and every
        rewrite, comes after this.

        Raises:
          OSError (or what the write raised): a write failed; the files are partly
          updated until a restore or ``init_from`` rewrites them all.
        """
        pending, self._pending = self._pending, []
        for f in pending:
            try:
                f.result()
            except BaseException as e:
                self._write_error = self._write_error or e
        if self._write_error is not None:
            raise self._write_error

    def update(self, state: Any, grads: PyTree, finite: jax.Array,
               factor: jax.Array | None) -> Any:
        """Apply the optimizer update to the states on disk and return the new state.

        Args:
          state: the train state after the gradient step (``OnDisk`` master weights and
            optimizer state; in fp32 the device-resident params are the weights).
          grads: fp32 gradients, laid out as the optimizer state (device memory).
          finite: whether the gradients are finite (a step that is not keeps the states).
          factor: the clipping factor, or None.
        """
        g_leaves = self.treedef.flatten_up_to(grads)
        o_leaves = self.o_treedef.flatten_up_to(state.opt_state)
        scalars = [j for j, i in enumerate(self.owner) if i < 0]
        old_s = [o_leaves[j] for j in scalars]
        p_leaves = self.treedef.flatten_up_to(state.params)
        new_p = list(p_leaves)
        new_s = old_s
        if factor is None:
            factor = jnp.ones((), jnp.float32)
        self.flush()  # the last step's writes, which ran during this step's gradients
        budget = self.budget
        reads: queue.Queue = queue.Queue()
        stop = threading.Event()
        reader = self._reader.submit(self._reads, reads, stop, budget)
        writes: list[Future] = []
        try:
            for c, chunk in enumerate(self.chunks):
                got_c, got = reads.get()
                if isinstance(got, BaseException):
                    raise got
                assert got_c == c
                o, w = got
                if not self.mixed:  # fp32: the weights are the params (on the device)
                    w = [jax.device_put(p_leaves[i], self.p_shardings[i].with_memory_kind(
                        DEVICE_KIND)) for i in chunk.params]
                ws, os_, s, p = self._update_fn(c)(
                    [g_leaves[i] for i in chunk.params], o, w, old_s, finite, factor)
                del o, w, got
                if c == 0:
                    new_s = s
                for i, x in zip(chunk.params, p, strict=True):
                    new_p[i] = x
                writes.append(self._writer.submit(self._write_chunk, c, ws, os_, budget))
        except BaseException:
            stop.set()  # the reader stops at its next chunk; the chunks read are dropped
            budget.wake()
            reader.result()
            self._pending = writes
            try:
                self.flush()
            except BaseException:
                pass
            self.budget = _Budget(self.budget_bytes)  # what the dropped chunks held
            raise
        reader.result()
        self._pending = writes
        if not self.write_behind:  # else written behind, while the next step computes
            self.flush()
        opt = list(o_leaves)
        for j, x in zip(scalars, new_s, strict=True):
            opt[j] = x
        return state.replace(params=self.treedef.unflatten(new_p),
                             opt_state=self.o_treedef.unflatten(opt))


def for_checkpoint(store: SwapStore, tree: PyTree) -> PyTree:
    """``tree`` (a state field) ready for Orbax: in a single-process run each ``OnDisk`` leaf
    becomes a ``LazyLeaf`` that Orbax's writer reads from the swap files when it gets to it,
    one leaf at a time (host memory: the largest leaf, not the states); with several
    processes (each holding its own shards) the leaves are read into host memory. The
    caller must not change the files before the save is written (the engine waits for it)."""
    if jax.process_count() > 1:
        return jax.tree.map(lambda x: store.read(x, x.sharding) if on_disk(x) else x, tree,
                            is_leaf=on_disk)
    from jds.checkpoint.orbax import LazyLeaf

    return jax.tree.map(lambda x: LazyLeaf(x.shape, x.dtype, lambda _, x=x: (
        store.read_whole(x))) if on_disk(x) else x, tree, is_leaf=on_disk)


class NvmeParams:
    """ZeRO-Infinity's ``offload_param: {"device": "nvme"}`` (stage 3), staged a step at a
    time: the parameters (the compute copy and frozen ones) rest in swap files between
    steps and are read into host memory (their ``offload_param`` layout: pinned host
    memory, ZeRO-3 shards) for a step, evaluation or prediction, where the step brings
    each layer's shard to the device inside the layer scan as with ``device: "cpu"``; the
    new compute copy is written back after the update. Host memory thus holds the compute
    copy (2 bytes/param over the hosts, bf16) during a step and nothing at rest. Not
    built: reading each layer from the files inside the compiled step (DeepSpeed's
    per-module NVMe fetch, which bounds host memory by ``buffer_count`` x ``buffer_size``
    during the step too).

    Args:
      nvme_path: the folder for the swap folder.
      state: a train state whose ``params`` and ``frozen`` are arrays (or shapes) laid out
        as they rest in host memory.
    """

    def __init__(self, nvme_path: str | os.PathLike, state: Any) -> None:
        self.store = SwapStore(nvme_path)
        p, self.p_def = jax.tree.flatten(state.params, is_leaf=on_disk)
        f, self.f_def = jax.tree.flatten(state.frozen, is_leaf=on_disk)
        describe = lambda key, x: OnDisk(key, tuple(x.shape), x.dtype, x.sharding)  # noqa: E731
        self.p_disk = [describe(f"param{i}", x) for i, x in enumerate(p)]
        self.f_disk = [describe(f"frozen{i}", x) for i, x in enumerate(f)]
        self._mine = {id(d) for d in self.p_disk + self.f_disk}

    @property
    def disk_leaves(self) -> list[OnDisk]:
        """The leaves kept in swap files."""
        return self.p_disk + self.f_disk

    def owns(self, leaf: Any) -> bool:
        """Whether ``leaf`` is one of this store's ``OnDisk`` leaves."""
        return id(leaf) in self._mine

    def put(self, state: Any, frozen: bool = True) -> Any:
        """``state`` with its parameters in the swap files: arrays written (frozen ones
        only with ``frozen``: after a step they are the ones read), ``OnDisk`` leaves and
        None (a restore that wrote them) kept as they are, all replaced by ``OnDisk``."""
        def put(disk, tree, treedef, write):
            for d, x in zip(disk, treedef.flatten_up_to(tree), strict=True):
                if write and x is not None and not on_disk(x):
                    self.store.write(d, x)
            return treedef.unflatten(disk)

        return state.replace(params=put(self.p_disk, state.params, self.p_def, True),
                             frozen=put(self.f_disk, state.frozen, self.f_def, frozen))

    def live(self, state: Any) -> Any:
        """``state`` with its parameters read from the swap files into host memory."""
        read = lambda t: jax.tree.map(  # noqa: E731
            lambda x: self.store.read(x, x.sharding) if on_disk(x) else x, t, is_leaf=on_disk)
        return state.replace(params=read(state.params), frozen=read(state.frozen))

    def close(self) -> None:
        """Remove the swap folder."""
        self.store.close()


def check_nvme_path(key: str, path: str | None) -> str:
    """``path`` if it is an existing, writable folder, else a ValueError naming ``key``."""
    if not path:
        raise ValueError(f"{key}.nvme_path: required with device \"nvme\" (a folder on a fast "
                         "local disk for the swap files)")
    if not os.path.isdir(path):
        raise ValueError(f"{key}.nvme_path: {path!r} is not a folder; create it or point "
                         "nvme_path at an existing one")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{key}.nvme_path: cannot write in {path!r} ({e.strerror}); give the "
                         "run write access or choose another folder") from None
    return path


def swap_bytes(tree: PyTree) -> int:
    """Bytes this process's swap files take for ``tree``'s leaves (arrays or shapes with
    shardings): each distinct shard it holds once (a replicated leaf once, not per device)."""
    total = 0
    for x in jax.tree.leaves(tree, is_leaf=on_disk):
        shards = {_index_key(i, x.shape)
                  for i in x.sharding.addressable_devices_indices_map(tuple(x.shape)).values()}
        total += len(shards) * int(np.prod(x.sharding.shard_shape(tuple(x.shape)))) * (
            np.dtype(x.dtype).itemsize)
    return total


def check_disk_space(key: str, path: str, need: int, free: int | None = None) -> None:
    """Refuse a swap that does not fit the disk under ``path`` (before anything is made)."""
    free = shutil.disk_usage(path).free if free is None else free
    if need > free:
        raise ValueError(f"{key}.nvme_path: the swap files need {need / 2**20:,.1f} MiB on "
                         f"this process, but {path!r} has {free / 2**20:,.1f} MiB free; free "
                         "space there or choose a larger disk")


__all__ = ["NVME_KIND", "NvmeOptimizer", "NvmeParams", "OnDisk", "SwapStore",
           "check_disk_space", "check_nvme_path", "for_checkpoint", "on_disk", "swap_bytes"]
