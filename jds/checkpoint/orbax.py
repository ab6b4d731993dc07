"""Orbax training checkpoints: async, sharded, atomic, verified, restored onto any layout.

One ``Checkpointer`` per directory wraps ``ocp.CheckpointManager`` (the current ``args``
API). A step directory holds two items: ``state`` (the ``TrainState`` as a dict of arrays,
written shard by shard by each process) and ``meta`` (JSON: the resolved config, the data
loader's position and any client state). Orbax writes into a temporary directory and renames
it when complete, so a crash (even SIGKILL) mid-save leaves the previous step intact and the
half-written one invisible.

**Integrity.** Orbax's OCDBT index is checksummed, but its data files are not: a flipped byte
in one restores silently as a different weight, and a truncated one fails deep inside
TensorStore without saying which checkpoint is at fault (both measured). So before Orbax
renames the temporary directory into place, jds writes ``jds_integrity.json`` into it: the
size and CRC-32 of every file. A restore checks it first and names each damaged or missing
file. The manifest is part of the atomic rename, so every committed step has one; a step
without it (written by something else) is restored with a warning that it is unverified.
The cost is one extra read of the checkpoint on save (in the background thread) and on
restore (``verify=False`` skips it).

**Fallback.** ``restore(None, ...)`` tries the newest step first; a damaged step is moved
aside to ``damaged/<step>-<time>/`` (``jds.checkpoint.recovery``: never deleted, and the
run can save that step number again), reported in one warning naming the step and the
file, and the next older one is tried (``jds train --resume`` relies on this). An explicit
step never falls back: its damage is an error, and the step stays where it is. After a
restore the oldest steps beyond ``max_to_keep`` are deleted, as the next save would.

**Streaming writes.** Converters (``jds convert``) hand ``Checkpointer.save_tree`` a tree of
``LazyLeaf``: a shape, a dtype and a function that reads one slice along the first axis
(a layer of a stacked parameter) or the whole leaf. A ``TypeHandler`` registered with Orbax
for ``LazyLeaf`` writes the slices one at a time into the same TensorStore array Orbax's
numpy handler would create (same spec, same on-disk format), and leaves are written one
after another, so host memory holds one slice, not the model. This is Orbax's extension
point for new leaf types; the write itself goes through Orbax's own spec builder.

Restore reads into an abstract target carrying this run's shardings, so a checkpoint
re-shards onto whatever mesh, ZeRO stage or tensor-parallel layout the restoring engine has
(DeepSpeed's "universal checkpoint" without a conversion step). Before reading, the stored
shapes and dtypes are compared with the target and every mismatching array is named.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from jds.checkpoint import recovery
from jds.checkpoint.integrity import (
    _TMP_SUFFIX,
    INTEGRITY_FILE,
    CheckpointCorruptError,
    write_integrity,
)
from jds.state import TrainState

PyTree = Any

# ------------------------------------------------------------------------------ lazy leaves
@dataclasses.dataclass(frozen=True)
class LazyLeaf:
    """A checkpoint leaf produced on demand, one slice of its first axis at a time.

    Attributes:
      shape: the full shape.
      dtype: the stored dtype (what ``read`` returns is cast to it).
      read: ``read(i)`` -> slice ``i`` of the first axis (shape ``shape[1:]``) when
        ``sliced``, else ``read(None)`` -> the whole array.
      sliced: write slice by slice (stacked layers) rather than whole.
    """

    shape: tuple[int, ...]
    dtype: Any
    read: Any
    sliced: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes when materialised."""
        return self.size * np.dtype(self.dtype).itemsize

    def part(self, i: int | None) -> np.ndarray:
        """Slice ``i`` (or the whole leaf for ``None``), checked and cast."""
        want = self.shape[1:] if i is not None else self.shape
        out = np.asarray(self.read(i), dtype=self.dtype)
        if out.shape != tuple(want):
            raise ValueError(f"lazy leaf part {i}: got shape {out.shape}, expected {want}")
        return out

    def materialise(self) -> np.ndarray:
        """The whole array (for small leaves and tests)."""
        if not self.sliced:
            return self.part(None)
        return np.stack([self.part(i) for i in range(self.shape[0])]) if self.shape[0] else (
            np.zeros(self.shape, self.dtype))


