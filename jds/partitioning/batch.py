"""Placing a host batch on the mesh: any pytree of arrays, split into micro-batches, each
row block on the data-parallel devices that compute it, across one process or many.

A batch is any pytree whose leaves share a leading *row* axis (the global batch): a dict
``{"input_ids": [B, T]}``, ``{"image": [B, H, W, C], "label": [B]}``, a tuple, one array.
For a training step it is placed ``[micro_batches, B / micro_batches, ...]``: the leading
axis is scanned over (gradient accumulation), the second is split over the mesh axes the
rules map ``batch`` to, and the rest stay whole.

In a multi-process job every process either passes the whole global batch (each keeps the
rows its devices hold) or only its own rows (``process_local=True``: the rows
``local_rows()`` names, in that order), and ``jax.make_array_from_process_local_data``
assembles the global array. A process's devices must hold one contiguous block of the row
axis (``mesh.dcn`` orders them so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jds.partitioning.rules import Rules, logical_to_spec

PyTree = Any


def leaf_name(path: Sequence[Any]) -> str:
    """A batch leaf's name for messages: ``batch['image']``, ``batch[0]``, ``batch``."""
    return "batch" + "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!r}]" for k in path)


class BatchPlacer:
    """Validates host batches and places them sharded over the data-parallel devices.

    Attributes:
      mesh: the device mesh.
      dp: the number of data-parallel shards of the row axis.
    """

    def __init__(self, mesh: Mesh, rules: Rules) -> None:
        self.mesh = mesh
        self._rules = rules
        self._rows_spec = logical_to_spec(("batch",), rules)
        axes = self._rows_spec[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        self.dp = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))

    def sharding(self, ndim: int, *, micro: bool = True) -> NamedSharding:
        """The sharding of a placed leaf of rank ``ndim`` (``[A, M, ...]`` when ``micro``,
        else ``[B, ...]``)."""
        lead = (None, "batch") if micro else ("batch",)
        spec = logical_to_spec(lead + (None,) * (ndim - len(lead)), self._rules)
        return NamedSharding(self.mesh, spec)

    # ------------------------------------------------------------------ validation
    def rows(self, batch: PyTree, *, expect: int | None = None, what: str = "batch"
             ) -> int:
        """The batch's row count (every leaf's leading dimension).

        Raises:
          ValueError: an empty batch, a leaf that is not a numeric array with a leading
            axis, leaves that disagree on the row count, or (``expect``) a row count other
            than ``expect`` (each names the leaf and its shape).
        """
        leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
        if not leaves:
            raise ValueError(f"{what} is empty: pass a pytree of arrays with a leading "
                             "global-batch axis")
        rows = None
        for path, x in leaves:
            shape, dtype = np.shape(x), getattr(x, "dtype", np.asarray(x).dtype)
            if len(shape) == 0 or not (np.issubdtype(dtype, np.number)
                                       or np.issubdtype(dtype, np.bool_)):
                raise ValueError(f"{leaf_name(path)} is {dtype} {shape}: every batch leaf must "
                                 "be a numeric array whose first axis is the global batch")
            if expect is not None and shape[0] != expect:
                raise ValueError(f"{leaf_name(path)} has shape {shape}: its leading axis must "
                                 f"be the global batch, {expect} rows")
            if rows is not None and shape[0] != rows:
                raise ValueError(f"{leaf_name(path)} has {shape[0]} rows (shape {shape}) but "
                                 f"other leaves have {rows}; every leaf needs the same leading "
                                 "(global batch) axis")
            rows = shape[0]
        return int(rows)

    def check_split(self, batch: PyTree, rows: int, micro_batches: int) -> None:
        """Raise ``ValueError`` (naming a leaf) unless ``rows`` splits into
        ``micro_batches`` equal micro-batches over the data-parallel devices."""
        if rows % (micro_batches * self.dp):
            path, x = jax.tree_util.tree_flatten_with_path(batch)[0][0]
            raise ValueError(
                f"{leaf_name(path)} (shape {np.shape(x)}): {rows} rows do not split into "
                f"{micro_batches} micro-batch(es) over {self.dp} data-parallel devices; use a "
                f"multiple of {micro_batches * self.dp} rows")

    # ------------------------------------------------------------------ placement
    def local_rows(self, rows: int, micro_batches: int) -> np.ndarray:
        """Rows of a global batch that this process feeds (all of them in one process).

        Returns:
          Sorted global row indices, micro-batch major.
        """
        lo, hi = self._local_block(micro_batches, rows // micro_batches)
        per = rows // micro_batches
        return (np.arange(micro_batches)[:, None] * per
                + np.arange(lo, hi)[None, :]).reshape(-1)

    def _local_block(self, a: int, m: int) -> tuple[int, int]:
        """``[lo, hi)`` of the row axis (axis 1 of ``[a, m]``) this process's devices hold."""
        idx = self.sharding(2).addressable_devices_indices_map((a, m)).values()
        spans = {(i[1].start or 0, m if i[1].stop is None else i[1].stop) for i in idx}
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        if sum(e - s for s, e in spans) != hi - lo:
            raise RuntimeError(
                f"this process's devices hold batch rows {sorted(spans)}, not one block; "
                "order the mesh so each process's devices are adjacent on the data axis "
                "(mesh.dcn does)")
        return lo, hi

    def place(self, batch: PyTree, micro_batches: int, *, process_local: bool = False,
              micro: bool = True) -> PyTree:
        """Place a validated host batch: each leaf ``[A, M, ...]`` (``micro``) or ``[B, ...]``.

        Args:
          batch: the host batch; with ``process_local`` only this process's rows.
          micro_batches: ``A``, the leading split (1 when not ``micro``).
          process_local: see ``batch``.
          micro: split the rows into micro-batches (training, evaluation) or not (predict).
        """
        n_proc = jax.process_count()

        def one(x: Any) -> jax.Array:
            x = np.asarray(x)
            if micro:
                x = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
            sharding = self.sharding(x.ndim, micro=micro)
            if n_proc == 1:
                return jax.device_put(x, sharding)
            a, m = (x.shape[0], x.shape[1]) if micro else (1, x.shape[0])
            if process_local:
                shape_m = m * n_proc
                lo, hi = self._local_block(a, shape_m)
                if hi - lo != m:
                    raise ValueError(
                        f"process-local batch has {m} rows per micro-batch but this process "
                        f"feeds {hi - lo}; build it with engine.local_rows()")
                local = x
            else:
                shape_m = m
                lo, hi = self._local_block(a, m)
                local = x[:, lo:hi] if micro else x[lo:hi]
            shape = (a, shape_m, *x.shape[2:]) if micro else (shape_m, *x.shape[1:])
            return jax.make_array_from_process_local_data(sharding, local, shape)

        return jax.tree.map(one, batch)


__all__ = ["BatchPlacer", "leaf_name"]
