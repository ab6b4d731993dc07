"""TrainEngine: wiring only — mesh, shardings, compiled steps, batches, checkpoints.

``jds.initialize(model=..., config=...)`` returns a ``TrainEngine``. The engine:

1. loads the config (a DeepSpeed ``ds_config.json`` path, a dict, or ``jds.Config``),
2. builds the mesh (``jds.partitioning.mesh``; default: every device data parallel),
3. resolves the batch triad against the data-parallel size (DeepSpeed's rules),
4. derives every array's ``NamedSharding`` from the parameters' logical axes, the rules
   (tensor parallelism) and the ZeRO layout (``jds.partitioning.zero``: which of params,
   gradients and optimizer state are sharded over which data-parallel axes),
5. materialises the state directly sharded — a model given as a preset name or a factory
   is built inside ``jax.jit(out_shardings=...)`` so no parameter exists whole on one
   device; a concrete ``nnx.Module`` is placed with ``device_put``,
6. jits ``train_step`` / ``eval_step`` once, with explicit shardings and the state donated.

All numerics live in ``train_step.py`` (pure functions) and ``precision.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jds.checkpoint.orbax import Checkpointer
from jds.config import Config, ConfigError, OptimizerConfig
from jds.distributed import init_distributed, peer_failure_guard
from jds.kernels.platform import lowering_for
from jds.models.registry import config_to_dict
from jds.optim import build_optimizer, build_schedule
from jds.partitioning import pipeline as pp
from jds.partitioning.mesh import data_parallel_size, make_mesh
from jds.partitioning.rules import DEFAULT_RULES, Rules, logical_to_spec, use_rules
from jds.partitioning.zero import layout_from_config, make_plan, subgroup_size, use_layout
from jds.precision import LossScaleConfig, cast_tree, init_loss_scale, policy_for
from jds.state import TrainState
from jds.train_step import StepConfig, make_eval_step, make_gradients, make_train_step

PyTree = Any
ModelLike = nnx.Module | str | Callable[[], nnx.Module]


def _build_abstract(
    model: ModelLike, remat: str = "none"
) -> tuple[nnx.GraphDef, nnx.State, Callable | None, Any]:
    """Split ``model`` into (graphdef, state, factory or None, model config).

    The state is concrete for a given module and abstract (shapes only) for a preset name or
    factory, which the engine then materialises sharded. A ``remat`` other than "none" (the
    config's ``activation_checkpointing`` / ``train.remat``) replaces the model's own.
    """
    if isinstance(model, nnx.Module):
        if remat != "none":
            model.remat = remat
        graphdef, state = nnx.split(model)
        return graphdef, state, None, model.config
    if isinstance(model, str):
        from jds import models

        name = model
        factory = lambda: models.build(name)  # noqa: E731
    elif callable(model):
        factory = model
    else:
        raise TypeError(
            f"model must be an nnx.Module, a preset name or a factory; got {type(model)!r}"
        )
    abstract_model = nnx.eval_shape(factory)
    if remat != "none":
        abstract_model.remat = remat
    graphdef, state = nnx.split(abstract_model)
    return graphdef, state, factory, abstract_model.config


def _mesh_sizes(cfg: Config, n_devices: int) -> dict[str, Any]:
    """The config's mesh sizes, with ``fsdp`` sized for hpZ / MiCS / a partition size.

    A ZeRO sub-group (``zero_hpz_partition_size``, ``mics_shard_size``, or a partition size
    smaller than the data-parallel group) is the mesh's ``fsdp`` axis. When the config
    leaves ``mesh.fsdp`` at 1 it is set to the sub-group size here, taking that factor
    from ``mesh.data``.

    Raises:
      ConfigError: naming the key, when ``mesh.fsdp`` is set to another size or the
        sub-group does not divide ``mesh.data`` or the devices.
    """
    sizes = cfg.mesh.model_dump()
    sizes.pop("sequence_parallel", None)
    k, key = subgroup_size(cfg.zero_optimization)
    if k <= 1 or sizes["fsdp"] == k:
        return sizes
    where = f"zero_optimization.{key}={k}"
    if sizes["fsdp"] != 1:
        raise ConfigError(f"{where} shards within groups of {k} devices but mesh.fsdp is "
                          f"{sizes['fsdp']}; set mesh.fsdp to {k} (or leave it out)")
    data = n_devices if sizes["data"] == -1 else sizes["data"]
    if data % k:
        raise ConfigError(f"{where} shards within groups of {k} devices, which does not divide "
                          f"the {data} data-parallel devices; use a divisor of {data}")
    sizes["fsdp"] = k
    if sizes["data"] != -1:
        sizes["data"] //= k
    return sizes


class TrainEngine:
    """A sharded training run: state, compiled steps and checkpointing.

    Attributes:
      config: the validated ``jds.Config``.
      mesh: the device mesh.
      batch: the resolved ``BatchSizes``.
      state: the ``TrainState`` (every persistent array).
      model_config: the model's own config (``LlamaConfig`` / ``GPT2Config``).
      zero_layout, zero: the ZeRO layout and its per-parameter specs (``ZeroPlan``).

    With ``shapes_only=True`` nothing is materialised: ``state`` holds
    ``jax.ShapeDtypeStruct`` leaves with their shardings, and ``lower_train_step`` compiles
    the real step ahead of time (``jds estimate`` reads its memory from there); training
    calls raise.
    """

    def __init__(
        self,
        model: ModelLike,
        config: str | os.PathLike | Mapping | Config | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        rules: Rules = DEFAULT_RULES,
        shapes_only: bool = False,
    ) -> None:
        self.config = Config.load(config)
        cfg = self.config
        self.shapes_only = shapes_only
        n_devices = len(devices) if devices is not None else jax.device_count()
        self.mesh: Mesh = make_mesh(_mesh_sizes(cfg, n_devices), devices)
        self.stages = int(self.mesh.shape["stage"])
        if self.stages > 1 and not rules.get("layers"):
            rules = {**rules, "layers": ("stage",)}  # each stage holds its block of layers
        if cfg.mesh.sequence_parallel:
            if self.mesh.shape["tensor"] == 1:
                raise ConfigError("mesh.sequence_parallel=true splits the residual stream over "
                                  "the tensor axis, but mesh.tensor is 1; set mesh.tensor > 1 "
                                  "or drop sequence_parallel")
            rules = {**rules, "res_seq": ("tensor",)}
        self.rules = rules
        try:
            self.zero_layout = layout_from_config(cfg.zero_optimization, self.mesh.shape)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.batch = cfg.resolve_batch(data_parallel_size(self.mesh))
        self.policy = policy_for(cfg.precision)

        self.graphdef, abstract, factory, self.model_config = _build_abstract(model, cfg.remat)
        self.vocab_size = int(self.model_config.vocab_size)

        self.schedule_table = self._schedule(abstract)  # before the rules' own shape errors
        # make_plan resolves every parameter through the rules strictly (errors name it)
        self.zero = make_plan(abstract, self.mesh, rules, self.zero_layout)
        self.param_shardings = self.zero.shardings(self.mesh, "params")
        self.master_shardings = self.zero.shardings(self.mesh, "optimizer")
        self.grad_shardings = self.zero.shardings(self.mesh, "grads")
        self._replicated = NamedSharding(self.mesh, PartitionSpec())

        self.schedule, self.tx, self.loss_scale_cfg = _optimizer_parts(cfg)

        if shapes_only:  # shapes and shardings only: for AOT compilation (jds estimate)
            fp32_abstract = jax.tree.map(
                lambda v, sh: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=sh),
                nnx.to_pure_dict(abstract), self.master_shardings,
            )
            self.state_shardings = self._state_shardings(fp32_abstract)
            self.state = jax.tree.map(
                lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
                jax.eval_shape(self._init_state, fp32_abstract), self.state_shardings,
            )
        else:
            fp32_params = self._materialise(abstract, factory)
            self.state_shardings = self._state_shardings(fp32_params)
            self.state: TrainState = jax.jit(
                self._init_state, out_shardings=self.state_shardings
            )(fp32_params)
            del fp32_params

        step_cfg = StepConfig(
            gradient_accumulation_steps=self.batch.gradient_accumulation_steps,
            gradient_clipping=float(cfg.gradient_clipping),
            compute_dtype=self.policy.compute_dtype,
            loss_scale=self.loss_scale_cfg,
            zero=self.zero,
            pipeline=None if self.schedule_table is None else self._pipeline_fn(abstract),
        )
        apply_fn = self._apply_fn()
        self.batch_sharding = NamedSharding(
            self.mesh, logical_to_spec((None, "batch", "seq"), rules)
        )
        self._train_step_fn = make_train_step(apply_fn, self.tx, self.schedule, step_cfg)
        self._train_step = self._jit_train_step(self._train_step_fn)
        self._step_cfg = step_cfg
        self._gradients_step: Callable | None = None  # compiled on first use
        self._eval_step = jax.jit(
            make_eval_step(apply_fn) if self.schedule_table is None
            else self._pipeline_eval_fn(abstract),
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=self._replicated,
        )
        self._checkpointers: dict[str, Checkpointer] = {}
        self.client_state: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- set-up
    def _need_arrays(self, what: str) -> None:
        if self.shapes_only:
            raise RuntimeError(
                f"{what} needs real arrays, but this engine was built with shapes_only=True "
                "(for AOT compilation and memory estimates); build it without shapes_only"
            )

    @contextlib.contextmanager
    def _tracing(self) -> Iterator[None]:
        """The rules and ZeRO layout the model and step read while being traced."""
        with use_rules(self.mesh, self.rules), use_layout(self.zero_layout):
            yield

    def _apply_fn(self) -> Callable[[PyTree, jax.Array], jax.Array]:
        graphdef = self.graphdef
        return lambda params, ids_BT: nnx.merge(graphdef, params)(ids_BT)

    def _schedule(self, abstract: nnx.State) -> pp.Schedule | None:
        """The pipeline schedule (None without pipeline stages), checked against the model.

        Raises:
          ConfigError: naming the key, when the model has no stacked ``layers``, the layer
            count does not split over the stages, or the schedule cannot run.
        """
        if self.stages == 1:
            return None
        pc = self.config.pipeline
        pure = nnx.to_pure_dict(abstract)
        model = nnx.merge(self.graphdef, pure)
        if "layers" not in pure or not all(
                hasattr(model, f) for f in ("embed", "run_layers", "head")):
            raise ConfigError(
                f"mesh.stage={self.stages} needs a model with a stacked 'layers' module and "
                f"embed/run_layers/head methods (as jds's Llama and GPT-2); "
                f"{type(model).__name__} has not; set mesh.stage to 1")
        n_layers = int(jax.tree.leaves(pure["layers"])[0].shape[0])
        try:
            pp.check_layers(n_layers, self.stages, pc.virtual_stages)
            return pp.build_schedule(pc.schedule, self.stages,
                                     self.batch.gradient_accumulation_steps, pc.virtual_stages)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _stage_fns(self, abstract: nnx.State) -> pp.StageFns:
        """The model cut into the pipeline's embed / layer-chunk / loss functions."""
        from jds.models.layers import positions_from_segments
        from jds.train_step import causal_lm_loss_sum

        graphdef = self.graphdef
        every = int(self.config.pipeline.activation_checkpoint_interval)
        pure = nnx.to_pure_dict(abstract)
        abstract_layers = pure["layers"]
        abstract_shared = {k: x for k, x in pure.items() if k != "layers"}

        def model_of(shared: PyTree) -> nnx.Module:
            return nnx.merge(graphdef, {**shared, "layers": abstract_layers})

        def positions(x: jax.Array) -> jax.Array:
            return positions_from_segments(None, x.shape[0], x.shape[1])

        return pp.StageFns(
            embed=lambda sh, ids: model_of(sh).embed(ids, positions(ids)),
            layers=lambda ch, x: model_of(abstract_shared).run_layers(
                ch, x, positions(x), None, checkpoint_every=every),
            loss=lambda sh, x, ids, labels: causal_lm_loss_sum(model_of(sh).head(x), ids,
                                                               labels)[0],
        )

    def _pipeline_kwargs(self) -> dict[str, Any]:
        grads = self.zero.grads
        return dict(
            shared_grad_specs=pp.local_specs({k: g for k, g in grads.items() if k != "layers"}),
            layer_grad_specs=pp.local_specs(grads["layers"]),
            act_spec=logical_to_spec(("batch", "seq", "embed"), self.rules),
        )

    def _split_for_pipeline(self, params: PyTree) -> tuple[PyTree, PyTree]:
        """(shared params, the layer stack in pipeline order, laid out by stage)."""
        p, v = self.stages, self.config.pipeline.virtual_stages
        shared = {k: x for k, x in params.items() if k != "layers"}
        layers = pp.to_pipeline_order(params["layers"], p, v)
        if v > 1:  # model order at rest; each device's virtual stages made contiguous
            layers = jax.lax.with_sharding_constraint(layers, self.param_shardings["layers"])
        return shared, layers

    def _pipeline_fn(self, abstract: nnx.State) -> Callable:
        """``(params, ids_ABT, labels_ABT, seed) -> (grads, summed CE)`` through the stages."""
        sched = self.schedule_table
        p, v = sched.stages, sched.virtual_stages
        grads_fn = pp.make_pipeline_grads(self._stage_fns(abstract), sched, self.mesh,
                                          local_grads=self._local_grads(),
                                          **self._pipeline_kwargs())

        def pipeline(params, ids_ABT, labels_ABT, seed):
            shared, layers = self._split_for_pipeline(params)
            d_shared, d_layers, ce = grads_fn(shared, layers, ids_ABT, labels_ABT, seed)
            return {**d_shared, "layers": pp.from_pipeline_order(d_layers, p, v)}, ce

        return pipeline

    def _pipeline_eval_fn(self, abstract: nnx.State) -> Callable:
        """``eval_step`` through the stages, forwards only (``forward_schedule``): each
        stage keeps its own layers, none is gathered. Built per micro-batch count."""
        fns, kwargs = self._stage_fns(abstract), self._pipeline_kwargs()
        p, v = self.stages, self.config.pipeline.virtual_stages
        from jds.train_step import IGNORE_INDEX

        def eval_step(params, batch):
            ids_ABT = batch["input_ids"]
            labels_ABT = batch.get("labels", ids_ABT)
            forward = pp.make_pipeline_grads(
                fns, pp.forward_schedule(p, ids_ABT.shape[0], v), self.mesh,
                forward_only=True, **kwargs)
            shared, layers = self._split_for_pipeline(params)
            _, _, ce = forward(shared, layers, ids_ABT, labels_ABT, jnp.ones((), jnp.float32))
            n = (labels_ABT[:, :, 1:] != IGNORE_INDEX).sum().astype(jnp.float32)
            return {"loss": ce / jnp.maximum(n, 1.0), "tokens": n}

        return eval_step

    def _local_grads(self) -> tuple[tuple[str, ...], int] | None:
        """``(data axes, n)`` when gradients are replicated over a data group of n > 1
        (ZeRO 0/1): the pipeline then reduces them once per step (``make_pipeline_grads``)."""
        if self.zero_layout.grads:
            return None
        axes = tuple(a for a in self.rules.get("batch", ()) if self.mesh.shape[a] > 1)
        n = int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))
        return (axes, n) if n > 1 else None

    def _materialise(self, abstract: nnx.State, factory: Callable | None) -> PyTree:
        """fp32 parameters, placed as the master weights are (never whole on one device)."""
        if factory is None:
            pure = nnx.to_pure_dict(abstract)
            pure = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pure)
            return jax.device_put(pure, self.master_shardings)

        def init():
            params = nnx.to_pure_dict(nnx.split(factory())[1])
            return jax.tree.map(lambda x: x.astype(jnp.float32), params)

        with self._tracing():
            return jax.jit(init, out_shardings=self.master_shardings)()

    def _init_state(self, fp32_params: PyTree) -> TrainState:
        return _init_state(self.config, self.tx, fp32_params)

    def _state_shardings(self, fp32_params: PyTree) -> TrainState:
        abstract = jax.eval_shape(self._init_state, fp32_params)
        rep = self._replicated
        opt_sh = optax.tree_map_params(
            self.tx,
            lambda _, sh: sh,
            abstract.opt_state,
            self.master_shardings,
            transform_non_params=lambda _: rep,
        )
        return TrainState(
            step=rep,
            params=self.param_shardings,
            master=None if abstract.master is None else self.master_shardings,
            opt_state=opt_sh,
            loss_scale=jax.tree.map(lambda _: rep, abstract.loss_scale),
            skipped=rep,
            rng=rep,
        )

    # ----------------------------------------------------------------------------- batches
    def local_rows(self, rows: int | None = None, *, micro_batches: int | None = None
                   ) -> np.ndarray:
        """Rows of a global batch that this process feeds (all of them in one process).

        The batch is placed ``[micro_batches, rows / micro_batches, seq]`` with the middle
        axis split over the data-parallel devices; a process owns a contiguous block of it in
        every micro-batch. ``BatchLoader.next(rows=...)`` reads only these rows.

        Args:
          rows: global batch rows (default ``train_batch_size``).
          micro_batches: leading split (default ``gradient_accumulation_steps``).

        Returns:
          Sorted global row indices, micro-batch major.
        """
        a = micro_batches or self.batch.gradient_accumulation_steps
        rows = rows or self.batch.train_batch_size
        lo, hi = self._local_block((a, rows // a, 1))
        per = rows // a
        return (np.arange(a)[:, None] * per + np.arange(lo, hi)[None, :]).reshape(-1)

    def _local_block(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        """``[lo, hi)`` of the batch axis (axis 1) this process's devices hold."""
        spans = {
            (idx[1].start or 0, shape[1] if idx[1].stop is None else idx[1].stop)
            for idx in self.batch_sharding.addressable_devices_indices_map(shape).values()
        }
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        covered = sum(b - a for a, b in spans)
        if covered != hi - lo:
            raise RuntimeError(
                f"this process's devices hold batch rows {sorted(spans)}, not one block; "
                "order the mesh so each process's devices are adjacent on the data axis "
                "(mesh.dcn does)"
            )
        return lo, hi

    def _place(self, x_AMT: np.ndarray, *, process_local: bool) -> jax.Array:
        """A ``[A, M, T]`` host batch (global, or this process's block) as a global array."""
        if jax.process_count() == 1:
            return jax.device_put(x_AMT, self.batch_sharding)
        a, m, t = x_AMT.shape
        if process_local:
            shape = (a, m * jax.process_count(), t)
            lo, hi = self._local_block(shape)
            if hi - lo != m:
                raise ValueError(
                    f"process-local batch has {m} rows per micro-batch but this process "
                    f"feeds {hi - lo}; build it with engine.local_rows()"
                )
            local = x_AMT
        else:
            shape = x_AMT.shape
            lo, hi = self._local_block(shape)
            local = x_AMT[:, lo:hi]
        return jax.make_array_from_process_local_data(self.batch_sharding, local, shape)

    def shard_batch(self, batch: Mapping[str, Any], *, micro_batches: int | None = None,
                    process_local: bool = False) -> dict:
        """Validate a host batch and place it ``[micro_batches, micro_global, seq]`` sharded.

        Args:
          batch: ``{"input_ids": [global_batch, seq]}`` (optionally ``labels``), array-like;
            with ``process_local`` only this process's rows (``local_rows()``).
          micro_batches: leading split; default ``gradient_accumulation_steps``.
          process_local: the batch holds this process's rows only (multi-host input
            pipelines: each process reads its own part).

        Raises:
          ValueError: missing ``input_ids``, wrong rank, a batch size that does not match
            ``train_batch_size`` (training) or divide over the data-parallel devices, or
            token ids outside ``[0, vocab_size)``.
        """
        if "input_ids" not in batch:
            raise ValueError(f"batch needs 'input_ids'; got keys {sorted(batch)}")
        a = micro_batches or self.batch.gradient_accumulation_steps
        out = {}
        for key in ("input_ids", "labels"):
            if key not in batch:
                continue
            x = np.asarray(batch[key])
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"batch['{key}'] must be an int array [batch, seq]; got "
                                 f"{x.dtype} {x.shape}")
            if key == "input_ids":
                lo, hi = int(x.min()), int(x.max())
                if lo < 0 or hi >= self.vocab_size:
                    raise ValueError(
                        f"batch['input_ids'] holds ids in [{lo}, {hi}] but the model's "
                        f"vocab_size is {self.vocab_size}; check the tokenizer or the model"
                    )
            dp = data_parallel_size(self.mesh)
            rows = x.shape[0] * (jax.process_count() if process_local else 1)
            if rows % (a * dp):
                raise ValueError(
                    f"batch of {rows} rows does not split into {a} micro-batches over "
                    f"{dp} data-parallel devices; use a multiple of {a * dp}"
                )
            out[key] = self._place(
                x.astype(np.int32).reshape(a, x.shape[0] // a, x.shape[1]),
                process_local=process_local,
            )
        return out

    # ----------------------------------------------------------------------------- steps
    def train_batch(self, batch: Mapping[str, Any], *, sync: bool = True,
                    process_local: bool = False) -> dict:
        """One optimizer step over the global batch (gradient accumulation included).

        Args:
          batch: ``{"input_ids": [train_batch_size, seq]}`` (optionally ``labels``); with
            ``process_local``, only this process's rows (``local_rows()``, in that order).
          sync: return Python floats (waits for the device); ``False`` returns device
            scalars so a loop can fetch them one step late.
          process_local: see ``batch``.

        Returns:
          ``loss``, ``grad_norm``, ``lr``, ``loss_scale``, ``skipped``, ``tokens``.
        """
        self._need_arrays("train_batch")
        rows = np.shape(batch["input_ids"])[0] if "input_ids" in batch else None
        if rows is not None and process_local:
            rows *= jax.process_count()
        if rows is not None and rows != self.batch.train_batch_size:
            raise ValueError(
                f"train_batch got {rows} rows (over all processes) but train_batch_size is "
                f"{self.batch.train_batch_size} (= micro {self.batch.micro_batch_per_device} x "
                f"accumulation {self.batch.gradient_accumulation_steps} x data-parallel "
                f"{self.batch.dp_size})"
            )
        placed = self.shard_batch(batch, process_local=process_local)
        with peer_failure_guard("train_batch"):
            with self._tracing():
                self.state, metrics = self._train_step(self.state, placed)
            if not sync:
                return metrics
            self.check_loss_scale()
            return _to_floats(metrics)

    def check_loss_scale(self) -> None:
        """Raise as DeepSpeed does when an fp16 overflow arrives at the minimum loss scale.

        A jitted step cannot raise, so the step counts such overflows in the state and the
        host checks here (``train_batch`` does on every synchronous call).

        Raises:
          FloatingPointError: the dynamic loss scale hit ``fp16.min_loss_scale`` and still
            overflowed; lower ``min_loss_scale`` or check the model/data for inf/NaN.
        """
        ls = self.loss_scale_cfg
        if ls is None or not ls.dynamic or not ls.raise_error_at_min_scale:
            return
        if int(self.state.loss_scale.min_scale_overflows) > 0:
            raise FloatingPointError(
                f"fp16 gradients overflowed at the minimum loss scale ({ls.min_scale}); "
                "lower fp16.min_loss_scale, use bf16, or check the data and model for inf/NaN"
            )

    def eval_batch(self, batch: Mapping[str, Any]) -> dict:
        """Loss over ``batch`` without an update. Any row count that divides over devices."""
        self._need_arrays("eval_batch")
        n = np.shape(batch["input_ids"])[0]
        dp = data_parallel_size(self.mesh)
        micro = max(1, n // max(self.batch.micro_batch_global, dp))
        while n % (micro * dp):
            micro -= 1
        placed = self.shard_batch(batch, micro_batches=max(micro, 1))
        with self._tracing():
            return _to_floats(self._eval_step(self.state.params, placed))

    def gradients(self, batch: Mapping[str, Any]) -> tuple[PyTree, float]:
        """Gradients of the mean loss over ``batch`` at the current weights; no update.

        The same computation as ``train_batch`` up to the optimizer (micro-batches,
        data-parallel reduction, pipeline schedule), without loss scaling or clipping:
        DeepSpeed's ``safe_get_full_grad`` for every parameter, for inspection and tests.

        Args:
          batch: ``{"input_ids": [train_batch_size, seq]}`` (optionally ``labels``).

        Returns:
          ``(grads, loss)``: fp32 gradients shaped like the parameters (laid out as the
          ZeRO stage shards gradients) and the mean loss as a float.
        """
        self._need_arrays("gradients")
        if self._gradients_step is None:
            fn = make_gradients(self._apply_fn(), self._step_cfg)

            def step(params, batch):
                grads, ce, n_valid = fn(params, batch, jnp.ones((), jnp.float32))
                return grads, ce / jnp.maximum(n_valid, 1.0)

            self._gradients_step = jax.jit(
                step, in_shardings=(self.param_shardings, self.batch_sharding),
                out_shardings=(self.grad_shardings, self._replicated))
        placed = self.shard_batch(batch)
        with self._tracing():
            grads, loss = self._gradients_step(self.state.params, placed)
        return grads, float(loss)

    def lower_train_step(self, seq_len: int, *, platform: str | None = None
                         ) -> jax.stages.Lowered:
        """Lower the train step for a ``[train_batch_size, seq_len]`` batch (HLO, memory).

        ``platform`` (``"cuda"``, ``"rocm"``, ``"tpu"``) lowers it for another backend than
        the devices', e.g. to check on a CPU host that the GPU kernels lower (the result
        can be read, not compiled, here).
        """
        a = self.batch.gradient_accumulation_steps
        shape = (a, self.batch.train_batch_size // a, seq_len)
        spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        if platform is None:
            with self._tracing():
                return self._train_step.lower(self.state, {"input_ids": spec})
        # A new closure: traces are cached per function, and the platform changes the trace.
        fn = self._jit_train_step(lambda *args: self._train_step_fn(*args))
        with self._tracing(), lowering_for(platform):
            traced = fn.trace(self.state, {"input_ids": spec})
            return traced.lower(lowering_platforms=(platform,))

    def _jit_train_step(self, fn: Callable) -> Callable:
        return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, self._replicated),
                       donate_argnums=(0,))

    @property
    def model(self) -> nnx.Module:
        """The model with the current weights (fp32), e.g. for ``jds.models.generate``."""
        return nnx.merge(self.graphdef, self.state.fp32_params)

    # ----------------------------------------------------------------------------- checkpoints
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
        self._need_arrays("save_checkpoint")
        step = int(self.state.step) if tag is None else int(tag)
        meta = {
            "kind": "train_state",
            "config": self.config.to_dict(),
            "model": config_to_dict(self.model_config),
            "client_state": dict(client_state or {}),
        }
        self._checkpointer(save_dir).save(step, self.state, meta)
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
        self._need_arrays("load_checkpoint")
        state, meta = self._checkpointer(load_dir).restore(
            tag, self.state, self.state_shardings, verify=verify, init=self._init_from_weights
        )
        self.state = state
        self.client_state = meta.get("client_state", {})
        return self.client_state

    def _init_from_weights(self, fp32_params: PyTree) -> TrainState:
        """A fresh train state (step 0, new optimizer state) around restored fp32 weights."""
        return jax.jit(self._init_state, out_shardings=self.state_shardings)(fp32_params)

    def wait_for_checkpoints(self) -> None:
        """Block until every async save has finished."""
        for c in self._checkpointers.values():
            c.wait()

    def close(self) -> None:
        """Finish pending saves and release checkpoint managers."""
        for c in self._checkpointers.values():
            c.close()
        self._checkpointers.clear()


def _optimizer_parts(cfg: Config) -> tuple[Any, optax.GradientTransformation, Any]:
    """The config's LR schedule, optax transformation and fp16 loss-scale config."""
    # No optimizer section: AdamW at DeepSpeed's FusedAdam defaults (where DeepSpeed would
    # want a client optimizer passed to deepspeed.initialize).
    opt = cfg.optimizer or OptimizerConfig.model_validate({"type": "adamw"})
    opt_type, opt_params = opt.type, opt.params.model_dump()
    sched = cfg.scheduler
    schedule = build_schedule(
        None if sched is None else sched.type,
        {} if sched is None else sched.params.model_dump(),
        base_lr=float(opt_params["lr"]),
    )
    tx = build_optimizer(opt_type, opt_params, schedule)
    loss_scale = LossScaleConfig.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None
    return schedule, tx, loss_scale


def _init_state(
    cfg: Config, tx: optax.GradientTransformation, fp32_params: PyTree
) -> TrainState:
    """A fresh train state around fp32 weights (step 0, new optimizer state)."""
    compute = policy_for(cfg.precision).compute_dtype
    mixed = compute != jnp.float32
    loss_scale = LossScaleConfig.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=cast_tree(fp32_params, compute) if mixed else fp32_params,
        master=fp32_params if mixed else None,
        opt_state=tx.init(fp32_params),
        loss_scale=init_loss_scale(loss_scale),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(cfg.seed)),
    )


def train_state_template(
    config: str | os.PathLike | Mapping | Config, fp32_params: PyTree
) -> tuple[TrainState, optax.GradientTransformation, Config]:
    """The train state's structure for ``config`` (shapes only; no mesh, no devices).

    Args:
      config: the run's config.
      fp32_params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``(abstract TrainState, optax transformation, validated Config)``; converters fill a
      checkpoint to this structure.
    """
    cfg = Config.load(config)
    _, tx, _ = _optimizer_parts(cfg)
    return jax.eval_shape(lambda p: _init_state(cfg, tx, p), fp32_params), tx, cfg


def _to_floats(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def initialize(
    model: ModelLike,
    config: str | os.PathLike | Mapping | Config | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> TrainEngine:
    """Create a ``TrainEngine`` (DeepSpeed's ``deepspeed.initialize``).

    Args:
      model: an ``nnx.Module``, a preset name (``"llama-tiny"``) or a zero-argument factory
        (built abstractly, then materialised sharded).
      config: ``ds_config.json`` path, dict, or ``jds.Config``; None = defaults.
      devices: devices for the mesh; default all (every process's, in a multi-host job:
        ``jds.init_distributed`` joins it first when the environment says so).

    Raises:
      ConfigError: invalid config or a batch triad that does not fit the devices.
    """
    init_distributed()
    return TrainEngine(model, config, devices=devices)


__all__ = ["ConfigError", "TrainEngine", "initialize"]