class _LazyLeafHandler(type_handlers.NumpyHandler):
    """Orbax ``TypeHandler`` for ``LazyLeaf``: writes slice by slice, one leaf at a time.

    The on-disk array is the one ``NumpyHandler`` writes (its spec builder, typestr
    ``np.ndarray``), so the result restores like any numpy leaf, into numpy or into sharded
    ``jax.Array`` targets.
    """

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)
        self._lock: asyncio.Lock | None = None

    async def _background_serialize(self, values, infos, args=None):  # noqa: ANN001
        self._lock = asyncio.Lock()  # Orbax may run each save in a fresh event loop
        return await super()._background_serialize(values, infos, args)

    async def _open_and_write(self, value: Any, tspec: dict[str, Any], ts_context: Any) -> None:
        import tensorstore as ts

        if not isinstance(value, LazyLeaf):
            return await super()._open_and_write(value, tspec, ts_context)
        if value.sliced:
            tspec = _one_slice_per_chunk(tspec)
        async with self._lock:  # one leaf at a time: bounded host memory
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            if value.sliced:
                for i in range(value.shape[0]):
                    await t[i].write(value.part(i))
            else:
                await t.write(value.part(None))


def _one_slice_per_chunk(tspec: dict[str, Any]) -> dict[str, Any]:
    """``tspec`` with chunks of one leading-axis slice.

    Orbax chunks a numpy leaf as one whole-array chunk, so writing it slice by slice would
    read-modify-write (and cache) the whole array for every slice: measured 7x slower and
    the whole array resident. One chunk per slice keeps each write independent.
    """
    tspec = json.loads(json.dumps(tspec))
    spec = tspec
    while "metadata" not in spec and isinstance(spec.get("base"), dict):
        spec = spec["base"]
    md = spec.get("metadata", {})
    if "chunks" in md:  # zarr v2
        md["chunks"] = [1, *md["chunks"][1:]]
    grid = md.get("chunk_grid", {}).get("configuration", {})
    if "chunk_shape" in grid:  # zarr v3: outer chunk, then any sharding codec's inner chunk
        grid["chunk_shape"] = [1, *grid["chunk_shape"][1:]]
        for codec in md.get("codecs", []):
            inner = codec.get("configuration", {})
            if codec.get("name") == "sharding_indexed" and "chunk_shape" in inner:
                inner["chunk_shape"] = [1, *inner["chunk_shape"][1:]]
    return tspec


def _register_lazy_leaf() -> None:
    """Register the ``LazyLeaf`` handler without Orbax's collision warning.

    The handler shares NumpyHandler's typestr on purpose (its arrays restore as numpy
    ones); ``register_type_handler`` logs that as a collision through absl on every import
    of jds, which users read as something wrong. The override is intended, so that one
    log record is held back.
    """
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        type_handlers.register_type_handler(LazyLeaf, _LazyLeafHandler(), override=True)
    finally:
        absl_log.setLevel(level)


_register_lazy_leaf()


# ------------------------------------------------------------------------------ train state
def _state_to_dict(state: TrainState) -> dict[str, Any]:
    d = {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "loss_scale": state.loss_scale,
        "skipped": state.skipped,
        "rng": state.rng,
    }
    if state.master is not None:
        d["master"] = state.master
    # Present only when the model has them: a language model's checkpoint keeps its layout.
    if state.frozen:
        d["frozen"] = state.frozen
    if state.model_state:
        d["model_state"] = state.model_state
    return d


def _dict_to_state(d: dict[str, Any], like: TrainState) -> TrainState:
    return like.replace(
        step=d["step"],
        params=d["params"],
        master=d.get("master"),
        opt_state=d["opt_state"],
        loss_scale=d["loss_scale"],
        skipped=d["skipped"],
        rng=d["rng"],
        frozen=d.get("frozen", {}),
        model_state=d.get("model_state", {}),
    )


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _damage_message(step_dir: str, err: BaseException) -> str:
    """Name the file an Orbax/TensorStore/JSON read error points at, where it says."""
    text = str(err)
    m = re.search(r'local file "([^"]+)"', text)
    where = m.group(1) if m else step_dir
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return f"checkpoint {step_dir} could not be read: {where}: {type(err).__name__}: {first}"


