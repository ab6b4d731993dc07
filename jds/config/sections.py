"""DeepSpeed's config sections as pydantic models, plus jds's ``mesh`` and ``train``.

Each model carries DeepSpeed 0.19's key names and defaults; ``jds.config.Config`` composes
them and owns loading, warnings and the batch triad. Split from ``jds/config/__init__.py`` so
neither file outgrows one concern.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config that jds cannot run: the message names the key path, the value and the fix."""


class ConfigWarning(UserWarning):
    """A config key that jds ignores: unknown, not implemented yet, or an unresolved "auto"."""


# Raised and warned from here, but part of jds.config's public face: name them so there.
ConfigError.__module__ = ConfigWarning.__module__ = "jds.config"


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("must be a number")
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def _integer(v: Any) -> Any:
    # pydantic's lax int takes 5e8 (JSON configs write bucket sizes that way) but also bools
    # and numeric strings, which DeepSpeed would choke on later.
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("must be an integer")
    return v


Num = Annotated[float, BeforeValidator(_number)]
Int = Annotated[int, BeforeValidator(_integer)]
Bool = StrictBool


def _unknown_key_error(model: str, key: str, value: Any, allowed: list[str]) -> dict:
    close = difflib.get_close_matches(str(key), allowed, n=2)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    listing = ", ".join(allowed) if len(allowed) <= 16 else f"the fields of jds.config.{model}"
    return {
        "type": PydanticCustomError("unknown_key", "unknown key; {hint}allowed: {allowed}",
                                    {"hint": hint, "allowed": listing}),
        "loc": (key,),
        "input": value,
    }


class _Section(BaseModel):
    """A config section: fields are the JSON keys; an unknown key is an error naming the allowed."""

    model_config = ConfigDict(extra="forbid")
    _ALIASES: ClassVar[dict[str, str]] = {}  # other spellings DeepSpeed accepts -> field name

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = {cls._ALIASES.get(k, k): v for k, v in data.items()}
        allowed = list(cls.model_fields)
        errors = [_unknown_key_error(cls.__name__, k, data[k], allowed)
                  for k in data if k not in cls.model_fields]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


class FP16Config(_Section):
    """DeepSpeed's ``fp16`` section: fp16 compute with (by default dynamic) loss scaling."""

    enabled: Bool = Field(False, description="Train in fp16 with fp32 master weights.")
    auto_cast: Bool = Field(False, description="DeepSpeed casts inputs to fp16; jds casts inside.")
    loss_scale: Num = Field(0.0, ge=0, description="Static loss scale; 0 = dynamic scaling.")
    initial_scale_power: Int = Field(16, ge=0, description="Dynamic scaling starts at 2**this.")
    loss_scale_window: Int = Field(1000, description="Overflow-free steps before the scale "
                                   "doubles.")
    hysteresis: Int = Field(2, ge=1, description="Overflows tolerated before the scale halves.")
    consecutive_hysteresis: Bool = Field(False, description="Refill hysteresis on a good step.")
    min_loss_scale: Num = Field(1.0, description="Floor of the dynamic loss scale.")
    fp16_master_weights_and_grads: Bool = Field(False, description="fp16 master weights (DS CPU "
                                                "Adam only); jds keeps fp32 master weights.")

    @model_validator(mode="after")
    def _dynamic_scaling_valid(self) -> FP16Config:
        # DeepSpeed's check: these two only matter, and must be positive, with dynamic scaling.
        if self.enabled and self.loss_scale == 0:
            for key in ("loss_scale_window", "min_loss_scale"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"fp16.{key}={getattr(self, key)}: must be > 0 with dynamic "
                                      "loss scaling (fp16.loss_scale=0)")
        return self


class BF16Config(_Section):
    """DeepSpeed's ``bf16`` section (also read from the old key ``bfloat16``)."""

    enabled: Bool = Field(False, description="Train in bf16 with fp32 master weights.")
    immediate_grad_update: Bool = Field(False, description="DeepSpeed hook timing; no effect.")
    check_grad_overflow: Bool = Field(True, description="Skip steps with non-finite gradients.")
    bf16_master_weights_and_grads: Bool = Field(False, description="bf16 master weights (ZeRO).")
    bf16_optimizer_states: Bool = Field(False, description="bf16 optimizer moments (ZeRO).")


class OffloadParamConfig(_Section):
    """DeepSpeed's ``zero_optimization.offload_param`` (ZeRO-3 parameter offload)."""

    device: Literal["none", "cpu", "nvme"] = Field("none", description="Where parameters live.")
    nvme_path: str | None = Field(None, description="NVMe folder for nvme offload.")
    buffer_count: Int = Field(5, ge=0, description="DeepSpeed's parameter buffers for NVMe; "
                              "jds reads the parameters whole for a step (no effect).")
    buffer_size: Int = Field(10**8, ge=0, description="DeepSpeed's elements per NVMe "
                             "parameter buffer (no effect in jds).")
    max_in_cpu: Int = Field(10**9, ge=0, description="DeepSpeed's elements kept in CPU memory "
                            "with NVMe (no effect in jds).")
    pin_memory: Bool = Field(True, description="Use page-locked host memory.")


