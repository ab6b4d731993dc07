"""TrainEngine: wiring only — mesh, shardings, compiled steps, batches, checkpoints.

``jds.initialize(model=..., config=..., loss_fn=...)`` returns a ``TrainEngine``. The engine:

1. loads the config (a DeepSpeed ``ds_config.json`` path, a dict, or ``jds.Config``),
2. builds the mesh (``jds.partitioning.mesh``; default: every device data parallel),
3. resolves the batch triad against the data-parallel size (DeepSpeed's rules),
4. splits the model (``jds.models.base``: the contract) into trainable and frozen
   parameters and model state, and derives every array's ``NamedSharding`` from the
   parameters' logical axes, the rules (tensor parallelism) and the ZeRO layout
   (``jds.partitioning.zero``),
5. materialises the state directly sharded (``jds.state``) — a model given as a preset
   name or a factory is built inside ``jax.jit(out_shardings=...)`` so no parameter exists
   whole on one device; a concrete ``nnx.Module`` is placed with ``device_put``,
6. jits ``train_step`` / ``eval_step`` once, with explicit output shardings and the state
   donated; batches are placed by ``jds.partitioning.batch``, pipeline stages assembled by
   ``jds.partitioning.pipeline``.

All numerics live in ``train_step.py`` (pure functions) and ``precision.py``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jds.checkpoint.engine_io import EngineCheckpoints
from jds.checkpoint.orbax import Checkpointer
from jds.compression.activation import plan as activation_plan
from jds.compression.distillation import STUDENT, Distillation, distillation_loss
from jds.compression.pruning import STATE as PRUNING_STATE
from jds.compression.pruning import PruningPlan
from jds.compression.pruning import plan as pruning_plan
from jds.compression.weight_quantization import QuantizationPlan, quantization_step
from jds.compression.weight_quantization import plan as quantization_plan
from jds.config import Config, ConfigError
from jds.distributed import init_distributed, peer_failure_guard
from jds.host_env import release_free_heap
from jds.kernels.platform import is_gpu, lowering_for
from jds.lora.core import apply as lora_apply
from jds.models import base
from jds.models.adapters import is_adapted
from jds.models.layer_drop import LayerDrop
from jds.partitioning import pipeline as pp
from jds.partitioning.batch import BatchPlacer
from jds.partitioning.engine_offload import EngineOffload
from jds.partitioning.mesh import data_parallel_size
from jds.partitioning.offload import (
    DEVICE_KIND,
    offload_plan,
    with_kind,
)
from jds.partitioning.rules import DEFAULT_RULES, Rules, axes_shardings, use_rules
from jds.partitioning.zero import ParamGather, make_plan, parallel_layout
from jds.precision import policy_for
from jds.state import TrainState, init_train_state, optimizer_parts
from jds.train_step import StepConfig, make_eval_step, make_gradients, make_train_step

PyTree = Any
ModelLike = nnx.Module | str | Callable[[], nnx.Module]


class TrainEngine(EngineCheckpoints, EngineOffload):
    """A sharded training run: state, compiled steps and checkpointing.

    Attributes:
      config: the validated ``jds.Config``.
      mesh: the device mesh.
      batch: the resolved ``BatchSizes``.
      state: the ``TrainState`` (every persistent array).
      loss: the ``jds.models.base.Loss`` the step differentiates.
      split: the model split for the engine (``jds.models.base.SplitModel``).
      model_config: the model's own config (``model.config``), or None.
      vocab_size: the model's vocabulary size, or None (not a language model).
      zero_layout, zero: the ZeRO layout and the trainable parameters' specs (``ZeroPlan``).
      trainable: the nnx filter of the parameters that train (``nnx.LoRAParam`` for a model
        with LoRA adapters unless ``trainable=`` said otherwise).

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
        loss_fn: base.LossFn | base.Loss | None = None,
        trainable: base.Filter | None = None,
        devices: Sequence[jax.Device] | None = None,
        rules: Rules = DEFAULT_RULES,
        shapes_only: bool = False,
    ) -> None:
        self.config = cfg = Config.load(config)
        self.shapes_only = shapes_only
        try:
            self.mesh, self.rules, self.zero_layout = parallel_layout(
                cfg.mesh, cfg.zero_optimization, devices, rules)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.stages = int(self.mesh.shape["stage"])
        self.batch = cfg.resolve_batch(data_parallel_size(self.mesh))
        self.policy = policy_for(cfg.precision)
        self.placer = BatchPlacer(self.mesh, self.rules)

        module, factory = base.resolve_model(model)
        if cfg.progressive_layer_drop.enabled and self.stages > 1:
            raise ConfigError("progressive_layer_drop with pipeline stages (mesh.stage "
                              f"{self.stages}) is not built; drop one of them")
        if cfg.lora.enabled or cfg.progressive_layer_drop.enabled or (
                cfg.compression_training.changes_model):
            module, factory = _prepared_model(module, factory, cfg)
        if trainable is None:  # a model with adapters trains them; a distillation its
            # student; any other every parameter
            trainable = (nnx.LoRAParam if is_adapted(module) else
                         STUDENT if isinstance(module, Distillation) else nnx.Param)
        self.trainable = trainable
        if loss_fn is None and isinstance(module, Distillation):
            loss_fn = distillation_loss(vocab_size=base.vocab_size_of(module.student))
        self.loss = base.as_loss(loss_fn, module)
        try:
            self.offload = offload_plan(cfg.zero_optimization, self.mesh.devices.flat)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.offload.params is not None and self.stages > 1:
            raise ConfigError("zero_optimization.offload_param with pipeline stages (mesh.stage "
                              f"{self.stages}) is not built yet; drop one of them")
        self.gather = ParamGather.create(self.mesh, self.rules, self.zero_layout,
                                         host=self.offload.params is not None)
        try:
            self.split = base.split_model(module, trainable=trainable, remat=cfg.remat,
                                          gather=self.gather)
        except TypeError as e:  # remat for a model that cannot take it: a config matter
            raise ConfigError(str(e)) from None
        self.graphdef = self.split.graphdef
        self.model_config = self.split.config
        self.vocab_size = base.vocab_size_of(module)

        self.pipeline = self._pipeline(loss_fn is not None)  # before the rules' own shape errors
        # make_plan resolves every parameter through the rules strictly (errors name it)
        sp = self.split
        self.zero = make_plan(sp.params, sp.params_axes, self.mesh, self.rules, self.zero_layout)
        self.param_shardings = with_kind(self.zero.shardings(self.mesh, "params"),
                                         self.offload.params)
        self.master_shardings = self.offload.place(self.zero.shardings(self.mesh, "optimizer"),
                                                   sp.params)
        self.grad_shardings = self.zero.shardings(self.mesh, "grads")
        self.frozen_plan = make_plan(sp.frozen, sp.frozen_axes, self.mesh, self.rules,
                                     self.zero_layout)
        self.frozen_shardings = with_kind(self.frozen_plan.shardings(self.mesh, "params"),
                                          self.offload.params)
        self.model_state_shardings = axes_shardings(sp.state_axes, sp.model_state, self.mesh,
                                                     self.rules)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.schedule, self.tx, self.loss_scale_cfg = optimizer_parts(cfg)
        self.pruning = _pruning_plan_for(self, module)
        if self.pruning is not None:  # topk scores wait for their technique, as in PyTorch
            tx = self.pruning.optimizer(self.tx, sp.params)
            if tx is not self.tx and self.offload.optimizer is not None:
                raise ConfigError(
                    "compression_training topk pruning with schedule_offset > 0 and "
                    "zero_optimization.offload_optimizer is not built (the waiting scores keep "
                    "their own optimizer state); use schedule_offset 0, method 'l1', or no "
                    "optimizer offload")
            self.tx = tx
        placement = dict(params=self.param_shardings, master=self.master_shardings,
                         frozen=self.frozen_shardings, model_state=self.model_state_shardings,
                         replicated=self._replicated)
        self._build_state(cfg, placement, factory, trainable, shapes_only)

        step_cfg = StepConfig(
            gradient_accumulation_steps=self.batch.gradient_accumulation_steps,
            gradient_clipping=float(cfg.gradient_clipping),
            compute_dtype=self.policy.compute_dtype,
            loss_scale=self.loss_scale_cfg,
            zero=self.zero,
            pipeline=None if self.pipeline is None else self.pipeline.gradients(),
            per_example=self.loss.per_example,
            weight_metric=self.loss.weight_metric,
            offload=None if self.offload.nvme else self._offloaded_states(),
            params_device=None if self.offload.params is None else with_kind(
                self.param_shardings, DEVICE_KIND),
            grads_reduced_in_backward=self.split.stacked and self.offload.params is None,
            accumulate_in_place=self.split.stacked and self.offload.params is None,
            update_outside=self.offload.nvme,
            skip_by_select=is_gpu(self.mesh.devices.flat[0].platform),
        )
        self._step_cfg = step_cfg
        self._objective = base.make_objective(sp, self.loss, self.gather)
        self.compression = self._compression_plan(module)
        self._objective = self._compressed(self._objective)
        self._train_step_fn = make_train_step(self._objective, self.loss.weight, self.tx,
                                              self.schedule, step_cfg)
        self._train_step = self._jit_train_step(self._train_step_fn)
        self._gradients_step: Callable | None = None  # compiled on first use
        self._predict: Callable | None = None
        if self.pipeline is None:
            eval_objective = base.make_objective(sp, self.loss, self.gather, train=False)
            eval_objective = self._compressed(eval_objective)
            eval_fn = make_eval_step(eval_objective, self.loss.weight, self.loss.weight_metric)
        else:
            pipe_eval = self.pipeline.eval_step()
            eval_fn = lambda params, frozen, model_state, batch: pipe_eval(params, batch)  # noqa: E731
        def eval_at(params, frozen, model_state, batch, applied_steps):
            with quantization_step(applied_steps):  # quantization-aware training's weights
                return eval_fn(params, frozen, model_state, batch)

        self._eval_step = jax.jit(eval_at, out_shardings=self._replicated)
        self._checkpointers: dict[str, Checkpointer] = {}
        self.client_state: dict[str, Any] = {}
        self._steps_done: int | None = None  # host copy of state.step, read when needed
        self._compiled_for: set = set()  # batch signatures whose step is compiled
        self._moved_out: set[str] = set()  # state fields offload_states() moved to host

    # ----------------------------------------------------------------------------- set-up
    def _need_arrays(self, what: str, *, on_device: bool = True) -> None:
        if self.shapes_only:
            raise RuntimeError(
                f"{what} needs real arrays, but this engine was built with shapes_only=True "
                "(for AOT compilation and memory estimates); build it without shapes_only"
            )
        if self._nvme_failed is not None and what != "load_checkpoint":
            raise RuntimeError(
                f"{what}: the last step's NVMe optimizer update failed half-way "
                f"({self._nvme_failed}), so the states on disk are partly updated; load a "
                "checkpoint (engine.load_checkpoint) to go on")
        if on_device and self._moved_out:
            raise RuntimeError(
                f"{what} needs the train state where it lives, but offload_states() moved "
                f"{sorted(self._moved_out)} to host memory; call engine.reload_states() first"
            )

    @contextlib.contextmanager
    def _tracing(self) -> Iterator[None]:
        """The rules the model's activation constraints read while being traced."""
        with use_rules(self.mesh, self.rules):
            yield

    def _pipeline(self, own_loss: bool) -> pp.ModelPipeline | None:
        """The model cut into pipeline stages, or None without stages (ConfigError naming
        the key when the model or the schedule cannot be)."""
        if self.stages == 1:
            return None
        sp = self.split
        try:
            return pp.model_pipeline(
                sp, self.mesh, self.rules, self.zero_layout, pipeline_cfg=self.config.pipeline,
                own_loss=own_loss, micro_batches=self.batch.gradient_accumulation_steps,
                head_loss=lambda logits, ids, labels: base.causal_lm_loss_sum(
                    logits, ids, labels)[0],
                weight=base.valid_targets)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def schedule_table(self) -> pp.Schedule | None:
        """The pipeline schedule, or None without pipeline stages."""
        return None if self.pipeline is None else self.pipeline.schedule

    def _init_state(self, fp32_params: PyTree, frozen: PyTree, model_state: PyTree
                    ) -> TrainState:
        return init_train_state(self.config, self.tx, fp32_params, frozen, model_state)

    # ----------------------------------------------------------------------------- batches
    def local_rows(self, rows: int | None = None, *, micro_batches: int | None = None
                   ) -> np.ndarray:
        """Rows of a global batch that this process feeds (all of them in one process).

        The batch is placed ``[micro_batches, rows / micro_batches, ...]`` with the middle
        axis split over the data-parallel devices; a process owns a contiguous block of it in
        every micro-batch. ``BatchLoader.next(rows=...)`` reads only these rows.

        Args:
          rows: global batch rows (default ``train_batch_size``).
          micro_batches: leading split (default ``gradient_accumulation_steps``).

        Returns:
          Sorted global row indices, micro-batch major.
        """
        return self.placer.local_rows(rows or self.batch.train_batch_size,
                                      micro_batches or self.batch.gradient_accumulation_steps)

    def shard_batch(self, batch: PyTree, *, micro_batches: int | None = None,
                    process_local: bool = False) -> PyTree:
        """Validate a host batch and place every leaf ``[micro_batches, micro_global, ...]``.

        Args:
          batch: a pytree of arrays with a leading global-batch axis (for the LM loss
            ``{"input_ids": [batch, seq]}``, optionally ``labels``); with
            ``process_local`` only this process's rows (``local_rows()``).
          micro_batches: leading split; default ``gradient_accumulation_steps``.
          process_local: the batch holds this process's rows only (multi-host input
            pipelines: each process reads its own part).

        Raises:
          ValueError: leaves without one common leading axis, a row count that does not
            split into the micro-batches over the data-parallel devices (the leaf named),
            or what the loss's own check refuses (LM: ``input_ids`` and its ids).
        """
        a = micro_batches or self.batch.gradient_accumulation_steps
        if self.loss.check is not None:
            self.loss.check(batch)
        rows = self.placer.rows(batch) * (jax.process_count() if process_local else 1)
        self.placer.check_split(batch, rows, a)
        return self.placer.place(batch, a, process_local=process_local)

    # ----------------------------------------------------------------------------- steps
    def train_batch(self, batch: PyTree, *, sync: bool = True,
                    process_local: bool = False) -> dict:
        """One optimizer step over the global batch (gradient accumulation included).

        Args:
          batch: a pytree of arrays whose leading axis is ``train_batch_size`` (for the LM
            loss ``{"input_ids": [train_batch_size, seq]}``, optionally ``labels``); with
            ``process_local``, only this process's rows (``local_rows()``, in that order).
          sync: return Python floats (waits for the device); ``False`` returns device
            scalars so a loop can fetch them one step late.
          process_local: see ``batch``.

        Returns:
          ``loss``, the loss's own metrics, ``grad_norm``, ``lr``, ``loss_scale``,
          ``skipped`` (and ``tokens`` for the LM loss).
        """
        self._need_arrays("train_batch")
        rows = self.placer.rows(batch) * (jax.process_count() if process_local else 1)
        if rows != self.batch.train_batch_size:
            raise ValueError(
                f"train_batch got {rows} rows (over all processes) but train_batch_size is "
                f"{self.batch.train_batch_size} (= micro {self.batch.micro_batch_per_device} x "
                f"accumulation {self.batch.gradient_accumulation_steps} x data-parallel "
                f"{self.batch.dp_size}); every leaf's leading axis is the global batch"
            )
        placed = self.shard_batch(batch, process_local=process_local)
        profile = self._profile_due()
        if profile:  # time this step alone
            jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        with peer_failure_guard("train_batch"):
            with self._tracing():
                if self.nvme_params is not None:  # the parameters in host memory for it
                    self.state = self.nvme_params.live(self.state)
                self._compile_first(placed)
                metrics = self._run_step(placed)
                if self.nvme_params is not None:
                    self._wait_for_nvme_save()
                    self.state = self.nvme_params.put(self.state, frozen=False)
            if self._steps_done is not None:
                self._steps_done += 1
            if self.compression is not None and self.compression.verbose:
                self._report_quantization()
            if profile:
                jax.block_until_ready(metrics)
                self._print_flops_profile(placed, time.perf_counter() - t0)
            if not sync:
                return metrics
            self.check_loss_scale()
            return _to_floats(metrics)

    def _compile_first(self, placed: PyTree) -> None:
        """Compile the step for a new batch signature before it first runs, and give the
        compiler's freed heap back in between (``jds.host_env.release_free_heap``): the
        first execution's temporaries then do not stack on it (peak host RSS). The call
        that follows finds the compiled program in JAX's caches."""
        key = (jax.tree.structure(placed),
               tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(placed)))
        if key in self._compiled_for:
            return
        self._train_step.lower(self._step_state(self.state), placed).compile()
        self._compiled_for.add(key)
        release_free_heap()

    def _profile_due(self) -> bool:
        """Whether this step is the ``flops_profiler`` section's ``profile_step``."""
        fp = self.config.flops_profiler
        if not fp.enabled:
            return False
        if self._steps_done is None:
            self._steps_done = int(self.state.step)
        return self._steps_done == fp.profile_step

    def _print_flops_profile(self, placed: PyTree, seconds: float) -> None:
        """Profile the model's forward on this step's first micro-batch (every process runs
        it; process 0 prints), beside the step's measured time (``flops_profiler``)."""
        from jds.profiling import model_profile as mp

        fp, s = self.config.flops_profiler, self._params_view()
        model = self.split.merge(s.params, s.frozen, s.model_state, train=True)
        micro = jax.tree.map(lambda x: x[0], placed)
        with self._tracing():
            prof = mp.profile_function(lambda m, b: self.loss.fn(m, b)[0], model, micro,
                                       train=True)
        text = mp.train_profile_text(
            prof, step=fp.profile_step, seconds=seconds, mesh_shape=dict(self.mesh.shape),
            dp=self.batch.dp_size, micro_per_device=self.batch.micro_batch_per_device,
            accumulation=self.batch.gradient_accumulation_steps,
            samples=self.batch.train_batch_size, recompute_fwd_factor=fp.recompute_fwd_factor,
            module_depth=fp.module_depth, top_modules=fp.top_modules, detailed=fp.detailed)
        if jax.process_index() == 0:
            mp.emit(text, fp.output_file)

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

    def eval_batch(self, batch: PyTree) -> dict:
        """Loss and metrics over ``batch`` in evaluation mode, without an update. Any row
        count that divides over the data-parallel devices."""
        self._need_arrays("eval_batch")
        n = self.placer.rows(batch)
        dp = data_parallel_size(self.mesh)
        micro = max(1, n // max(self.batch.micro_batch_global, dp))
        while micro > 1 and n % (micro * dp):
            micro -= 1
        placed = self.shard_batch(batch, micro_batches=micro)
        s = self._params_view()
        with self._tracing():
            return _to_floats(self._eval_step(s.params, s.frozen, s.model_state, placed,
                                              s.applied_steps))

    def predict(self, inputs: PyTree) -> PyTree:
        """The model's outputs for ``inputs`` in evaluation mode (DeepSpeed's ``engine(x)``).

        Args:
          inputs: what the model is called with (one argument: an array or any pytree),
            with a leading batch axis that divides over the data-parallel devices.

        Returns:
          ``model(inputs)``, batch-leading leaves sharded over the data-parallel devices
          like the batch.
        """
        self._need_arrays("predict")
        rows = self.placer.rows(inputs, what="inputs")
        self.placer.check_split(inputs, rows, 1)
        if self._predict is None:
            # the compressed model's outputs, as in training
            forward = self._compressed(base.make_forward(self.split, self.gather))

            def sharded_like_rows(params, frozen, model_state, x, applied_steps):
                n = jax.tree.leaves(x)[0].shape[0]
                with quantization_step(applied_steps):
                    out = forward(params, frozen, model_state, x)
                return jax.tree.map(
                    lambda y: jax.lax.with_sharding_constraint(
                        y, self.placer.sharding(y.ndim, micro=False))
                    if y.ndim and y.shape[0] == n else y, out)

            self._predict = jax.jit(sharded_like_rows)
        s = self._params_view()
        with self._tracing():
            return self._predict(s.params, s.frozen, s.model_state,
                                 self.placer.place(inputs, 1, micro=False), s.applied_steps)

    def gradients(self, batch: PyTree) -> tuple[PyTree, float]:
        """Gradients of the loss over ``batch`` at the current weights; no update.

        The same computation as ``train_batch`` up to the optimizer (micro-batches,
        data-parallel reduction, pipeline schedule), without loss scaling or clipping:
        DeepSpeed's ``safe_get_full_grad`` for every trainable parameter, for inspection
        and tests.

        Returns:
          ``(grads, loss)``: fp32 gradients shaped like the trainable parameters (laid out
          as the ZeRO stage shards gradients) and the loss as a float.
        """
        self._need_arrays("gradients")
        if self._gradients_step is None:
            fn = make_gradients(self._objective, self.loss.weight, self._step_cfg)

            def step(params, frozen, model_state, batch, applied_steps):
                with quantization_step(applied_steps):
                    g = fn(params, frozen, model_state, batch, jnp.ones((), jnp.float32))
                return g.grads, g.loss_sum / jnp.where(g.weight > 0, g.weight, 1.0)

            self._gradients_step = jax.jit(step, out_shardings=(self.grad_shardings,
                                                                self._replicated))
        placed = self.shard_batch(batch)
        s = self._params_view()
        with self._tracing():
            grads, loss = self._gradients_step(s.params, s.frozen, s.model_state, placed,
                                               s.applied_steps)
        return grads, float(loss)

    def _report_quantization(self) -> None:
        """``quantize_verbose``: print each group's bit width when it changes (DeepSpeed
        logs "Quantization settings: current bit-precision = ...")."""
        step = int(jax.device_get(self.state.applied_steps))
        bits = self.compression.bits_at(step)
        if bits != getattr(self, "_reported_bits", None) and jax.process_index() == 0:
            print(f"[jds] weight quantization from step {step}: " + ", ".join(
                f"{g} {'full precision' if b is None else f'{b} bits'}"
                for g, b in bits.items()), flush=True)
        self._reported_bits = bits

    def _compressed(self, fn: Callable) -> Callable:
        """``fn(params, frozen, model_state, x)`` with the config's compression applied to
        the weights: quantized first, then pruned (DeepSpeed's order)."""
        if self.pruning is not None:
            fn = self.pruning.wrap(fn)
        if self.compression is not None:
            fn = self.compression.wrap(fn)
        return fn

    def _compression_plan(self, module: nnx.Module) -> QuantizationPlan | None:
        """The ``compression_training`` section's quantization plan (None when off)."""
        return _compression_plan_for(self, module)

    def lower_train_step(self, seq_len: int | None = None, *, batch: PyTree | None = None,
                         platform: str | None = None) -> jax.stages.Lowered:
        """Lower the train step for one global batch (HLO, memory), without running it.

        Args:
          seq_len: for the LM loss, a ``{"input_ids": [train_batch_size, seq_len]}`` batch.
          batch: any other batch, as a pytree of ``jax.ShapeDtypeStruct`` (or arrays) of the
            global batch's shapes (leading ``train_batch_size``).
          platform: ``"cuda"``, ``"rocm"``, ``"tpu"``: lower for another backend than the
            devices', e.g. to check on a CPU host that the GPU kernels lower (the result
            can be read, not compiled, here).
        """
        if batch is None:
            if seq_len is None:
                raise ValueError("lower_train_step needs seq_len (LM batches) or batch=")
            batch = {"input_ids": jax.ShapeDtypeStruct((self.batch.train_batch_size, seq_len),
                                                       jnp.int32)}
        a = self.batch.gradient_accumulation_steps
        spec = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((a, x.shape[0] // a, *x.shape[1:]), x.dtype,
                                           sharding=self.placer.sharding(len(x.shape) + 1)),
            batch)
        if platform is None:
            with self._tracing():
                return self._train_step.lower(self._step_state(self.state), spec)
        # A new closure: traces are cached per function, and the platform changes the trace.
        fn = self._jit_train_step(lambda *args: self._train_step_fn(*args))
        with self._tracing(), lowering_for(platform):
            return fn.trace(self._step_state(self.state), spec).lower(
                lowering_platforms=(platform,))

    def _jit_train_step(self, fn: Callable) -> Callable:
        out = (self._step_state(self.state_shardings), self._replicated)
        if self.offload.nvme:  # and the update's inputs: gradients in the optimizer's layout
            out += ((with_kind(self.master_shardings, DEVICE_KIND), self._replicated,
                     self._replicated),)
        return jax.jit(fn, out_shardings=out, donate_argnums=(0,))

    @property
    def model(self) -> nnx.Module:
        """The model with the current weights (fp32) in evaluation mode, e.g. for
        ``jds.models.generate``."""
        if self._moved_out:
            self._need_arrays("engine.model")  # the error that names reload_states()
        s, sh = self._params_view(), self.state_shardings
        weights, frozen = s.fp32_params, s.frozen
        if self.nvme is not None:
            weights = self.nvme.materialise(weights)
        if self.offload.any:  # the model computes on device arrays
            weights = jax.device_put(weights, with_kind(sh.fp32_params, DEVICE_KIND))
            frozen = jax.device_put(frozen, with_kind(sh.frozen, DEVICE_KIND))
        return self.split.merge(weights, frozen, s.model_state, train=False)


def _pruning_plan_for(engine: TrainEngine, module: nnx.Module) -> PruningPlan | None:
    """The ``compression_training`` section's pruning plan (None when off); its masks and
    scores are already on ``module`` (``_prepared_model``)."""
    cfg = engine.config
    if not cfg.compression_training.prunes:
        return None
    try:
        p = pruning_plan(module, cfg.compression_training, seed=int(cfg.seed))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    scores = engine.split.params.get(PRUNING_STATE, {})
    for item in p.items:
        if item.method == "topk" and item.key not in scores:
            raise ConfigError(
                f"compression_training.{item.kind}_pruning: the topk scores of "
                f"{'.'.join(map(str, item.target.path))} are not trained (the engine's "
                "trainable filter leaves them out); include jds.compression.PruningScores in "
                "it, or use method 'l1'")
    return p


def _compression_plan_for(engine: TrainEngine, module: nnx.Module) -> QuantizationPlan | None:
    cfg = engine.config
    if not cfg.compression_training.quantizes:
        return None
    if cfg.lora.enabled:
        raise ConfigError("compression_training.weight_quantization with lora: quantization-"
                          "aware training of a frozen LoRA base is not built; use "
                          "lora.quantize_base for QLoRA, or drop one of them")
    if engine.pipeline is not None:
        raise ConfigError("compression_training.weight_quantization with pipeline stages "
                          f"(mesh.stage {engine.stages}) is not built yet; drop one of them")
    try:
        return quantization_plan(module, cfg.compression_training, seed=int(cfg.seed),
                                 trainable=engine.split.params)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _prepared_model(module: nnx.Module, factory: Callable[[], nnx.Module] | None,
                    cfg: Config) -> tuple[nnx.Module, Callable[[], nnx.Module] | None]:
    """The config's ``lora``, ``progressive_layer_drop`` and ``compression_training`` (pruning
    masks and scores, activation quantizers) sections applied to a copy of the model (the
    caller's module is never changed), or inside its factory."""
    c, pld = cfg.lora, cfg.progressive_layer_drop
    comp = cfg.compression_training
    if comp.changes_model and (c.enabled or int(cfg.mesh.stage) > 1):
        raise ConfigError("compression_training pruning or activation quantization with "
                          f"{'lora' if c.enabled else 'pipeline stages'} is not built; drop "
                          "one of them")
    if pld.enabled and not base.is_stacked_decoder(module):
        raise ConfigError(
            "progressive_layer_drop drops layers of jds's stacked decoders' layer scan; "
            f"{type(module).__name__} is not one. Set progressive_layer_drop.enabled false")

    def prepare(m: nnx.Module) -> nnx.Module:
        if c.enabled:
            try:
                lora_apply(m, r=c.r, alpha=c.alpha, dropout=c.dropout,
                           target_modules=c.target_modules, init=c.init,
                           use_rslora=c.use_rslora, quantize_base=c.quantize_base,
                           seed=int(cfg.seed))
            except ValueError as e:
                raise ConfigError(f"lora: {e}") from None
        if pld.enabled:
            m.layer_drop = LayerDrop(float(pld.theta), float(pld.gamma), int(cfg.seed))
        if comp.prunes:  # masks from the weights as they start, and scores
            try:
                p = pruning_plan(m, comp, seed=int(cfg.seed))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            p.attach(m)
        if comp.quantizes_activations:
            try:
                activation_plan(m, comp).attach(m)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return m

    if factory is not None:
        made = lambda: prepare(factory())  # noqa: E731
        return nnx.eval_shape(made), made
    return prepare(nnx.merge(*nnx.split(module))), None


def _to_floats(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def initialize(
    model: ModelLike,
    config: str | os.PathLike | Mapping | Config | None = None,
    *,
    loss_fn: base.LossFn | base.Loss | None = None,
    trainable: base.Filter | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> TrainEngine:
    """Create a ``TrainEngine`` (DeepSpeed's ``deepspeed.initialize``).

    Args:
      model: any ``nnx.Module``, a preset name (``"llama-tiny"``) or a zero-argument factory
        (built abstractly, then materialised sharded).
      config: ``ds_config.json`` path, dict, or ``jds.Config``; None = defaults.
      loss_fn: ``loss_fn(model, batch) -> loss | (loss, {name: metric})``, the mean loss of
        a micro-batch (a scalar); default the causal-LM loss for jds's language models
        (``jds.compression.distillation_loss()`` for a ``Distillation`` of them).
      trainable: an nnx filter choosing the parameters that train (default: the LoRA
        adapters, ``nnx.LoRAParam``, when the model has any or the config's ``lora`` section
        adds them; the student's parameters for a ``jds.compression.Distillation``; else
        every ``nnx.Param``); the others are frozen: no master copy, optimizer state or
        gradient.
      devices: devices for the mesh; default all (every process's, in a multi-host job:
        ``jds.init_distributed`` joins it first when the environment says so).

    Raises:
      ConfigError: invalid config or a batch triad that does not fit the devices.
      TypeError: a model with no default loss and no ``loss_fn``.
      ValueError: a model without parameters, or a ``trainable`` filter that selects none.
    """
    init_distributed()
    return TrainEngine(model, config, loss_fn=loss_fn, trainable=trainable, devices=devices)


__all__ = ["ConfigError", "TrainEngine", "initialize"]
