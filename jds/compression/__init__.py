"""DeepSpeed Compression in JAX (``compression_training`` in the config).

Built so far: weight quantization-aware training with MoQ's bit schedule
(``weight_quantization``, and MoQ's own ``quantize_training`` section) on any NNX model,
with DeepSpeed's quantizer numerics (``quantizers``) and schedule
(``weight_quantization``); sparse, row, head and channel pruning with ``l1`` or learned
``topk`` masks, removed physically by ``redundancy_clean`` (``pruning``). The engine
applies the config's section itself (``jds.initialize(model, config)``);
``init_compression`` / ``redundancy_clean`` are DeepSpeed's two calls around training:

    model = jds.compression.init_compression(model, "ds_config.json")   # checks, adds masks
    engine = jds.initialize(model, "ds_config.json")                      # trains with MoQ
    ...
    small = jds.compression.redundancy_clean(engine.model, "ds_config.json")  # target bits,
                                                                              # pruned away

Layer reduction: ``init_compression(student, config, teacher_model=teacher)`` copies the
chosen teacher layers into the student; ``Distillation(student, teacher)`` with
``distillation_loss()`` trains it against the frozen teacher in one compiled step
(``distillation``). Activation quantization fake-quantizes the inputs of the chosen Linear
/ Conv modules and stacked-decoder matrices (``activation``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from jds.compression import activation, pruning, quantizers
from jds.compression.distillation import (
    STUDENT,
    Distillation,
    distillation_loss,
    student_initialization,
)
from jds.compression.pruning import PruningMask, PruningPlan, PruningScores
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
    must divide the channels), make the modules ``activation_quantization`` names quantize
    their inputs, and, for pruning, add the masks (``l1``, from the weights as
    they are now) and learned scores (``topk``) to ``model`` in place, as
    ``model.compression_state`` (DeepSpeed replaces the model's modules in place); returns
    the model. The compression itself is applied by the engine the same config builds
    (``jds.initialize``), which keeps masks and scores it finds there and adds them
    otherwise.

    Args:
      model: any NNX model.
      deepspeed_config: a config path, dict or ``Config``.
      teacher_model: for ``layer_reduction``: the model whose ``teacher_layer`` layers and
        ``other_module_name`` modules are copied into ``model`` (in place, as DeepSpeed's
        ``student_initialization``); train the student against it with
        ``Distillation(model, teacher_model)`` and ``distillation_loss()``.
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
        pr = pruning.plan(model, cfg.compression_training, seed=int(cfg.seed))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    lr = cfg.compression_training.layer_reduction
    if lr.enabled:
        if teacher_model is None:
            raise ConfigError("compression_training.layer_reduction is enabled: pass "
                              "init_compression(student, config, teacher_model=teacher)")
        try:
            student_initialization(model, teacher_model, lr)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if pr is not None:  # after layer reduction: l1 masks from the student's new weights
        pr.attach(model)
    try:
        aq = activation.plan(model, cfg.compression_training)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if aq is not None:
        aq.attach(model)
    return model


def redundancy_clean(model: nnx.Module, deepspeed_config: str | os.PathLike | Mapping | Any,
                     mpu: Any = None) -> nnx.Module:
    """DeepSpeed's ``redundancy_clean``: a copy of ``model`` with its compression made
    permanent, the model unchanged. Weight quantization: the targeted weights hold their
    values quantized at each group's ``target_bits`` (what DeepSpeed's
    ``fix_weight_quantization`` writes). Pruning: the pruned weights are zeroed, or, for
    groups with ``related_modules``, removed with the matching inputs of the related modules
    (a smaller model; jds's Llama and GPT-2 get a config to match); the masks and scores
    (``compression_state``) are dropped. Pass the trained model (``engine.model``): ``topk``
    scores and ``l1`` masks are read from it.

    Raises:
      ConfigError: the section does not fit the model, or a removal the model cannot express.
    """
    cfg, ConfigError = _section(deepspeed_config)
    try:
        p = plan(model, cfg.compression_training, seed=int(cfg.seed))
        pr = pruning.plan(model, cfg.compression_training, seed=int(cfg.seed))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = nnx.clone(model)
    if p is not None:
        state = nnx.state(out, nnx.Param)
        pure = nnx.to_pure_dict(state)
        nnx.replace_by_pure_dict(state, p.final(pure))
        nnx.update(out, state)
    if pr is not None:
        try:
            out = pruning.clean(out, pr)
        except ValueError as e:
            raise ConfigError(f"redundancy_clean: {e}") from None
    return out


__all__ = ["STUDENT", "Distillation", "MoQSchedule", "PruningMask", "PruningPlan",
           "PruningScores", "QuantizationPlan", "activation", "distillation_loss",
           "init_compression", "plan", "pruning", "quantization_step", "quantizers",
           "redundancy_clean", "student_initialization", "targets"]
