"""ZeRO memory estimator: model-state bytes per device, by formula and from the compiled step.

Two sources of numbers, meant to be read side by side:

**Formulas** (pure functions of parameter counts and device counts; nothing is built):

- ``model_states_per_device``: the ZeRO paper's accounting, the table in ARCHITECTURE.md.
  With Adam and mixed precision each parameter costs 2 bytes (bf16/fp16 compute copy) +
  2 (gradient) + 4 (fp32 master) + 8 (Adam m and v) = 16 bytes; stage 1 divides the 12
  bytes of master + optimizer state by the data-parallel size ``Nd``, stage 2 also the
  gradient, stage 3 everything: 16Ψ, 4Ψ + 12Ψ/Nd, 2Ψ + 14Ψ/Nd, 16Ψ/Nd. In fp32 there is no
  master copy (4 + 4 + 8 = 16 bytes): 16Ψ, 8Ψ + 8Ψ/Nd, 4Ψ + 12Ψ/Nd, 16Ψ/Nd.
  ``model_states_for_groups`` is the same accounting for any sharding factor per state,
  which covers ZeRO++ hpZ and MiCS (``ZeroLayout.describe``).
- ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``:
  DeepSpeed's own estimators (``deepspeed.runtime.zero.stage_1_and_2`` and ``.stage3``),
  same arguments and same results, CPU offload variants included. They count more than the
  paper: 18 sharded bytes per parameter (fp16 *and* fp32 gradient partitions), the
  largest layer gathered in fp32 under ZeRO-3, and host memory scaled by an
  ``additional_buffer_factor``. ``deepspeed_estimates`` tabulates them as DeepSpeed's
  ``*_all_cold`` functions print them.

**The compiled truth** (``state_memory``, ``compiled_memory``): per-device bytes read from
the shardings of an engine's train state (``sharding.shard_shape``) and XLA's
``memory_analysis()`` of the AOT-compiled train step, activations included. With a
``TrainEngine(..., shapes_only=True)`` nothing is materialised, so a 7B model on 64
simulated devices compiles on a laptop. The state part equals the formula's persistent
part (params + master + optimizer) whenever every parameter divides over its ZeRO group;
gradients are not persistent in jds (fp32 accumulators inside the step, part of ``temp``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

BYTES_COMPUTE = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATE_BYTES = 8  # fp32 first and second moments


@dataclasses.dataclass(frozen=True)
class ModelStates:
    """Bytes per device of each model state.

    Attributes:
      params: the compute copy of the parameters (the fp32 weights themselves in fp32).
      grads: the gradients.
      master: fp32 master weights (0 in fp32 training: the params are the master copy).
      optimizer: optimizer state (Adam: m and v in fp32).
    """

    params: float
    grads: float
    master: float
    optimizer: float

    @property
    def persistent(self) -> float:
        """Bytes kept between steps: params + master + optimizer state."""
        return self.params + self.master + self.optimizer

    @property
    def total(self) -> float:
        """All model-state bytes (the ZeRO paper's total)."""
        return self.persistent + self.grads

    def placement(self, offload_optimizer: bool = False,
                  offload_params: bool = False) -> dict[str, float]:
        """Persistent bytes by memory: ``{"device": ..., "host": ...}``; ZeRO-Offload of the
        optimizer moves the master weights and optimizer state to the host, of the
        parameters (ZeRO-3) the compute copy."""
        host = (self.master + self.optimizer if offload_optimizer else 0.0) + (
            self.params if offload_params else 0.0)
        return {"device": self.persistent - host, "host": host}

    def as_dict(self) -> dict[str, float]:
        """The four states plus ``persistent`` and ``total``, for reports."""
        return {**dataclasses.asdict(self), "persistent": self.persistent, "total": self.total}


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def model_states_for_groups(
    total_params: int,
    groups: Mapping[str, int],
    *,
    precision: str = "bf16",
    optimizer_state_bytes: int = ADAM_STATE_BYTES,
    grad_bytes: int | None = None,
) -> ModelStates:
    """Model-state bytes per device when each state is sharded over its own group.

    Args:
      total_params: parameters per model-parallel rank (Ψ; all of them without tensor or
        pipeline parallelism).
      groups: sharding factor of ``"params"``, ``"grads"`` and ``"optimizer"`` (the
        optimizer factor also divides the fp32 master weights); 1 = replicated. A
        ``ZeroLayout.describe(mesh)`` is accepted as it is.
      precision: ``"bf16"``, ``"fp16"`` (mixed: fp32 master weights) or ``"fp32"``.
      optimizer_state_bytes: optimizer bytes per parameter (Adam 8, Lion 4, SGD 0).
      grad_bytes: gradient bytes per parameter; default the compute dtype's (the paper's
        accounting; jds accumulates fp32 gradients, pass 4 for that).

    Raises:
      ValueError: unknown precision, or a count below 1 (below 0 for the params).
    """
    if precision not in BYTES_COMPUTE:
        raise ValueError(f"precision={precision!r}; choose one of {sorted(BYTES_COMPUTE)}")
    _check_count("total_params", total_params, 0)
    for key in ("params", "grads", "optimizer"):
        if key not in groups:
            raise ValueError(f"groups needs a sharding factor for {key!r}; got {dict(groups)}")
        _check_count(f"groups[{key!r}]", groups[key])
    compute = BYTES_COMPUTE[precision]
    grad = compute if grad_bytes is None else grad_bytes
    psi = float(total_params)
    return ModelStates(
        params=compute * psi / groups["params"],
        grads=grad * psi / groups["grads"],
        master=(0.0 if precision == "fp32" else 4 * psi) / groups["optimizer"],
        optimizer=optimizer_state_bytes * psi / groups["optimizer"],
    )


def stage_groups(stage: int, num_devices: int) -> dict[str, int]:
    """Sharding factor of each state under ZeRO ``stage`` over ``num_devices`` (DeepSpeed's
    single data-parallel group)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r}; ZeRO stages are 0, 1, 2 and 3")
    _check_count("num_devices", num_devices)
    return {
        "params": num_devices if stage >= 3 else 1,
        "grads": num_devices if stage >= 2 else 1,
        "optimizer": num_devices if stage >= 1 else 1,
    }


def model_states_per_device(
    total_params: int,
    stage: int,
    num_devices: int,
    *,
    precision: str = "bf16",
    optimizer_state_bytes: int = ADAM_STATE_BYTES,
    grad_bytes: int | None = None,
) -> ModelStates:
    """The ZeRO paper's model-state bytes per device (ARCHITECTURE.md's table).

    Adam, mixed precision: 16Ψ, 4Ψ + 12Ψ/Nd, 2Ψ + 14Ψ/Nd, 16Ψ/Nd for stages 0-3; fp32:
    16Ψ, 8Ψ + 8Ψ/Nd, 4Ψ + 12Ψ/Nd, 16Ψ/Nd.

    Args:
      total_params: Ψ (parameters per model-parallel rank).
      stage: ZeRO stage 0-3.
      num_devices: Nd, the data-parallel size the states are sharded over.
      precision, optimizer_state_bytes, grad_bytes: as in ``model_states_for_groups``.
    """
    return model_states_for_groups(
        total_params, stage_groups(stage, num_devices), precision=precision,
        optimizer_state_bytes=optimizer_state_bytes, grad_bytes=grad_bytes,
    )


# ------------------------------------------------------------------ DeepSpeed's estimators
def estimate_zero2_model_states_mem_needs(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int]:
    """DeepSpeed's ZeRO-2 estimate: ``(cpu bytes per node, gpu bytes per device)``.

    Same arguments and results as
    ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``. Without
    offload each GPU holds 2Ψ of fp16 parameters plus 18Ψ/N (fp16 and fp32 gradient
    partitions, fp32 master partition, Adam m and v); the host needs one fp32 model copy per
    local rank while initialising. With offload only the fp16 parameters stay on the GPU.
    """
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def estimate_zero3_model_states_mem_needs(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int, int]:
    """DeepSpeed's ZeRO-3 estimate: ``(cpu bytes per node, gpu bytes per device, largest
    layer bytes)``.

    Same arguments and results as
    ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``: every GPU keeps
    the largest layer gathered in fp32 (4 bytes per parameter) plus, depending on what is
    offloaded, 2Ψ/N (fp16 parameter partition) or 18Ψ/N (everything partitioned).
    ``zero_init`` (``deepspeed.zero.Init``) builds the model partitioned, so the host never
    holds one full copy per local rank.
    """
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            per_param = 18 * gpus_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            per_param = 16 * gpus_factor
        if zero_init:
            cpu_mem = total_params * per_param * additional_buffer_factor
        else:
            cpu_mem = (total_params * max(4 * num_gpus_per_node, per_param)
                       * additional_buffer_factor)
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def deepspeed_estimates(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> list[dict[str, Any]]:
    """Every option row DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs_all_cold``
    print, as data.

    Returns:
      Dicts with ``stage``, ``offload_optimizer``, ``offload_param``, ``zero_init`` (None
      where the stage has no such option), ``cpu_bytes`` (per node) and ``gpu_bytes``
      (per device).
    """
    rows: list[dict[str, Any]] = []
    for offload in (True, False):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node, num_nodes, offload, additional_buffer_factor)
        rows.append(dict(stage=2, offload_optimizer=offload, offload_param=None,
                         zero_init=None, cpu_bytes=cpu, gpu_bytes=gpu))
    for offload in (True, False):
        for offload_params in (True, False):
            if not offload and offload_params:
                continue  # DeepSpeed cannot offload parameters without the optimizer
            for zero_init in (True, False):
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total_params, largest_layer_params, num_gpus_per_node, num_nodes,
                    offload, offload_params, zero_init, additional_buffer_factor)
                rows.append(dict(stage=3, offload_optimizer=offload,
                                 offload_param=offload_params, zero_init=zero_init,
                                 cpu_bytes=cpu, gpu_bytes=gpu))
    return rows


# ------------------------------------------------------------------ compiled truth
def shard_bytes(x: Any) -> int:
    """Bytes of one device's shard of ``x`` (a ``jax.Array`` or a ``ShapeDtypeStruct`` with
    a sharding). Every device of a ``NamedSharding`` holds a shard of the same shape."""
    sharding = getattr(x, "sharding", None)
    shape = tuple(x.shape)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def _tree_bytes(tree: Any) -> int:
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def state_memory(state: Any) -> dict[str, int]:
    """Per-device bytes of a ``TrainState`` by kind, read from its leaves' shardings.

    Args:
      state: ``engine.state`` (concrete arrays, or ``ShapeDtypeStruct``s of a
        ``shapes_only`` engine).

    Returns:
      ``params`` (compute copy), ``master`` (fp32 master weights; 0 in fp32),
      ``optimizer`` (optimizer-state arrays), ``frozen`` (parameters that do not train and
      the model's other variables: a LoRA run's base, QLoRA's int8 matrices and their
      scales, BatchNorm statistics), ``other`` (step counters, loss scale, rng, scalar
      optimizer counts), ``total``, and ``total`` split by memory: ``device`` and ``host``
      (host-memory kinds: ZeRO-Offload's states).
    """
    from jds.partitioning.offload import DEVICE_KIND, bytes_by_kind

    opt_leaves = jax.tree.leaves(state.opt_state)
    optimizer = sum(shard_bytes(x) for x in opt_leaves if len(x.shape) > 0)
    opt_scalars = sum(shard_bytes(x) for x in opt_leaves if len(x.shape) == 0)
    other = opt_scalars + sum(_tree_bytes(t) for t in (
        state.step, state.loss_scale, state.skipped, state.rng))
    out = {
        "params": _tree_bytes(state.params),
        "master": 0 if state.master is None else _tree_bytes(state.master),
        "optimizer": optimizer,
        "frozen": _tree_bytes(state.frozen) + _tree_bytes(state.model_state),
        "other": other,
    }
    out["total"] = sum(out.values())
    kinds = bytes_by_kind(state)
    out["device"] = kinds.get(DEVICE_KIND, 0)
    out["nvme"] = kinds.get("nvme", 0)
    out["host"] = out["total"] - out["device"] - out["nvme"]
    return out


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device memory of one compiled train step.

    Attributes:
      state: ``state_memory`` of the engine's state.
      argument, output, temp, alias, generated_code, host_temp: ``memory_analysis()``
        fields in bytes (``alias``: outputs sharing an argument's buffer — the donated
        state; ``host_temp``: host-memory temporaries, e.g. remat policy "offload").
      lower_s, compile_s: seconds spent lowering and compiling.
      host_argument, host_output, host_alias: the parts of ``argument``, ``output`` and
        ``alias`` in host memory (ZeRO-Offload's states), from the compiled entry layout
        (``jds.partitioning.offload.entry_memory``; XLA:CPU's analysis lumps them in).
      breakdown: what is live at the peak (``jds.partitioning.peak``), or None.
    """

    state: dict[str, int]
    argument: int
    output: int
    temp: int
    alias: int
    generated_code: int
    host_temp: int
    lower_s: float
    compile_s: float
    breakdown: Any = None
    host_argument: int = 0
    host_output: int = 0
    host_alias: int = 0

    @property
    def peak(self) -> int:
        """Peak estimate per device: argument + temp + output - alias."""
        return self.argument + self.temp + self.output - self.alias

    @property
    def device_peak(self) -> int:
        """``peak`` without the host-memory arguments and outputs (equal without offload)."""
        return self.peak - (self.host_argument + self.host_output - self.host_alias)

    def as_dict(self) -> dict[str, Any]:
        """Every field plus ``peak``, for JSON reports (the breakdown's 12 largest buffers)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["breakdown"] = None if self.breakdown is None else self.breakdown.as_dict(top=12)
        return {**out, "peak": self.peak, "device_peak": self.device_peak}


def compiled_memory(engine: Any, seq_len: int, *, breakdown: bool = True) -> CompiledMemory:
    """AOT-compile ``engine``'s train step and read its per-device memory.

    Args:
      engine: a ``TrainEngine``, best built with ``shapes_only=True`` (nothing is
        materialised; only shapes and shardings are needed).
      seq_len: tokens per sequence of the ``[train_batch_size, seq_len]`` batch.
      breakdown: also read what is live at the peak from XLA's buffer assignment
        (``jds.partitioning.peak``; the same compile, with its dump written to a
        temporary folder).

    Raises:
      ValueError: ``seq_len`` below 1.
      RuntimeError: the backend's compiler gives no memory analysis.
    """
    _check_count("seq_len", seq_len)
    t0 = time.perf_counter()
    lowered = engine.lower_train_step(seq_len)
    t1 = time.perf_counter()
    parts = None
    if breakdown:
        from jds.partitioning.peak import compile_with_breakdown

        compiled, parts = compile_with_breakdown(lowered)
    else:
        compiled = lowered.compile()
    t2 = time.perf_counter()
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"the {jax.default_backend()} compiler returned no memory_analysis(); run the "
            "estimate on CPU (jds estimate does) or on a GPU/TPU backend"
        )
    from jds.partitioning.offload import entry_memory

    # Host-memory arguments (ZeRO-Offload) from the entry layout. XLA:CPU counts them in
    # argument/output/alias; a backend that reports them apart (host_*_size_in_bytes) has
    # them added back, so ``peak`` counts both memories everywhere and ``device_peak`` one.
    spaces = entry_memory(compiled.as_text())
    apart = {k: int(getattr(stats, f"host_{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "alias")}
    host = {k: apart[k] or spaces[f"{k}_host"] for k in apart}
    return CompiledMemory(
        state=state_memory(engine.state),
        argument=int(stats.argument_size_in_bytes) + apart["argument"],
        output=int(stats.output_size_in_bytes) + apart["output"],
        temp=int(stats.temp_size_in_bytes),
        alias=int(stats.alias_size_in_bytes) + apart["alias"],
        generated_code=int(stats.generated_code_size_in_bytes),
        host_temp=int(getattr(stats, "host_temp_size_in_bytes", 0) or 0),
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        breakdown=parts,
        host_argument=host["argument"],
        host_output=host["output"],
        host_alias=host["alias"],
    )


__all__ = [
    "ADAM_STATE_BYTES",
    "BYTES_COMPUTE",
    "CompiledMemory",
    "ModelStates",
    "compiled_memory",
    "deepspeed_estimates",
    "estimate_zero2_model_states_mem_needs",
    "estimate_zero3_model_states_mem_needs",
    "model_states_for_groups",
    "model_states_per_device",
    "shard_bytes",
    "stage_groups",
    "state_memory",
]
