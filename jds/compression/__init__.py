"""DeepSpeed Compression in JAX (``compression_training`` in the config).

Built so far: weight quantization-aware training with MoQ's bit schedule
(``weight_quantization``, and MoQ's own ``quantize_training`` section) on any NNX model,
with DeepSpeed's quantizer numerics (``quantizers``) and schedule
(``weight_quantization``). The engine applies the config's section itself
(``jds.initialize(model, config)``); ``init_compression`` / ``redundancy_clean`` are
DeepSpeed's two calls around training:

    model = jds.compression.init_compression(model, "ds_config.json")   # checks the config
    engine = jds.initialize(model, "ds_config.json")                      # trains with MoQ
    ...
    small = jds.compression.redundancy_clean(engine.model, "ds_config.json")  # target bits

Activation quantization, pruning and layer reduction are not built yet: a config that
enables them is refused with an error naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from jds.compression import quantizers
from jds.compression.weight_quantization import (
    MoQSchedule,
    QuantizationPlan,
    plan,
    quantization_step,
    targets,
)


def _section(config: str | os.PathLike | Mapping | Any):
    from jds.config import Config, ConfigError

    cfg = config if isinstance(config, Config) else Config.load(config)
    return cfg, ConfigError


def init_compression(model: nnx.Module, deepspeed_config: str | os.PathLike | Mapping | Any,
                     teacher_model: nnx.Module | None = None, mpu: Any = None) -> nnx.Module:
    """DeepSpeed's ``init_compression``: check the config's ``compression_training`` section
    against ``model`` (every ``modules`` pattern must match a compressible module; groups
    must divide the channels) and return the model. The quantization itself is applied by
    the engine the same config builds (``jds.initialize``); the model is not changed.

    Args:
      model: any NNX model.
      deepspeed_config: a config path, dict or ``Config``.
      teacher_model: for ``layer_reduction``, which jds does not build yet (the config is
        refused when it enables it).
      mpu: DeepSpeed's model-parallel unit; jds's tensor parallelism comes from the mesh,
        so it must be None.

    Raises:
      ConfigError: the section does not fit the model.
    """
    cfg, ConfigError = _section(deepspeed_config)
    if mpu is not None:
        raise ConfigError("init_compression(mpu=...): jds's tensor parallelism comes from the "
                          "config's mesh.tensor; pass mpu=None")
    try:
        plan(model, cfg.compression_training, seed=int(cfg.seed))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model


def redundancy_clean(model: nnx.Module, deepspeed_config: str | os.PathLike | Mapping | Any,
                     mpu: Any = None) -> nnx.Module:
    """DeepSpeed's ``redundancy_clean`` for weight quantization: a copy of ``model`` whose
    targeted weights hold their values quantized at each group's ``target_bits`` (what
    DeepSpeed's ``fix_weight_quantization`` writes), the model unchanged.

    Raises:
      ConfigError: the section does not fit the model.
    """
    cfg, ConfigError = _section(deepspeed_config)
    try:
        p = plan(model, cfg.compression_training, seed=int(cfg.seed))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = nnx.clone(model)
    if p is None:
        return out
    state = nnx.state(out, nnx.Param)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, p.final(pure))
    nnx.update(out, state)
    return out


__all__ = ["MoQSchedule", "QuantizationPlan", "init_compression", "plan", "quantization_step",
           "quantizers", "redundancy_clean", "targets"]
