"""Orbax training checkpoints: async, sharded, atomic, restored onto any layout.

One ``Checkpointer`` per directory wraps ``ocp.CheckpointManager`` (the current ``args``
API). A step directory holds two items: ``state`` (the ``TrainState`` as a dict of arrays,
written shard by shard by each process) and ``meta`` (JSON: the resolved config, the data
loader's position and any client state). Orbax writes into a temporary directory and renames
it when complete, so a crash mid-save leaves the previous step intact.

Restore reads into an abstract target carrying this run's shardings, so a checkpoint
re-shards onto whatever mesh the restoring engine has. Before reading, the stored shapes and
dtypes are compared with the target and every mismatching array is named.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jds.state import TrainState

PyTree = Any


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
    )


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class Checkpointer:
    """Save/restore ``TrainState`` + JSON metadata under ``directory/<step>``.

    Args:
      directory: checkpoint root (created if missing).
      max_to_keep: keep the newest N steps (None = all).
      async_save: write in a background thread after the device-to-host copy.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True
    ) -> None:
        self.directory = os.fspath(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` as ``step`` (returns once arrays are copied)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_to_dict(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def latest_step(self) -> int | None:
        """Newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(
        self, step: int | None, like: TrainState, shardings: TrainState
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore ``step`` (default newest) into ``like``'s structure and ``shardings``.

        Raises:
          FileNotFoundError: no checkpoint in the directory, or no such step.
          ValueError: the stored arrays do not match this run (each mismatch named).
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        target = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            _state_to_dict(like),
            _state_to_dict(shardings),
        )
        self._check_matches(step, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return _dict_to_state(dict(out["state"]), like), dict(out["meta"] or {})

    def _check_matches(self, step: int, target: dict[str, Any]) -> None:
        stored = self._manager.item_metadata(step)["state"]
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

    def wait(self) -> None:
        """Block until pending async saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()
