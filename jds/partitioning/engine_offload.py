"""The training engine's offload and NVMe side: where each train-state array rests and
how a step reaches it (a mixin of ``jds.engine.TrainEngine``, as ``EngineCheckpoints`` is for
checkpoints).

- building the state: host-memory placements (``jds.partitioning.offload``), and for the
  NVMe tiers (``jds.partitioning.nvme``) the master weights and optimizer state made in
  swap files a chunk at a time, the parameters put in theirs;
- a step: the compiled step, and under the NVMe optimizer tier the update from the swap
  files after it (``_run_step``); the state as the compiled step takes it (``_step_state``)
  and as computations read it (``_params_view``);
- ``offload_states`` / ``reload_states`` (DeepSpeed's names).

The mixin needs from the engine: ``config``, ``tx``, ``split``, ``mesh``, ``offload``,
``policy``, ``param_shardings``, ``_tracing``, ``_train_step``, ``_need_arrays`` and
``wait_for_checkpoints``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from jds.config import ConfigError
from jds.partitioning.nvme import (
    NvmeOptimizer,
    NvmeParams,
    OnDisk,
    check_disk_space,
    on_disk,
    swap_bytes,
)
from jds.partitioning.offload import (
    DEVICE_KIND,
    OffloadedStates,
    check_host_memory,
    leaf_owners,
    with_kind,
)
from jds.state import TrainState, build_state

PyTree = Any


class EngineOffload:
    """Offload placements, the NVMe tiers, ``offload_states`` / ``reload_states``."""

    def _build_state(self, cfg: Any, placement: dict, factory: Callable[[], Any] | None,
                     trainable: Any, shapes_only: bool) -> None:
        """Make ``self.state`` and ``self.state_shardings`` where the config keeps each
        state (refusing, before anything is made, what the host memory or the disk cannot
        hold)."""
        # NVMe: the master weights and optimizer state live in swap files
        # (jds.partitioning.nvme), made there chunk by chunk, never whole in memory
        self.nvme: NvmeOptimizer | None = None
        self._nvme_failed: str | None = None  # an update that failed half-way
        self._nvme_saving = False  # a save may still read the swap files
        self._nvme_owner = None
        if self.offload.any:
            shapes, shardings = build_state(cfg, self.tx, self.split, **placement, shapes_only=True)
            if self.offload.nvme:
                self._nvme_owner = leaf_owners(self.tx, shapes.opt_state,
                                               jax.tree.structure(shapes.params))
        if self.offload.any and not shapes_only:  # refuse what cannot fit, before making it
            try:
                on_host = shapes
                if self.offload.nvme:
                    on_host = self._step_state(shapes)  # what stays in host memory
                    check_disk_space("zero_optimization.offload_optimizer",
                                     self.offload.nvme_path,
                                     swap_bytes((shapes.master, shapes.opt_state)))
                if self.offload.params_nvme_path is not None:
                    check_disk_space("zero_optimization.offload_param",
                                     self.offload.params_nvme_path,
                                     swap_bytes((shapes.params, shapes.frozen)))
                check_host_memory(on_host, self.offload, len(self.mesh.local_devices))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.offload.nvme and not shapes_only:
            self.nvme = NvmeOptimizer(
                self.tx, shapes, shardings, param_shardings=self.param_shardings,
                compute_dtype=self.policy.compute_dtype, nvme_path=self.offload.nvme_path,
                buffer_count=self.offload.buffer_count,
                sub_group_size=int(cfg.zero_optimization.sub_group_size),
                write_behind=self.offload.pipeline_write)
            rest, self.state_shardings, fresh = build_state(
                cfg, self.tx, self.split, **placement, factory=factory, trainable=trainable,
                tracing=self._tracing, apart=self._step_state)
            self.state = self.nvme.init_from(rest, fresh)
            del rest, fresh
        else:
            self.state, self.state_shardings = build_state(
                cfg, self.tx, self.split, **placement, factory=factory, trainable=trainable,
                shapes_only=shapes_only, tracing=self._tracing)
        # offload_param to NVMe: the parameters rest in swap files between steps
        self.nvme_params: NvmeParams | None = None
        described = lambda x: OnDisk("", tuple(x.shape), x.dtype, x.sharding)  # noqa: E731
        if self.offload.params_nvme_path is not None and not shapes_only:
            self.nvme_params = NvmeParams(self.offload.params_nvme_path, self.state)
            self.state = self.nvme_params.put(self.state)
        elif self.offload.params_nvme_path is not None:  # shapes only: described as on disk
            self.state = self.state.replace(params=jax.tree.map(described, self.state.params),
                                            frozen=jax.tree.map(described, self.state.frozen))
        if self.offload.nvme and shapes_only:  # the same leaves, described as on disk
            self.state = self._step_state(self.state, as_disk=described)

    def _offloaded_states(self) -> OffloadedStates | None:
        """The device and home shardings the step streams offloaded states between."""
        if self.offload.optimizer is None:
            return None
        sh = self.state_shardings
        # the fp32 weights: the master copy, or in fp32 the params (host-resident with
        # offload_param: streamed like the master copy)
        weights = sh.master if sh.master is not None or self.offload.params is None else sh.params
        return OffloadedStates(
            opt_device=with_kind(sh.opt_state, DEVICE_KIND), opt_home=sh.opt_state,
            master_device=None if weights is None else with_kind(weights, DEVICE_KIND),
            master_home=weights)

    def _step_state(self, tree: TrainState, as_disk: Callable[[Any], Any] | None = None
                    ) -> TrainState:
        """``tree`` (the state, or its shardings) as the compiled step takes it: under the
        NVMe tier without the master weights and per-parameter optimizer states, which
        stay in their swap files (None in their place; ``as_disk(leaf)`` instead when
        given)."""
        if self.offload.params_nvme_path is not None and as_disk is None:
            shape = lambda x: jax.ShapeDtypeStruct(  # noqa: E731
                x.shape, x.dtype, sharding=x.sharding) if on_disk(x) else x
            tree = tree.replace(params=jax.tree.map(shape, tree.params, is_leaf=on_disk),
                                frozen=jax.tree.map(shape, tree.frozen, is_leaf=on_disk))
        if not self.offload.nvme:
            return tree
        mark = (lambda _: None) if as_disk is None else as_disk  # noqa: E731
        leaves, treedef = jax.tree.flatten(tree.opt_state)
        master = None if tree.master is None or as_disk is None else jax.tree.map(
            mark, tree.master)
        return tree.replace(master=master, opt_state=treedef.unflatten(
            [mark(x) if o >= 0 else x for o, x in zip(self._nvme_owner, leaves, strict=True)]))

    def _wait_for_nvme_save(self) -> None:
        """Before the swap files change: a checkpoint may still be reading them."""
        if self._nvme_saving:
            self.wait_for_checkpoints()
            self._nvme_saving = False

    def _params_view(self) -> TrainState:
        """The state with its parameters where computations read them (from the swap files
        into host memory under ``offload_param`` to NVMe)."""
        if self.nvme_params is None:
            return self.state
        return self.nvme_params.live(self.state)

    def _run_step(self, placed: PyTree) -> dict:
        """One compiled step on ``self.state``, and under the NVMe tier the update from
        the swap files; returns the metrics."""
        if self.nvme is None:
            self.state, metrics = self._train_step(self.state, placed)
            return metrics
        stepped, metrics, (grads, finite, factor) = self._train_step(
            self._step_state(self.state), placed)
        state = self.nvme.attach(stepped)
        self._wait_for_nvme_save()
        try:
            self.state = self.nvme.update(state, grads, finite, factor)
        except BaseException as e:
            self._nvme_failed = f"{type(e).__name__}: {e}"
            raise
        return metrics

    # ------------------------------------------------------------------ offload_states
    def offload_states(self, include: Sequence[str] | None = None, *, pin_memory: bool = True,
                       non_blocking: bool = False) -> None:
        """Move train-state arrays to host memory, freeing device memory between phases
        (DeepSpeed's ``engine.offload_states``; e.g. while an RL rollout or a big evaluation
        runs), without a checkpoint round trip. ``reload_states()`` brings them back;
        training, evaluation and prediction refuse to run in between.

        Args:
          include: DeepSpeed's ``OffloadStateTypeEnum`` names (or their ``.value``):
            ``"optim_states"`` (optimizer state), ``"hp_params"`` (fp32 master weights),
            ``"lp_params"`` (the compute copy and frozen parameters), ``"lp_grads"`` and
            ``"contiguous_grad_buffer"`` (jds keeps no gradients between steps: nothing to
            move); None = all of them.
          pin_memory: ``pinned_host`` memory, else ``unpinned_host``.
          non_blocking: return before the copies finish.

        Raises:
          ValueError: an unknown name in ``include``.
        """
        self._need_arrays("offload_states", on_device=False)
        fields = _state_fields(include)
        kind = "pinned_host" if pin_memory else "unpinned_host"
        self._move_states(fields, kind, non_blocking)
        self._moved_out |= set(fields)

    def reload_states(self, non_blocking: bool = False) -> None:
        """Bring back what ``offload_states`` moved (to where the run keeps it: device
        memory, or host memory for ZeRO-Offload's own states)."""
        self._need_arrays("reload_states", on_device=False)
        self._move_states(sorted(self._moved_out), None, non_blocking)
        self._moved_out.clear()

    def _move_states(self, fields: Sequence[str], kind: str | None, non_blocking: bool) -> None:
        moved = {}
        for name in fields:
            tree, home = getattr(self.state, name), getattr(self.state_shardings, name)
            if tree is None or not jax.tree.leaves(tree):
                continue
            target = home if kind is None else with_kind(home, kind)
            # the old buffers go with self.state; the NVMe tier's files stay where they are
            moved[name] = jax.tree.map(lambda x, t: x if on_disk(x) else jax.device_put(x, t),
                                       tree, target, is_leaf=on_disk)
        self.state = self.state.replace(**moved)
        if not non_blocking:
            jax.block_until_ready(self.state)


# DeepSpeed's OffloadStateTypeEnum values -> the TrainState fields they name
OFFLOAD_STATE_TYPES: dict[str, tuple[str, ...]] = {
    "optim_states": ("opt_state",), "hp_params": ("master",),
    "lp_params": ("params", "frozen"), "lp_grads": (), "contiguous_grad_buffer": ()}


def _state_fields(include: Sequence[Any] | None) -> list[str]:
    names = list(OFFLOAD_STATE_TYPES) if include is None else [
        getattr(x, "value", x) for x in include]
    bad = [n for n in names if n not in OFFLOAD_STATE_TYPES]
    if bad:
        raise ValueError(f"offload_states(include=...): unknown {bad}; choose from "
                         f"{list(OFFLOAD_STATE_TYPES)}")
    return sorted({f for n in names for f in OFFLOAD_STATE_TYPES[n]})


__all__ = ["OFFLOAD_STATE_TYPES", "EngineOffload"]