class OffloadOptimizerConfig(_Section):
    """DeepSpeed's ``zero_optimization.offload_optimizer`` (optimizer state/step offload)."""

    device: Literal["none", "cpu", "nvme"] = Field("none", description="Where states live.")
    nvme_path: str | None = Field(None, description="NVMe folder for nvme offload.")
    buffer_count: Int = Field(4, ge=0, description="Host buffers of optimizer-state tensors "
                              "in flight with NVMe (each one tensor of the largest chunk).")
    pin_memory: Bool = Field(True, description="Use page-locked host memory.")
    pipeline_read: Bool = Field(False, description="DeepSpeed's NVMe read-ahead; jds always "
                                "reads ahead within buffer_count (no effect).")
    pipeline_write: Bool = Field(False, description="Write the last NVMe chunks while the "
                                 "next step computes its gradients.")
    fast_init: Bool = Field(False, description="DeepSpeed's fast NVMe init; jds always makes "
                            "the fresh states on the device chunk by chunk (no effect).")
    ratio: Num = Field(1.0, ge=0, le=1, description="Fraction of states offloaded (ZeRO-3).")
    super_offload: Bool = Field(False, description="Superchip offload (ZeRO-3).")
    cpuadam_cores_perc: Num = Field(0.8, ge=0, le=1, description="CPU share for CPU Adam.")


_NoNeg = Annotated[int, BeforeValidator(_integer), Field(ge=0)]
# DeepSpeed's communication/memory tuning knobs, as data: key -> (type, DeepSpeed's default).
# Accepted and type-checked; they change nothing in jds, where XLA schedules the collectives
# and buffers itself.
_ZERO_TUNING: dict[str, tuple[Any, Any]] = {
    "contiguous_gradients": (Bool, True), "reduce_scatter": (Bool, True),
    "reduce_bucket_size": (Annotated[_NoNeg, Field(gt=0)], 5 * 10**8),
    "use_multi_rank_bucket_allreduce": (Bool, True), "allgather_partitions": (Bool, True),
    "allgather_bucket_size": (_NoNeg, 5 * 10**8), "load_from_fp32_weights": (Bool, True),
    "elastic_checkpoint": (Bool, False), "sub_group_size": (_NoNeg, 10**9),
    "cpu_offload_use_pin_memory": (Bool | None, None),
    "stage3_prefetch_bucket_size": (_NoNeg, 5 * 10**7),
    "stage3_param_persistence_threshold": (_NoNeg, 10**5),
    "stage3_model_persistence_threshold": (_NoNeg, sys.maxsize),
    "stage3_max_live_parameters": (_NoNeg, 10**9), "stage3_max_reuse_distance": (_NoNeg, 10**9),
    "stage3_gather_16bit_weights_on_model_save": (Bool, False),
    "stage3_gather_fp16_weights_on_model_save": (Bool, False),
    "stage3_module_granularity_threshold": (Int, 0),
    "stage3_use_all_reduce_for_fetch_params": (Bool, False),
    "stage3_allgather_sequential": (Bool, False), "ignore_unused_parameters": (Bool, True),
    "legacy_stage1": (Bool, False), "round_robin_gradients": (Bool, False),
    "parameter_alignment": (Bool, False), "memory_efficient_linear": (Bool, True),
    "pipeline_loading_checkpoint": (Bool, False), "override_module_apply": (Bool, True),
    "log_trace_cache_warnings": (Bool, False), "enable_sanity_checks": (Bool, False),
    "save_muon_momentum_buffer_in_memory": (Bool, False),
    "leaf_module": (dict[str, Any] | None, None),
}


