"""Saving and restoring a training engine's state: the engine's checkpoint methods.

``TrainEngine`` takes these from ``EngineCheckpoints`` (a mixin), so the engine module
stays wiring. They need from the engine: ``state``, ``state_shardings``, ``config``,
``split`` and ``model_config`` (for the description of the model), and ``_init_state``
(a fresh state around restored weights), ``_need_arrays`` (refuses a shapes-only
engine), ``nvme`` / ``nvme_params`` / ``_nvme_failed`` / ``_nvme_saving`` (the NVMe tiers'
swap files, or None) with ``_params_view`` and ``_wait_for_nvme_save``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from jds.checkpoint.orbax import Checkpointer
from jds.models.base import describe_model
from jds.partitioning.nvme import for_checkpoint
from jds.partitioning.offload import DEVICE_KIND, with_kind
from jds.state import TrainState

PyTree = Any


class EngineCheckpoints:
    """``save_checkpoint`` / ``load_checkpoint`` (DeepSpeed's names), async and atomic."""

    _checkpointers: dict[str, Checkpointer]

    def _checkpointer(self, save_dir: str | os.PathLike) -> Checkpointer:
        key = os.fspath(os.path.abspath(save_dir))
        if key not in self._checkpointers:
            self._checkpointers[key] = Checkpointer(
                key, max_to_keep=self.config.train.keep_checkpoints
            )
        return self._checkpointers[key]

    def save_checkpoint(
        self,
        save_dir: str | os.PathLike,
        tag: int | None = None,
        client_state: Mapping[str, Any] | None = None,
    ) -> int:
        """Save the full train state (async, atomic) under ``save_dir/<step>``.

        Args:
          save_dir: checkpoint root directory.
          tag: integer step label; default the current step.
          client_state: JSON-able extras (e.g. the data loader's ``state_dict()``).

        Returns:
          The step label written.
        """
        self._need_arrays("save_checkpoint", on_device=False)
        step = int(self.state.step) if tag is None else int(tag)
        meta = {
            "kind": "train_state",
            "config": self.config.to_dict(),
            "model": describe_model(self.split.module_type, self.model_config),
            "client_state": dict(client_state or {}),
        }
        state = self.state
        if self.nvme is not None:  # Orbax reads the swap files, a leaf at a time
            state = state.replace(master=self.nvme.for_checkpoint(state.master),
                                  opt_state=self.nvme.for_checkpoint(state.opt_state))
            self._nvme_saving = True  # the next update waits until the save has read them
        if self.nvme_params is not None:
            store = self.nvme_params.store
            state = state.replace(params=for_checkpoint(store, state.params),
                                  frozen=for_checkpoint(store, state.frozen))
            self._nvme_saving = True
        self._checkpointer(save_dir).save(step, state, meta)
        return step

    def load_checkpoint(
        self, load_dir: str | os.PathLike, tag: int | None = None, *, verify: bool = True
    ) -> dict:
        """Restore the train state, re-sharded onto this engine's mesh and ZeRO/TP layout.

        The checkpoint may come from any device count, ZeRO stage or tensor-parallel layout.
        A weights-only checkpoint (``jds convert hf`` / ``deepspeed`` without the optimizer)
        loads its fp32 weights and starts a fresh optimizer at step 0.

        Args:
          load_dir: checkpoint root directory.
          tag: step label; default the newest intact one (damaged newer steps are skipped
            with a warning naming the damaged files).
          verify: check every file against the checkpoint's integrity manifest first.

        Returns:
          The ``client_state`` saved with it.

        Raises:
          FileNotFoundError: no checkpoint, or no step ``tag``.
          CheckpointCorruptError: the step (every step, when ``tag`` is None) is damaged.
          ValueError: the checkpoint's arrays do not fit this model (each one named).
        """
        self._need_arrays("load_checkpoint", on_device=False)
        self._wait_for_nvme_save()
        if self.nvme is not None:  # every file is about to be rewritten
            self.nvme.settle()
        apart = sink = None
        if self.nvme is not None or self.nvme_params is not None:
            apart, sink = self._restored_apart()
        state, meta = self._checkpointer(load_dir).restore(
            tag, self.state, self.state_shardings, verify=verify, init=self._init_from_weights,
            apart=apart, sink=sink)
        if self.nvme is not None:  # every swap file rewritten: a failed update is mended
            state = self.nvme.attach(state)
            self._nvme_failed = None
        if self.nvme_params is not None:
            state = self.nvme_params.put(state)
        self.state = state
        self._moved_out.clear()  # restored to where the run keeps each state
        self._steps_done = None  # re-read from the restored state when needed
        self.client_state = meta.get("client_state", {})
        return self.client_state

    def _restored_apart(self) -> tuple:
        """``(apart, sink)`` for ``Checkpointer.restore``: the NVMe tiers' leaves restored
        straight into their swap files, the optimizer's a chunk at a time, the parameters
        (in host memory during a step anyway) together."""
        def apart(leaf: Any) -> int | None:
            if self.nvme_params is not None and self.nvme_params.owns(leaf):
                return -1
            return None if self.nvme is None else self.nvme.chunk_of(leaf)

        def sink(leaf: Any, value: jax.Array) -> None:
            own = self.nvme_params is not None and self.nvme_params.owns(leaf)
            (self.nvme_params.store if own else self.nvme.store).write(leaf, value)

        return apart, sink

    def _init_from_weights(self, fp32_params: PyTree) -> TrainState:
        """A fresh train state (step 0, new optimizer state) around restored fp32 weights."""
        s = self._params_view()
        # computed from device memory; init's output shardings place each state (host
        # memory for ZeRO-Offload's master weights and optimizer state)
        on_device = with_kind(self.state_shardings.fp32_params, DEVICE_KIND)
        weights = jax.device_put(fp32_params, on_device)
        if self.nvme is not None:  # the NVMe tier's states made chunk by chunk on disk
            rest = jax.jit(lambda *a: self._step_state(self._init_state(*a)),
                           out_shardings=self._step_state(self.state_shardings))(
                weights, s.frozen, s.model_state)
            return self.nvme.init_from(rest, weights)
        return jax.jit(self._init_state, out_shardings=self.state_shardings)(
            weights, s.frozen, s.model_state)

    def wait_for_checkpoints(self) -> None:
        """Block until every async save has finished."""
        for c in self._checkpointers.values():
            c.wait()

    def close(self) -> None:
        """Finish pending saves and release checkpoint managers."""
        for c in self._checkpointers.values():
            c.close()
        self._checkpointers.clear()


__all__ = ["EngineCheckpoints"]