class Checkpointer:
    """Save/restore ``TrainState`` + JSON metadata under ``directory/<step>``.

    Args:
      directory: checkpoint root (created if missing).
      max_to_keep: keep the newest N steps (None = all).
      async_save: write in a background thread after the device-to-host copy; when False,
        ``save`` returns once the step is committed.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True
    ) -> None:
        self.directory = os.fspath(os.path.abspath(directory))
        self._async = async_save
        self._saving_step: int | None = None
        self._max_to_keep = max_to_keep if max_to_keep and max_to_keep > 0 else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep,
            # Always the async checkpointer: it is the one with a hook between "all files
            # written" and "renamed into place", where the integrity manifest goes.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest),
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    # ------------------------------------------------------------------------------- saving
    def _write_manifest(self) -> None:
        """Orbax's post-finalization hook: all files are written, the rename is next."""
        step = self._saving_step
        if step is None or jax.process_index() != 0:
            return
        pending = glob.glob(os.path.join(glob.escape(self.directory), f"{step}{_TMP_SUFFIX}*"))
        final = os.path.join(self.directory, str(step))
        # Atomic-rename filesystems finalize in the temporary directory (the newest one: a
        # save killed earlier may have left another); commit-file ones write in place.
        step_dir = max(pending, key=os.path.getmtime) if pending else final
        if os.path.isdir(step_dir):
            write_integrity(step_dir)

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` as ``step`` (returns once arrays are copied)."""
        self.save_tree(step, _state_to_dict(state), meta)

    def save_tree(self, step: int, tree: dict[str, Any], meta: dict[str, Any]) -> None:
        """Save any tree of arrays and ``LazyLeaf`` as ``step`` (``save`` is this for a state).

        Converters write weights-only checkpoints (``{"params": ...}``) and full train states
        through this, streaming ``LazyLeaf`` leaves.
        """
        self._manager.wait_until_finished()  # one save in flight: the hook knows its step
        self._saving_step = int(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        if not self._async:
            self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """Newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The directory of a committed ``step``."""
        return os.path.join(self.directory, str(step))

    # ------------------------------------------------------------------------------ restoring
    def restore(
        self,
        step: int | None,
        like: TrainState,
        shardings: TrainState,
        *,
        verify: bool = True,
        init: Any = None,
        apart: Callable[[Any], int | None] | None = None,
        sink: Callable[[Any, jax.Array], None] | None = None,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore ``step`` (default newest good one) into ``like``'s structure and ``shardings``.

        Args:
          step: the step to restore; None = the newest step that is intact (damaged newer
            steps are skipped with a warning).
          like: a state with this run's structure (arrays or shape/dtype structs).
          shardings: ``like``-shaped shardings to restore onto.
          verify: check files against the integrity manifest first.
          init: ``init(fp32_params) -> TrainState`` for weights-only checkpoints (converted
            ones hold ``{"params"}`` only); without it they are an error.
          apart: leaves restored apart, a group at a time (the NVMe tier's swap files):
            ``apart(leaf of like)`` gives a leaf's group, or None to restore it with the
            rest; each group is read in its own partial restore and handed to
            ``sink(leaf of like, restored array)``, so host memory holds one group, and the
            returned state has None in those places.

        Raises:
          FileNotFoundError: no checkpoint in the directory, or no such step.
          CheckpointCorruptError: the step (or, with ``step=None``, every step) is damaged;
            the message names the files.
          ValueError: the stored arrays do not match this run (each mismatch named).
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        if step is not None and int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        candidates = [int(step)] if step is not None else steps[::-1]
        target = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            _state_to_dict(like),
            _state_to_dict(shardings),
        )
        failures = []
        fp32 = like.fp32_params
        fp32_sh = shardings.fp32_params
        weights_target = {"params": jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=sh), fp32, fp32_sh
        )}
        for s in candidates:
            try:
                stored = self._stored_tree(s, verify)
                if set(stored or {}) == {"params"}:  # weights only (a converted checkpoint)
                    if init is None:
                        raise ValueError(
                            f"{self.step_dir(s)} holds weights only; restore it with "
                            "engine.load_checkpoint, which starts a fresh optimizer"
                        )
                    out = self._restore_one(s, stored, weights_target)
                    state = init(out["state"]["params"])
                elif apart is not None:
                    out = self._restore_apart(s, stored, target, like, apart, sink)
                    state = _dict_to_state(dict(out["state"]), like)
                else:
                    out = self._restore_one(s, stored, target)
                    state = _dict_to_state(dict(out["state"]), like)
            except CheckpointCorruptError as e:
                if step is not None:
                    raise
                failures.append(str(e))
                # Out of the way, or the run dies when it next saves this step number.
                moved = recovery.quarantine(self.directory, s)
                self._manager.reload()
                warnings.warn(f"checkpoint step {s} is damaged "
                              f"({recovery.first_problem(str(e))}); moved it to {moved}, "
                              "falling back to an older checkpoint", stacklevel=2)
                continue
            self._enforce_retention()
            return state, dict(out["meta"] or {})
        raise CheckpointCorruptError(
            f"every checkpoint in {self.directory} is damaged:\n" + "\n".join(failures)
        )

    def _stored_tree(self, step: int, verify: bool) -> Any:
        """Verify ``step`` and return its stored array metadata tree."""
        step_dir = self.step_dir(step)
        if verify:
            status = recovery.check_step(step, step_dir)
            if status.status == "damaged":
                raise CheckpointCorruptError(status.detail)
            if status.status == "unverified":
                warnings.warn(
                    f"checkpoint {step_dir} has no {INTEGRITY_FILE}; restoring it unverified",
                    stacklevel=4,
                )
        try:
            return self._manager.item_metadata(step)["state"]
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError, KeyError) as e:
            raise CheckpointCorruptError(_damage_message(step_dir, e)) from e

    def _restore_apart(self, step: int, stored: Any, target: dict[str, Any], like: TrainState,
                       apart: Callable[[Any], int | None],
                       sink: Callable[[Any, jax.Array], None] | None) -> Any:
        """Restore ``target`` without the leaves ``apart`` groups, then each group in a
        partial restore of its own, handing its arrays to ``sink`` (see ``restore``)."""
        self._check_matches(step, stored, target)  # the whole run's arrays, once
        like_leaves, treedef = jax.tree.flatten(_state_to_dict(like))
        t_leaves = treedef.flatten_up_to(target)
        group = [apart(x) for x in like_leaves]
        rest = treedef.unflatten([None if g is not None else t
                                  for g, t in zip(group, t_leaves, strict=True)])
        out = self._restore_one(step, stored, rest, partial=True)
        for g in sorted({g for g in group if g is not None}):
            part = treedef.unflatten([t if gi == g else None
                                      for gi, t in zip(group, t_leaves, strict=True)])
            got = treedef.flatten_up_to(self._restore_one(step, stored, part,
                                                          partial=True)["state"])
            for x, gi, v in zip(like_leaves, group, got, strict=True):
                if gi == g and sink is not None:
                    sink(x, v)
            del got
        return out

    def _restore_one(self, step: int, stored: Any, target: dict[str, Any],
                     partial: bool = False) -> Any:
        """Restore ``target`` (with ``partial``, only its non-None leaves, unchecked: the
        caller checked the whole)."""
        step_dir = self.step_dir(step)
        if not partial:
            self._check_matches(step, stored, target)
        try:
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=partial,
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError) as e:
            raise CheckpointCorruptError(_damage_message(step_dir, e)) from e
        except Exception as e:  # TensorStore read errors arrive as a bare Exception
            if "TensorStore" not in str(e) and "tensorstore" not in str(e):
                raise
            raise CheckpointCorruptError(_damage_message(step_dir, e)) from e

    def _check_matches(self, step: int, stored: Any, target: dict[str, Any]) -> None:
        if stored is None:
            return
        flat_t = dict(jax.tree_util.tree_flatten_with_path(target)[0])
        flat_s = {
            _path_name(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(
                stored, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
            )[0]
        }
        want = {_path_name(p): v for p, v in flat_t.items()}
        problems = []
        for name, t in want.items():
            s = flat_s.get(name)
            if s is None:
                problems.append(f"{name}: missing from the checkpoint")
            elif tuple(s.shape) != tuple(t.shape) or str(s.dtype) != str(t.dtype):
                problems.append(
                    f"{name}: checkpoint {tuple(s.shape)} {s.dtype} vs model "
                    f"{tuple(t.shape)} {t.dtype}"
                )
        for name in sorted(set(flat_s) - set(want)):
            problems.append(f"{name}: in the checkpoint but not in this model")
        if problems:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match this run "
                f"({len(problems)} arrays):\n  " + "\n  ".join(problems[:50])
            )

    def _enforce_retention(self) -> None:
        """Delete the oldest steps beyond ``max_to_keep`` (a run killed between a save and
        Orbax's clean-up leaves one more), as the next save would."""
        if not self._max_to_keep:
            return
        for s in self.all_steps()[:-self._max_to_keep]:
            self._manager.delete(s)

    def wait(self) -> None:
        """Block until pending async saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()