class _ZeroSection(_Section):
    """DeepSpeed's ``zero_optimization`` section. Every DeepSpeed key is accepted and
    type-checked. jds acts on ``stage``, ``zero_hpz_partition_size`` and ``mics_shard_size``
    (``jds/partitioning/zero.py``) and adds ``param_partition_size``, ``grad_partition_size``
    and ``optimizer_partition_size`` (a sharding factor per state); the other keys tune
    DeepSpeed's own buffers and are no-ops here (``NOT_IMPLEMENTED`` lists the ones a user
    would miss)."""

    _ALIASES: ClassVar[dict[str, str]] = {k.removeprefix("stage3_"): k for k in _ZERO_TUNING
                                          if k.startswith("stage3_")}

    stage: Int = Field(0, ge=0, le=3, description="0 off, 1 optimizer states, 2 +grads, 3 +params.")
    overlap_comm: Bool | None = Field(None, description="Comm/compute overlap (XLA decides); "
                                      "unset = (stage == 3) as in DeepSpeed.")
    compute_grad_norm: Bool = Field(True, description="False only with stage 1 or 2.")
    offload_optimizer: OffloadOptimizerConfig | None = Field(None, description="State offload.")
    offload_param: OffloadParamConfig | None = Field(None, description="ZeRO-3 param offload.")
    cpu_offload: Bool | None = Field(None, description="Deprecated offload_optimizer switch.")
    cpu_offload_param: Bool | None = Field(None, description="Deprecated offload_param switch.")
    zero_hpz_partition_size: Int = Field(1, ge=0, description="ZeRO++ secondary partition size.")
    zero_quantized_weights: Bool = Field(False, description="ZeRO++ int8 weight all-gather.")
    zero_quantized_nontrainable_weights: Bool = Field(False, description="ZeRO++ frozen int8.")
    zero_quantized_gradients: Bool = Field(False, description="ZeRO++ int4 gradient reduce.")
    mics_shard_size: Int = Field(-1, description="MiCS shard size (removed in DeepSpeed 0.19).")
    mics_hierarchical_params_gather: Bool = Field(False, description="MiCS (removed).")
    zeropp_loco_param: dict[str, Any] | None = Field(None, description="LoCo-ZeRO++ (removed).")
    zenflow: dict[str, Any] | None = Field(None, description="DeepSpeed ZenFlow section.")
    param_partition_size: Int | None = Field(
        None, ge=1, description="jds: devices the parameters are sharded over (1, mesh.fsdp or "
        "the data-parallel size); null = from the stage.")
    grad_partition_size: Int | None = Field(
        None, ge=1, description="jds: devices the gradients are sharded over; null = stage.")
    optimizer_partition_size: Int | None = Field(
        None, ge=1, description="jds: devices the fp32 master weights and optimizer state are "
        "sharded over; null = from the stage.")

    @model_validator(mode="after")
    def _deepspeed_rules(self) -> _ZeroSection:
        if self.overlap_comm is None:
            self.overlap_comm = self.stage == 3
        if not self.compute_grad_norm and self.stage not in (1, 2):
            raise ConfigError(f"zero_optimization.compute_grad_norm=false needs stage 1 or 2, "
                              f"got stage={self.stage}")
        opt = self.offload_optimizer
        if opt is not None and opt.ratio < 1.0 and self.stage != 3:
            raise ConfigError(f"zero_optimization.offload_optimizer.ratio={opt.ratio}: partial "
                              "offload needs stage 3; set ratio to 1.0")
        return self


ZeroConfig = create_model(
    "ZeroConfig", __base__=_ZeroSection, __module__=__name__, __doc__=_ZeroSection.__doc__,
    **{k: (t, Field(d, description=f"DeepSpeed tuning knob (default {d}); type-checked, no "
                    "effect in jds: XLA schedules collectives and buffers."))
       for k, (t, d) in _ZERO_TUNING.items()})


_BETAS = "(beta1, beta2) of the moment averages."


class AdamParams(_Section):
    """``optimizer.params`` for Adam/AdamW: DeepSpeed's FusedAdam keywords and defaults."""

    lr: Num = Field(1e-3, ge=0, description="Learning rate (the schedule's base).")
    betas: tuple[Num, Num] = Field((0.9, 0.999), description=_BETAS)
    eps: Num = Field(1e-8, ge=0, description="Added to the denominator.")
    weight_decay: Num = Field(0.0, ge=0, description="Weight decay.")
    adam_w_mode: Bool = Field(True, description="Decoupled decay (AdamW); forced on for adamw.")
    bias_correction: Bool = Field(True, description="Correct the moments' startup bias.")
    amsgrad: Bool = Field(False, description="Not supported (DeepSpeed's FusedAdam refuses it).")
    set_grad_none: Bool = Field(True, description="PyTorch grad buffers; no effect in jds.")
    torch_adam: Bool = Field(False, description="Use torch.optim.Adam(W) in DeepSpeed; ignored.")
    foreach: Bool | None = Field(None, description="torch_adam option; ignored.")
    fp32_optimizer_states: Bool | None = Field(None, description="CPU Adam option; ignored.")

    @field_validator("amsgrad")
    @classmethod
    def _no_amsgrad(cls, v: bool) -> bool:
        if v:
            raise ValueError("AMSGrad is not supported (DeepSpeed's FusedAdam refuses it too); "
                             "use false")
        return v


