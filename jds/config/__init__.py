"""The jds configuration: DeepSpeed's ``ds_config.json``, accepted as written.

Owns the ``Config`` model (one pydantic model per DeepSpeed section, plus jds's own ``mesh``
and ``train`` sections), loading it from a JSON file or a dict, the batch-size triad
(``Config.resolve_batch``, DeepSpeed's rules) and the policy for keys jds does not act on.

Defaults are DeepSpeed 0.19's (runtime/constants.py, precision_config.py, zero/config.py,
lr_schedules.py, the Fused* optimizer signatures), with two departures that the engine's
contract needs: ``steps_per_print`` is 10, not None (never), and ``seed`` is jds's own key.

Policy:
- unknown top-level keys (Hugging Face writes many): one ``ConfigWarning`` listing them;
  unknown keys *inside* a section are errors, as in DeepSpeed (a typo there changes training).
- DeepSpeed features jds does not implement yet (``NOT_IMPLEMENTED``): accepted, one
  ``ConfigWarning`` naming each that is switched on.
- ``"auto"`` (Hugging Face's placeholder): on the three batch keys it means "not given"; anywhere
  else the key falls back to its default, as DeepSpeed's config models do, with one warning.
- wrong types or values: one ``ConfigError``, one line per problem, each naming the key path,
  the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from jds.config.compression import CompressionConfig, from_quantize_training
from jds.config.sections import (
    OPTIMIZER_PARAMS,
    SCHEDULER_PARAMS,
    ActivationCheckpointingConfig,
    AdamParams,
    BF16Config,
    ConfigError,
    ConfigWarning,
    FlopsProfilerConfig,
    FP16Config,
    Int,
    LambParams,
    LionParams,
    LoRAConfig,
    LRRangeTestParams,
    MeshConfig,
    Num,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    OneCycleParams,
    OptimizerConfig,
    PipelineConfig,
    ProgressiveLayerDropConfig,
    SchedulerConfig,
    TrainConfig,
    WarmupCosineLRParams,
    WarmupDecayLRParams,
    WarmupLRParams,
    ZeroConfig,
)

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed keys jds accepts but does not act on yet. Top-level keys are reported unless
# off (false, null, {}, {"enabled": false}, or DeepSpeed's default in _DS_DEFAULTS); dotted
# keys inside modelled sections unless at their default.
NOT_IMPLEMENTED: dict[str, str] = {
    "comms_logger": "XLA inserts the collectives; read them from the compiled HLO",
    "wandb": "jds train writes TensorBoard and JSONL logs", "tensorboard": "DeepSpeed's monitor",
    "csv_monitor": "DeepSpeed's monitor", "comet": "DeepSpeed's monitor",
    "data_efficiency": "not in jds yet",
    "curriculum_learning": "not in jds yet",
    "eigenvalue": "not in jds yet",
    "sparse_gradients": "JAX gradients are dense", "nebula": "jds checkpoints with Orbax",
    "amp": "use fp16 or bf16", "torch_autocast": "use fp16 or bf16",
    "aio": "jds's NVMe tier reads and writes with threads (offload_optimizer.buffer_count)",
    "elasticity": "set the batch keys directly", "autotuning": "not in jds",
    "sparse_attention": "not in jds",
    "hybrid_engine": "not in jds", "compile": "jds steps are always XLA-compiled",
    "graph_harvesting": "not in jds", "expert_parallel": "MoE is not in jds yet",
    "use_data_before_expert_parallel_": "MoE is not in jds yet",
    "tensor_parallel": "tensor parallelism comes from mesh.tensor",
    "sequence_parallel_size": "not in jds yet",
    "communication_data_type": "XLA reduces gradients in their own dtype",
    "seq_parallel_communication_data_type": "not in jds yet",
    "prescale_gradients": "jds averages gradients once, by the mean",
    "gradient_predivide_factor": "jds averages gradients once, by the mean",
    "gradient_allreduce_op": "jds averages gradients (mean)",
    "wall_clock_breakdown": "jds train logs tokens/s and MFU", "memory_breakdown": "not in jds yet",
    "timers": "jds train logs tokens/s and MFU", "checkpoint": "jds checkpoints with Orbax",
    "datastates": "jds checkpoints with Orbax", "data_types": "precision comes from fp16/bf16",
    "zero_allow_untested_optimizer": "every jds optimizer runs under every layout",
    "zero_force_ds_cpu_optimizer": "no CPU optimizer in jds", "dump_state": "not in jds",
    "disable_allgather": "XLA inserts the collectives", "disable_python_gc": "not in jds",
    "dataloader_drop_last": "the jds loader yields whole global batches",
    "managed_gradient_accumulation": "jds accumulates inside the compiled step",
    "weight_quantization": "compression is not in jds yet", "vocabulary_size": "the model sets it",
    "zero_optimization.zero_quantized_weights": "ZeRO++ quantized collectives: not yet",
    "zero_optimization.zero_quantized_nontrainable_weights": "ZeRO++ quantized weights: not yet",
    "zero_optimization.zero_quantized_gradients": "ZeRO++ quantized collectives: not yet",
    "zero_optimization.mics_hierarchical_params_gather": "XLA schedules the MiCS gathers",
    "zero_optimization.zeropp_loco_param": "LoCo-ZeRO++: not in jds", "zero_optimization.zenflow":
    "ZenFlow: not in jds", "fp16.fp16_master_weights_and_grads": "jds keeps fp32 master weights",
    "bf16.bf16_master_weights_and_grads": "jds keeps fp32 master weights",
    "bf16.bf16_optimizer_states": "jds keeps fp32 optimizer states",
}
_DS_DEFAULTS: dict[str, Any] = {
    "gradient_predivide_factor": 1.0, "gradient_allreduce_op": "mean",
    "zero_force_ds_cpu_optimizer": True, "managed_gradient_accumulation": True,
    "seq_parallel_communication_data_type": "fp32", "sequence_parallel_size": 1}
# zero_optimization keys dropped from to_dict() at these values (and every null there and in
# optimizer.params), so the output also loads in DeepSpeed 0.19, which rejects the removed MiCS
# keys, a deprecated key beside its replacement, and unknown keyword arguments to FusedAdam.
_DUMP_OMIT: dict[str, Any] = {"mics_shard_size": -1, "mics_hierarchical_params_gather": False,
                              "stage3_gather_fp16_weights_on_model_save": False,
                              "param_partition_size": None, "grad_partition_size": None,
                              "optimizer_partition_size": None}


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """The resolved batch triad (DeepSpeed's rules) for ``dp_size`` data-parallel devices."""

    train_batch_size: int
    micro_batch_per_device: int
    gradient_accumulation_steps: int
    dp_size: int

    @property
    def micro_batch_global(self) -> int:
        """Sequences per micro-step over all data-parallel devices."""
        return self.micro_batch_per_device * self.dp_size


def _show(v: Any) -> str:
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_errors(err: ValidationError, auto: Collection[str] = ()) -> str:
    lines: list[str] = []
    for e in err.errors(include_url=False):
        inner = (e.get("ctx") or {}).get("error")
        path, msg = _path(e["loc"]), e["msg"].removeprefix("Value error, ")
        if isinstance(inner, ConfigError):
            lines.append(str(inner))
        elif e["type"] == "missing" and path in auto:
            lines.append(f'{path}="auto": nothing resolves "auto" here and the key has no '
                         "default; set a value")
        elif e["type"] == "missing" and e["loc"] and isinstance(e["loc"][-1], int):
            lines.append(f"{_path(e['loc'][:-1])}={_show(e['input'])}: too few items "
                         f"(item [{e['loc'][-1]}] is missing)")
        elif e["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            lines.append(f"{path}={_show(e['input'])}: {msg}" if path else msg)
    lines = list(dict.fromkeys(lines))
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines)


def _is_off(value: Any, default: Any = None) -> bool:
    if isinstance(value, Mapping) and value.get("enabled") is False:
        return True
    return value in (None, False, {}) or value == default


def _strip_auto(data: Mapping, prefix: str, found: list[str]) -> dict:
    out = {}
    for k, v in data.items():
        if v == "auto" and not (prefix == "" and k in BATCH_KEYS):
            found.append(prefix + k)
        else:
            out[k] = _strip_auto(v, f"{prefix}{k}.", found) if isinstance(v, Mapping) else v
    return out


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _user_stacklevel() -> int:
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or f"{os.sep}pydantic" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _read_json(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist" if not p.exists()
                          else f"config file '{p}' is not a file")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:  # DeepSpeed refuses duplicate keys too; json.load keeps the last
                raise ConfigError(f"config file '{p}': key {k!r} appears twice in one object")
            seen[k] = v
        return seen

    try:
        data = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file '{p}' is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a JSON object, got {type(data).__name__}")
    return data


def _suggest(total: int, q: int) -> str:
    low = total // q * q
    return f"{low} or {low + q}" if low > 0 else f"{q} or {2 * q}"


def _batch_value(v: Any) -> Any:
    if v is None or v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError('must be a positive integer, "auto" or null')
    return v


BatchValue = Annotated[int | Literal["auto"] | None, BeforeValidator(_batch_value)]


class Config(BaseModel):
    """A validated jds config: DeepSpeed's ``ds_config.json`` keys plus ``mesh`` and ``train``.

    Build it with ``Config.load(path | dict | Config | None)``; constructing it directly
    (``Config(**d)``) applies the same rules. Invalid input raises ``ConfigError``.
    """

    model_config = ConfigDict(extra="forbid")
    # The file it was loaded from (None for a dict): named in errors found later.
    _source: str | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        """Equal fields (where a config was loaded from does not count)."""
        if not isinstance(other, Config):
            return NotImplemented
        return self.__dict__ == other.__dict__

    train_batch_size: BatchValue = Field(None, description="Global batch per optimizer step.")
    train_micro_batch_size_per_gpu: BatchValue = Field(
        None, description="Batch per data-parallel device per micro-step.")
    gradient_accumulation_steps: BatchValue = Field(None, description="Micro-steps per step.")
    optimizer: OptimizerConfig | None = Field(None, description="null = AdamW defaults.")
    scheduler: SchedulerConfig | None = Field(None, description="null = constant lr.")
    gradient_clipping: Num = Field(1.0, ge=0, description="Max global gradient norm; 0 = off "
                                   "(DeepSpeed 0.19's default is 1.0).")
    fp16: FP16Config = Field(default_factory=FP16Config, description="fp16 + loss scaling.")
    bf16: BF16Config = Field(default_factory=BF16Config, description="bf16 (alias: bfloat16).")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig, description="ZeRO.")
    steps_per_print: Int = Field(10, gt=0, description="Steps between progress lines.")
    seed: Int = Field(42, description="Seed for initialisation, dropout and data order.")
    mesh: MeshConfig = Field(default_factory=MeshConfig, description="Device-mesh axis sizes.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The jds train loop.")
    activation_checkpointing: ActivationCheckpointingConfig | None = Field(
        None, description="Layer remat (see Config.remat); null = train.remat decides.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig,
                                     description="Pipeline schedule (stages: mesh.stage).")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA / QLoRA adapters.")
    progressive_layer_drop: ProgressiveLayerDropConfig = Field(
        default_factory=ProgressiveLayerDropConfig, description="Progressive Layer Dropping.")
    flops_profiler: FlopsProfilerConfig = Field(
        default_factory=FlopsProfilerConfig, description="Profile the train step once.")
    compression_training: CompressionConfig = Field(
        default_factory=CompressionConfig, description="DeepSpeed Compression: weight "
        "quantization-aware training (MoQ); jds.compression.")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_format_errors(e)) from None

    # Without this mark pydantic treats __init__ as custom and routes model_validate through
    # it, running _accept_deepspeed_dict twice (every warning was given twice).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Config:
        """pydantic's ``model_validate``, raising ``ConfigError`` instead of ValidationError."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise ConfigError(_format_errors(e)) from None

    @model_validator(mode="wrap")
    @classmethod
    def _accept_deepspeed_dict(cls, data: Any, handler: Any) -> Config:
        if not isinstance(data, Mapping):
            return handler(data)
        data, unknown, ignored, auto = dict(data), [], [], []
        if isinstance(data.get("zero_optimization"), bool):  # DeepSpeed's deprecated form
            data["zero_optimization"] = {"stage": int(data["zero_optimization"])}
        if "quantize_training" in data:  # MoQ's own section: the weight quantization it means
            try:
                moq = from_quantize_training(data.pop("quantize_training"))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if moq is not None:
                if CompressionConfig.model_validate(data.get("compression_training") or {}
                                                    ).quantizes:
                    raise ConfigError("quantize_training and compression_training."
                                      "weight_quantization are both enabled; keep one")
                data["compression_training"] = {**(data.get("compression_training") or {}),
                                                 **moq}
        if "bfloat16" in data:
            old = data.pop("bfloat16")
            if "bf16" in data:
                ignored.append("bfloat16 (bf16 is given; DeepSpeed ignores the old key then)")
            else:
                data["bf16"] = old
        for key in [k for k in data if k not in cls.model_fields]:
            value = data.pop(key)
            if key in NOT_IMPLEMENTED:
                if not _is_off(value, _DS_DEFAULTS.get(key)):
                    ignored.append(f"{key} ({NOT_IMPLEMENTED[key]})")
            else:
                close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
                unknown.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
        try:
            cfg = handler(_strip_auto(data, "", auto))
        except ValidationError as e:  # name the "auto" that left a required key missing
            if not any(err["type"] == "missing" and _path(err["loc"]) in auto
                       for err in e.errors()):
                raise
            raise ConfigError(_format_errors(e, auto)) from None
        if cfg.fp16.enabled and cfg.bf16.enabled:
            raise ConfigError("fp16.enabled and bf16.enabled are both true; enable one of them "
                              "(or neither, for fp32)")
        for key, note in NOT_IMPLEMENTED.items():
            owner, _, name = key.rpartition(".")
            if owner:
                section = _lookup(cfg, owner)
                if section is None:
                    continue
                value = _lookup(cfg, key)
                if not _is_off(value, type(section).model_fields[name].default):
                    shown = value.device if isinstance(value, BaseModel) else _show(value)
                    ignored.append(f"{key}={shown} ({note})")
        level = _user_stacklevel()
        if unknown:
            warnings.warn(f"ignoring unknown config keys: {', '.join(unknown)}", ConfigWarning,
                          stacklevel=level)
        if ignored:
            warnings.warn("accepted but not implemented by jds yet (no effect on this run): "
                          + "; ".join(ignored), ConfigWarning, stacklevel=level)
        if auto:
            shown = ", ".join(f"{k}={_show(_lookup(cfg, k))}" for k in auto)
            warnings.warn(f'"auto" values fall back to their defaults, as in DeepSpeed: {shown}',
                          ConfigWarning, stacklevel=level)
        return cfg

    @model_validator(mode="after")
    def _pipeline_stages(self) -> Config:
        stages = self.pipeline.stages
        if stages is None:
            return self
        if "stage" not in self.mesh.model_fields_set:
            self.mesh.stage = int(stages)
            if "data" not in self.mesh.model_fields_set and self.mesh.data != -1:
                self.mesh.data = -1
        elif self.mesh.stage != stages:
            raise ConfigError(f"pipeline.stages={stages} but mesh.stage={self.mesh.stage}; "
                              "set one of them (or make them equal)")
        return self

    @model_validator(mode="after")
    def _remat_agrees(self) -> Config:
        section = self.activation_checkpointing
        if section is not None and self.train.remat != "none" and section.mode != self.train.remat:
            raise ConfigError(
                f'train.remat="{self.train.remat}" and activation_checkpointing (remat '
                f'"{section.mode}") disagree; keep one of them, or set '
                f'activation_checkpointing.policy to "{self.train.remat}"')
        return self

    @classmethod
    def load(cls, src: str | os.PathLike | Mapping | Config | None) -> Config:
        """Load and validate a config.

        Args:
          src: a ``ds_config.json`` path, a dict, a ``Config`` (returned as-is), or None for
            the defaults.

        Returns:
          The validated ``Config``.

        Raises:
          ConfigError: a missing/unreadable/invalid JSON file (naming it), or invalid values.
        """
        if isinstance(src, Config):
            return src
        if src is None or isinstance(src, Mapping):
            return cls.model_validate(dict(src or {}))
        if not isinstance(src, str | os.PathLike):
            raise ConfigError(f"config must be a JSON file path, a dict or a jds.Config, got "
                              f"{type(src).__name__}")
        try:
            cfg = cls.model_validate(_read_json(src))
            cfg._source = os.fspath(src)
            return cfg
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("config file") else
                              f"config file '{src}': {msg}") from None

    @classmethod
    def default_train(cls) -> Config:
        """The config ``jds train`` uses without ``--config`` (fp32, AdamW, warmup + decay)."""
        return cls.load(DEFAULT_TRAIN)

    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """The compute precision: "fp16", "bf16" or "fp32"."""
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"

    @property
    def remat(self) -> str:
        """The layer remat mode for the model, one of ``jds.models.REMAT_MODES``.

        ``activation_checkpointing``, when present, decides (``.mode``: its ``policy``, else
        "offload" with ``cpu_checkpointing``, else "full"); otherwise ``train.remat``. The
        two may both be given only when they agree (``train.remat`` "none" is its default
        and yields to the section).
        """
        section = self.activation_checkpointing
        return self.train.remat if section is None else section.mode

    def to_dict(self) -> dict:
        """A JSON-able dict that ``Config.load`` turns back into an equal ``Config``."""
        out = self.model_dump(mode="json")
        # DeepSpeed reads a null section as a dict and fails; absent means the same to both.
        if out["activation_checkpointing"] is None:
            del out["activation_checkpointing"]
        elif out["activation_checkpointing"]["policy"] is None:
            del out["activation_checkpointing"]["policy"]
        # jds's own sections, left out when off (DeepSpeed 0.19 rejects progressive_layer_drop)
        for key, section in (("lora", LoRAConfig), ("progressive_layer_drop",
                                                    ProgressiveLayerDropConfig),
                             ("compression_training", CompressionConfig)):
            if out[key] == section().model_dump(mode="json"):
                del out[key]
        zero = out["zero_optimization"]
        for key, default in _DUMP_OMIT.items():
            if zero.get(key) == default:
                del zero[key]
        out["zero_optimization"] = {k: v for k, v in zero.items() if v is not None}
        if out["optimizer"] is not None:
            params = out["optimizer"]["params"]
            out["optimizer"]["params"] = {k: v for k, v in params.items() if v is not None}
        return out

    def resolve_batch(self, dp_size: int) -> BatchSizes:
        """``_resolve_batch``, its errors naming the config file the values came from."""
        try:
            return self._resolve_batch(dp_size)
        except ConfigError as e:
            if self._source is None:
                raise
            raise ConfigError(f"config file '{self._source}': {e}") from None

    def _resolve_batch(self, dp_size: int) -> BatchSizes:
        """Resolve the batch triad as DeepSpeed does (``_set_batch_related_parameters``).

        ``"auto"`` counts as not given. With all three given they must satisfy
        ``train == micro * accumulation * dp_size``; with two, the third is derived and must
        divide exactly; with only train, accumulation is 1; with only micro, accumulation is 1.

        Args:
          dp_size: data-parallel devices (the product of the mesh's data axes).

        Returns:
          The resolved ``BatchSizes``.

        Raises:
          ConfigError: no batch size given, or sizes that do not fit ``dp_size``, naming the
            keys, the values and a fix.
        """
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ConfigError(f"resolve_batch: dp_size must be a positive integer, got {dp_size!r}")
        tb, mb, ga = (v if isinstance(v, int) else None for v in
                      (self.train_batch_size, self.train_micro_batch_size_per_gpu,
                       self.gradient_accumulation_steps))
        dp = dp_size
        micro, train, accum = "train_micro_batch_size_per_gpu", "train_batch_size", \
            "gradient_accumulation_steps"

        def exact(q: int, factors: str) -> int:
            if tb % q or tb < q:
                raise ConfigError(f"{train}={tb} is not divisible by {factors} = {q}; use "
                                  f"{train} {_suggest(tb, q)}")
            return tb // q

        if tb is not None and mb is not None and ga is not None:
            if tb != mb * ga * dp:
                raise ConfigError(
                    f"{train}={tb} != {micro} * {accum} * data-parallel devices = {mb}*{ga}*{dp} "
                    f"= {mb * ga * dp}; set {train} to {mb * ga * dp}, or drop one of the three "
                    "keys so that it is derived")
        elif tb is not None and mb is not None:
            ga = exact(mb * dp, f"{micro} * data-parallel devices = {mb}*{dp}")
        elif tb is not None and ga is not None:
            mb = exact(ga * dp, f"{accum} * data-parallel devices = {ga}*{dp}")
        elif mb is not None and ga is not None:
            tb = mb * ga * dp
        elif tb is not None:
            ga, mb = 1, exact(dp, f"the data-parallel devices ({accum} defaults to 1): {dp}")
        elif mb is not None:
            ga, tb = 1, mb * dp
        else:
            autos = [k for k in BATCH_KEYS if getattr(self, k) == "auto"]
            why = (f'; {", ".join(autos)} {"is" if len(autos) == 1 else "are"} "auto", which '
                   "nothing resolved (Hugging Face's Trainer fills these in)") if autos else ""
            raise ConfigError(f"no batch size: set {train} or {micro} (DeepSpeed needs one of "
                              f"them){why}")
        return BatchSizes(tb, mb, ga, dp)


DEFAULT_TRAIN: dict[str, Any] = {
    "train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "adamw",
                  "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 30,
                             "total_num_steps": 300, "warmup_type": "linear"}},
    "bf16": {"enabled": False},
}

__all__ = [
    "BATCH_KEYS", "DEFAULT_TRAIN", "NOT_IMPLEMENTED", "OPTIMIZER_PARAMS", "SCHEDULER_PARAMS",
    "ActivationCheckpointingConfig", "AdamParams", "BF16Config", "BatchSizes", "Config",
    "ConfigError", "ConfigWarning",
    "FP16Config", "FlopsProfilerConfig", "LRRangeTestParams", "LambParams", "LionParams",
    "LoRAConfig", "MeshConfig", "ProgressiveLayerDropConfig",
    "OffloadOptimizerConfig", "OffloadParamConfig", "OneCycleParams", "OptimizerConfig",
    "SchedulerConfig", "TrainConfig", "WarmupCosineLRParams", "WarmupDecayLRParams",
    "WarmupLRParams", "ZeroConfig",
]