class LambParams(_Section):
    """``optimizer.params`` for LAMB: DeepSpeed's FusedLamb keywords and defaults."""

    lr: Num = Field(1e-3, ge=0, description="Learning rate (the schedule's base).")
    betas: tuple[Num, Num] = Field((0.9, 0.999), description=_BETAS)
    eps: Num = Field(1e-8, ge=0, description="Added to the denominator.")
    eps_inside_sqrt: Bool = Field(False, description="Add eps inside the square root.")
    weight_decay: Num = Field(0.0, ge=0, description="Weight decay.")
    bias_correction: Bool = Field(True, description="Correct the moments' startup bias.")
    max_grad_norm: Num | None = Field(None, description="Rejected as in DeepSpeed's engine: use "
                                      "the top-level gradient_clipping.")
    max_coeff: Num = Field(10.0, description="Upper clamp of the trust ratio.")
    min_coeff: Num = Field(0.01, description="Lower clamp of the trust ratio.")
    amsgrad: Bool = Field(False, description="Not supported (FusedLamb refuses it).")

    @field_validator("max_grad_norm", "amsgrad")
    @classmethod
    def _refused_by_deepspeed(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name == "max_grad_norm" and v is not None:
            raise ValueError("not an optimizer parameter in DeepSpeed; use the top-level "
                             "'gradient_clipping' key")
        if info.field_name == "amsgrad" and v:
            raise ValueError("AMSGrad is not supported (FusedLamb refuses it); use false")
        return v


class LionParams(_Section):
    """``optimizer.params`` for Lion: DeepSpeed's FusedLion keywords and defaults."""

    lr: Num = Field(1e-3, ge=0, description="Learning rate (the schedule's base).")
    betas: tuple[Num, Num] = Field((0.9, 0.999), description=_BETAS)
    weight_decay: Num = Field(0.0, ge=0, description="Weight decay.")
    set_grad_none: Bool = Field(True, description="PyTorch grad buffers; no effect in jds.")
    fp32_optimizer_states: Bool | None = Field(None, description="CPU Lion option; ignored.")


OPTIMIZER_PARAMS: dict[str, type[_Section]] = {
    "adam": AdamParams, "adamw": AdamParams, "lamb": LambParams, "lion": LionParams}
# DeepSpeed optimizers (current and from earlier releases) that jds does not have yet.
OPTIMIZERS_NOT_SUPPORTED = ("adagrad", "onebitadam", "zerooneadam", "onebitlamb", "muadam",
                            "muadamw", "musgd", "muon")


def _params_for(table: Mapping[str, type[_Section]], kind: str, v: Any, info: ValidationInfo,
                ) -> Any:
    t = info.data.get("type")
    if t is None:  # the type itself is invalid and already reported
        return next(iter(table.values()))()
    if v is None:
        v = {}
    if isinstance(v, BaseModel):
        v = v.model_dump()
    if not isinstance(v, Mapping):
        raise ValueError(f"must be an object of {kind} parameters")
    if t == "adamw":  # DeepSpeed: type AdamW always runs in adam_w_mode
        v = {**v, "adam_w_mode": True}
    return table[t].model_validate(v)


class OptimizerConfig(_Section):
    """DeepSpeed's ``optimizer`` section: ``type`` and its ``params``."""

    type: str = Field(description="adam | adamw | lamb | lion (case-insensitive, stored lower).")
    params: AdamParams | LambParams | LionParams = Field(
        None, validate_default=True, description="The optimizer's DeepSpeed keywords.")
    legacy_fusion: Bool = Field(False, description="DeepSpeed fusion switch; no effect.")

    @field_validator("type", mode="before")
    @classmethod
    def _canonical_type(cls, v: Any) -> str:
        allowed = "adam, adamw, lamb, lion"
        if not isinstance(v, str):
            raise ValueError(f"must be a string, one of {allowed}")
        if v.lower() in OPTIMIZERS_NOT_SUPPORTED:
            raise ValueError(f"DeepSpeed's {v} is not supported by jds yet; use one of {allowed}")
        if v.lower() not in OPTIMIZER_PARAMS:
            raise ValueError(f"unknown optimizer; allowed: {allowed}")
        return v.lower()

    @field_validator("params", mode="before")
    @classmethod
    def _params_by_type(cls, v: Any, info: ValidationInfo) -> Any:
        return _params_for(OPTIMIZER_PARAMS, "optimizer", v, info)


_LBI = "DeepSpeed's resume index; -1 starts from the beginning."
_WTYPE = "Warmup curve: log or linear (DeepSpeed falls back to log on others; jds refuses)."


class WarmupLRParams(_Section):
    """``scheduler.params`` for WarmupLR (lr_schedules.WarmupLR defaults)."""

    warmup_min_lr: Num = Field(0.0, description="lr at the start of warmup.")
    warmup_max_lr: Num | None = Field(None, description="lr after warmup; null = optimizer lr.")
    warmup_num_steps: Annotated[int, Field(strict=True, gt=0)] = Field(
        1000, description="Warmup length in optimizer steps (DeepSpeed uses at least 2).")
    warmup_type: Literal["log", "linear"] = Field("log", description=_WTYPE)
    last_batch_iteration: Int = Field(-1, ge=-1, description=_LBI)


class WarmupDecayLRParams(WarmupLRParams):
    """``scheduler.params`` for WarmupDecayLR: warmup, then linear decay to 0 at the end."""

    total_num_steps: Int = Field(gt=0, description="Step at which the lr reaches 0 (required).")
    warmup_max_lr: Num = Field(0.001, description="lr after warmup.")


class WarmupCosineLRParams(_Section):
    """``scheduler.params`` for WarmupCosineLR: ratios of the optimizer's lr."""

    total_num_steps: Int = Field(gt=0, description="Total steps of the schedule (required).")
    warmup_min_ratio: Num = Field(0.0, description="lr ratio at the start of warmup.")
    warmup_num_steps: Annotated[int, Field(strict=True, gt=0)] = Field(
        1000, description="Warmup length in optimizer steps (DeepSpeed uses at least 2).")
    cos_min_ratio: Num = Field(0.0001, description="lr ratio at the end of the cosine.")
    warmup_type: Literal["log", "linear"] = Field("log", description=_WTYPE)
    last_batch_iteration: Int = Field(-1, ge=-1, description=_LBI)


class OneCycleParams(_Section):
    """``scheduler.params`` for OneCycle (lr_schedules.OneCycle defaults)."""

    cycle_min_lr: Num = Field(description="Lower lr bound (required).")
    cycle_max_lr: Num = Field(description="Upper lr bound (required).")
    decay_lr_rate: Num = Field(0.0, description="lr decay rate after the cycle.")
    cycle_first_step_size: Int = Field(2000, gt=0, description="Steps of the rising half.")
    cycle_second_step_size: Int | None = Field(None, ge=0, description="Falling half; null = "
                                               "cycle_first_step_size.")
    cycle_first_stair_count: Int = Field(0, ge=0, description="Stairs in the first half.")
    cycle_second_stair_count: Int | None = Field(None, ge=0, description="null = first count.")
    decay_step_size: Int = Field(0, ge=0, description="Steps per decay after the cycle; 0 = none.")
    cycle_momentum: Bool = Field(True, description="Cycle beta1 inversely to the lr.")
    cycle_min_mom: Num = Field(0.8, description="Lower momentum bound.")
    cycle_max_mom: Num = Field(0.9, description="Upper momentum bound.")
    decay_mom_rate: Num = Field(0.0, description="Momentum decay rate after the cycle.")
    last_batch_iteration: Int = Field(-1, ge=-1, description=_LBI)


class LRRangeTestParams(_Section):
    """``scheduler.params`` for LRRangeTest (lr_schedules.LRRangeTest defaults)."""

    lr_range_test_min_lr: Num = Field(1e-3, description="Starting lr.")
    lr_range_test_step_size: Int = Field(2000, gt=0, description="Steps per lr increase.")
    lr_range_test_step_rate: Num = Field(1.0, description="Growth rate per interval.")
    lr_range_test_staircase: Bool = Field(False, description="Step-wise instead of continuous.")
    last_batch_iteration: Int = Field(-1, ge=-1, description=_LBI)


SCHEDULER_PARAMS: dict[str, type[_Section]] = {
    "WarmupLR": WarmupLRParams, "WarmupDecayLR": WarmupDecayLRParams,
    "WarmupCosineLR": WarmupCosineLRParams, "OneCycle": OneCycleParams,
    "LRRangeTest": LRRangeTestParams}


class SchedulerConfig(_Section):
    """DeepSpeed's ``scheduler`` section: ``type`` and its ``params``."""

    type: str = Field(description="WarmupLR | WarmupDecayLR | WarmupCosineLR | OneCycle | "
                      "LRRangeTest (case-insensitive, stored in DeepSpeed's spelling).")
    params: (WarmupLRParams | WarmupDecayLRParams | WarmupCosineLRParams | OneCycleParams
             | LRRangeTestParams) = Field(None, validate_default=True,
                                          description="The schedule's DeepSpeed keywords.")

    @field_validator("type", mode="before")
    @classmethod
    def _canonical_type(cls, v: Any) -> str:
        canonical = {k.lower(): k for k in SCHEDULER_PARAMS}
        if not isinstance(v, str) or v.lower() not in canonical:
            raise ValueError(f"unknown scheduler; allowed: {', '.join(SCHEDULER_PARAMS)}")
        return canonical[v.lower()]

    @field_validator("params", mode="before")
    @classmethod
    def _params_by_type(cls, v: Any, info: ValidationInfo) -> Any:
        return _params_for(SCHEDULER_PARAMS, "scheduler", v, info)


class MeshConfig(_Section):
    """jds's ``mesh`` section: device-mesh axis sizes; one axis may be -1 (the rest).

    Sizes are totals over all devices. ``dcn`` spreads axes over slices or hosts joined by
    the slow data-centre network (see ``jds.partitioning.mesh``); it is left out of
    ``model_dump()`` while every axis stays within one slice.
    """

    _AXES: ClassVar[tuple[str, ...]] = ("data", "fsdp", "tensor", "stage")

    data: Int = Field(-1, description="Pure data parallel; -1 = remaining devices.")
    fsdp: Int = Field(1, description="Data parallel with sharded states (ZeRO axis).")
    tensor: Int = Field(1, description="Tensor parallel (Megatron-style).")
    stage: Int = Field(1, description="Pipeline stages.")
    sequence_parallel: Bool = Field(
        False, exclude_if=lambda v: not v,
        description="Megatron sequence parallelism: the residual stream between sublayers is "
        "split over the tensor axis along the sequence (reduce-scatter + all-gather instead "
        "of all-reduce; 1/tensor of its activation memory). Needs tensor > 1.")
    dcn: dict[str, Int] = Field(
        default_factory=dict, exclude_if=lambda d: all(n == 1 for n in d.values()),
        description='Slices (TPU) or hosts (GPU/CPU) each axis spans over the data-centre '
        'network, e.g. {"data": 2}; unset axes are 1. Must divide the axis size; the product '
        "must equal the number of slices/hosts. Put data here, keep fsdp/tensor in a slice.")

    @model_validator(mode="after")
    def _one_fill(self) -> MeshConfig:
        if "data" not in self.model_fields_set and -1 in (self.fsdp, self.tensor, self.stage):
            self.data = 1  # another axis takes the rest; data keeps 1
        sizes = {a: getattr(self, a) for a in self._AXES}
        for axis, n in sizes.items():
            if n == 0 or n < -1:
                raise ConfigError(f"mesh.{axis}={n}: must be a positive size or -1 (fill)")
        fill = [a for a, n in sizes.items() if n == -1]
        if len(fill) > 1:
            raise ConfigError(f"mesh: {', '.join(f'mesh.{a}' for a in fill)} are all -1; only "
                              "one axis may take the remaining devices")
        for axis, n in self.dcn.items():
            if axis not in sizes:
                raise ConfigError(f"mesh.dcn.{axis}: unknown axis; allowed: "
                                  f"{', '.join(self._AXES)}")
            if n < 1:
                raise ConfigError(f"mesh.dcn.{axis}={n}: must be a positive number of slices "
                                  "(or hosts) the axis spans; 1 = within one slice")
            if sizes[axis] != -1 and sizes[axis] % n:
                raise ConfigError(f"mesh.dcn.{axis}={n} does not divide mesh.{axis}="
                                  f"{sizes[axis]}; make mesh.{axis} a multiple of {n} (each "
                                  "slice holds an equal share) or change mesh.dcn")
        return self


class TrainConfig(_Section):
    """jds's ``train`` section: the ``jds train`` loop."""

    model: str = Field("llama-tiny", description="Preset name or a Hugging Face directory.")
    steps: Int = Field(300, gt=0, description="Optimizer steps to run.")
    seq_len: Int = Field(128, gt=0, description="Tokens per sequence.")
    data: str | None = Field(None, description="null = embedded corpus; else a folder of text "
                             "files or a .bin/.npy token file.")
    eval_interval: Int = Field(100, ge=0, description="Steps between evaluations; 0 = end only.")
    eval_batches: Int = Field(4, gt=0, description="Validation batches per evaluation.")
    save_interval: Int = Field(0, ge=0, description="Steps between checkpoints; 0 = end only.")
    keep_checkpoints: Int = Field(2, gt=0, description="Newest checkpoints kept.")
    remat: Literal["none", "full", "dots"] = Field("none", description="Rematerialise layers: "
                                                  "none, full, or save only matmuls (dots).")
    sample_tokens: Int = Field(200, ge=0, description="Tokens sampled at the end; 0 = none.")




RematPolicy = Literal["none", "full", "dots", "offload"]


class ActivationCheckpointingConfig(_Section):
    """DeepSpeed's ``activation_checkpointing`` section, mapped to jds's layer remat modes.

    DeepSpeed checkpoints what the model hands to ``deepspeed.checkpointing.checkpoint``;
    in jds every model runs its layers through one ``lax.scan`` (``jds.models.layers``),
    and that scan body — one transformer layer — is the checkpoint boundary. So the section
    being present switches rematerialisation on; ``mode`` is the resolved
    ``jds.models.REMAT_MODES`` entry, which ``Config.remat`` hands to the engine:

    - ``policy`` given: that mode (``"none"`` turns the section off explicitly).
    - else ``cpu_checkpointing: true``: ``"offload"``, the matmul outputs kept in pinned
      host memory (GPU/TPU only; the model raises on CPU). DeepSpeed moves each layer's
      input to the CPU and recomputes the layer; jds keeps the layer inputs on device and
      moves the larger matmul outputs instead, so no matmul is recomputed.
    - else ``"full"``: only each layer's input is saved, as DeepSpeed does.

    The other keys are DeepSpeed's, with its defaults, type-checked and checked as
    ``deepspeed.checkpointing.configure`` checks them (contiguous buffers need
    ``partition_activations`` and ``number_checkpoints``):

    - ``partition_activations``: DeepSpeed splits each saved layer input over the
      model-parallel ranks. In jds saved activations follow the sharding rules: the batch is
      split over the data-parallel axes, and the matmul outputs that ``"dots"`` and
      ``"offload"`` save are split over ``tensor`` with their heads/mlp dimensions. The
      layer inputs ``[B, T, D]`` are not split over ``tensor`` under the default rules
      (``seq`` and ``embed`` map to no mesh axis). Accepted; no further effect.
    - ``contiguous_memory_optimization``, ``number_checkpoints``: a preallocated buffer
      against fragmentation. XLA assigns every buffer at compile time; no effect.
    - ``synchronize_checkpoint_boundary``, ``profile``: device syncs and timers around each
      checkpoint. The step is one compiled program; profile it with ``jds.profiling`` or
      the XLA profiler. No effect.
    """

    partition_activations: Bool = Field(
        False, description="DeepSpeed: split saved layer inputs over model-parallel ranks. jds: "
        "saved activations follow the sharding rules; no further effect.")
    contiguous_memory_optimization: Bool = Field(
        False, description="DeepSpeed: copy checkpoints into one buffer (needs "
        "partition_activations and number_checkpoints). No effect: XLA plans buffers.")
    cpu_checkpointing: Bool = Field(
        False, description="Keep saved activations in host memory: selects policy 'offload' "
        "(GPU/TPU only).")
    number_checkpoints: Int | None = Field(
        None, ge=1, description="DeepSpeed: checkpoints in the contiguous buffer. No effect.")
    synchronize_checkpoint_boundary: Bool = Field(
        False, description="DeepSpeed: device sync around each checkpoint. No effect.")
    profile: Bool = Field(False, description="DeepSpeed: time each checkpoint. No effect; use "
                          "jds.profiling.")
    policy: RematPolicy | None = Field(
        None, description="jds: the remat mode (none, full, dots, offload); null = 'offload' "
        "with cpu_checkpointing, else 'full'.")

    @model_validator(mode="after")
    def _consistent(self) -> ActivationCheckpointingConfig:
        key = "activation_checkpointing"
        if self.contiguous_memory_optimization and not self.partition_activations:
            raise ConfigError(f"{key}.contiguous_memory_optimization=true needs "
                              f"{key}.partition_activations=true, as in DeepSpeed; set both or "
                              "drop contiguous_memory_optimization (it has no effect in jds)")
        if self.contiguous_memory_optimization and self.number_checkpoints is None:
            raise ConfigError(f"{key}.contiguous_memory_optimization=true needs "
                              f"{key}.number_checkpoints, as in DeepSpeed; set it or drop "
                              "contiguous_memory_optimization (it has no effect in jds)")
        if self.cpu_checkpointing and self.policy not in (None, "offload"):
            raise ConfigError(f'{key}.cpu_checkpointing=true asks for policy "offload" but '
                              f'{key}.policy="{self.policy}"; drop one of the two keys')
        return self

    @property
    def mode(self) -> str:
        """The resolved remat mode: ``policy``, else "offload" with ``cpu_checkpointing``,
        else "full"."""
        if self.policy is not None:
            return self.policy
        return "offload" if self.cpu_checkpointing else "full"


class FlopsProfilerConfig(_Section):
    """DeepSpeed's ``flops_profiler`` section: the train step's profile at ``profile_step``
    (``jds.profiling.model_profile``: FLOPs, MACs, parameters and latency per module, the
    measured step time, achieved FLOP/s and MFU)."""

    enabled: Bool = Field(False, description="Print the profile once, at profile_step.")
    recompute_fwd_factor: Num = Field(
        0.0, ge=0, description="Forward passes recomputed in backward (1.0 with full "
        "activation checkpointing): the step counts (3 + this) x forward FLOPs.")
    profile_step: Int = Field(1, ge=0, description="Optimizer steps completed before the "
                              "profiled one (the first step compiles).")
    module_depth: Int = Field(-1, ge=-1, description="Deepest module level printed; -1 = all.")
    top_modules: Int = Field(1, gt=0, description="Modules per depth in the aggregated profile.")
    detailed: Bool = Field(True, description="Print the per-module tree.")
    output_file: str | None = Field(None, description="Write the profile here; null = stdout.")


class LoRAConfig(_Section):
    """jds's ``lora`` section: train LoRA adapters over a frozen base (``jds.lora.apply``).

    The engine adds the adapters to its copy of the model and trains only them (the default
    ``trainable`` becomes ``nnx.LoRAParam``). ``quantize_base: "int8"`` is QLoRA's frozen
    int8 base. ``target_modules``: names (``q_proj``, ``wq``, a user module's path) or one
    regex over module paths; null = the model's default (Llama: q_proj, v_proj; GPT-2:
    c_attn; any other model: every ``nnx.Linear``).
    """

    enabled: Bool = Field(False, description="Add LoRA adapters and train only them.")
    r: Int = Field(8, gt=0, description="Adapter rank.")
    alpha: Num | None = Field(None, gt=0, description="Scale numerator (PEFT's lora_alpha); "
                              "null = r (scale 1).")
    dropout: Num = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | str | None = Field(
        None, description="Module names, or one regex over module paths; null = default.")
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default", description="PEFT's Kaiming-uniform A, N(0, 1/r) A, or PiSSA's SVD.")
    use_rslora: Bool = Field(False, description="Scale by alpha / sqrt(r).")
    quantize_base: Literal["int8", "nf4"] | None = Field(
        None, description="QLoRA: store the frozen base matrices as int8 or 4-bit NF4.")


class ProgressiveLayerDropConfig(_Section):
    """DeepSpeed's ``progressive_layer_drop`` section (PLD, ``jds.models.layer_drop``):
    layer ``l`` of ``L`` is kept with probability ``1 - (l + 1) / L * (1 - theta_t)``, where
    ``theta_t = (1 - theta) * exp(-gamma * t) + theta`` follows DeepSpeed's schedule."""

    enabled: Bool = Field(False, description="Drop layers stochastically in training.")
    theta: Num = Field(0.5, gt=0, le=1, description="Keep probability the schedule decays to.")
    gamma: Num = Field(0.001, ge=0, description="How fast it decays, per step.")


class PipelineConfig(_Section):
    """The ``pipeline`` section: DeepSpeed's pipeline keys plus jds's schedule choice.

    The number of stages is the mesh's ``stage`` axis; DeepSpeed's ``stages`` sets it when
    ``mesh.stage`` is left out. Micro-batches per step are ``gradient_accumulation_steps``,
    as in DeepSpeed's pipeline engine. See ``jds.partitioning.pipeline``.

    - ``schedule`` (jds): ``"gpipe"``, ``"1f1b"`` (DeepSpeed's ``TrainSchedule``, the
      default) or ``"interleaved"`` with ``virtual_stages`` layer chunks per device.
    - ``activation_checkpoint_interval`` (DeepSpeed): inside a stage's backward
      recomputation, checkpoint every ``k`` layers; 0 = the model's remat mode.
    - ``partition`` (DeepSpeed's ``partition_method``): ``"parameters"`` (DeepSpeed's
      default), ``"uniform"`` or ``"best"`` give the same split here, ``L / stages`` layers
      each, because the layer stacks are homogeneous; ``"type:..."`` is refused.
    - ``seed_layers``, ``pipe_partitioned``, ``grad_partitioned``, ``use_reentrant``
      (DeepSpeed): accepted. jds seeds one model, moves activations with ``ppermute`` (already
      sharded like the batch), and has no reentrant autograd; no effect.
    """

    stages: Int | None = Field(
        None, description="DeepSpeed: pipeline stages; null/'auto' = mesh.stage. An integer "
        "sets mesh.stage when that is left out.")
    schedule: Literal["gpipe", "1f1b", "interleaved"] = Field(
        "1f1b", description="jds: gpipe, 1f1b or interleaved (virtual_stages chunks).")
    virtual_stages: Int = Field(1, ge=1, description="jds: layer chunks per device "
                                "(interleaved only).")
    activation_checkpoint_interval: Int = Field(
        0, ge=0, description="DeepSpeed: checkpoint every k layers in a stage; 0 = model remat.")
    partition: str = Field("parameters", description="DeepSpeed's partition_method: "
                           "parameters, uniform or best (all equal here).")
    seed_layers: Bool = Field(False, description="DeepSpeed: per-layer seeds. No effect.")
    pipe_partitioned: Bool = Field(True, description="DeepSpeed: split activations between "
                                   "stages over tensor ranks. No effect.")
    grad_partitioned: Bool = Field(True, description="DeepSpeed: same for gradients. No "
                                   "effect.")
    use_reentrant: Bool = Field(True, description="DeepSpeed: torch checkpoint mode. No "
                                "effect.")

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.partition.lower() not in ("parameters", "uniform", "best"):
            raise ConfigError(
                f"pipeline.partition={self.partition!r}: jds splits the homogeneous layer stack "
                "evenly; use 'parameters' (default), 'uniform' or 'best'")
        if self.stages is not None and self.stages < 1:
            raise ConfigError(f"pipeline.stages={self.stages}: must be >= 1 or 'auto'")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ConfigError(f"pipeline.virtual_stages={self.virtual_stages} needs "
                              f"pipeline.schedule='interleaved' (got '{self.schedule}')")
        return self
