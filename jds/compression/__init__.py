"""DeepSpeed Compression in JAX (``compression_training`` in the config).

Built: weight quantization-aware training with MoQ's bit schedule
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
``distillation_loss()`` (soft targets, and with ``hidden=`` each layer's output) trains it
against the frozen teacher in one compiled step (``distillation``). Activation quantization
fake-quantizes the inputs of the chosen Linear / Conv modules and stacked-decoder matrices,
with dynamic or static ranges (``activation``); ``post_training_quantize`` calibrates
without training. Module patterns may use the module names of DeepSpeed's BERT and GPT-2
configs on jds's decoders (``weight_quantization.ALIASES``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flax import nnx

from jds.compression import activation, pruning, quantizers
from jds.compression.distillation import (
    STUDENT,
    Distillation,
    distillation_loss,
    hidden_states,
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


def post_training_quantize(model: nnx.Module,
                           deepspeed_config: str | os.PathLike | Mapping | Any,
                           calibration: Iterable[Any] = (), *,
                           call: Callable[[nnx.Module, Any], Any] | None = None) -> nnx.Module:
    """Post-training quantization (ZeroQuant's recipe, DeepSpeed's quantizers): a copy of
    ``model`` whose ``weight_quantization`` targets hold their values at each group's
    ``target_bits`` (``quantize_groups`` runs of output channels: per channel when it equals
    their number) and whose ``activation_quantization`` modules quantize their inputs from
    the start; static ranges are calibrated on ``calibration`` batches (QuantAct's running
    range, as in training), then frozen. The model is unchanged.

    To serve a decoder quantized this way in int8 with exactly these codes and scales, pass
    the *original* model (or run folder) with the same section:
    ``jds.init_inference(model, {"dtype": "int8", "compression_training": section})``
    quantizes the fp32 weights with the same quantizer (quantizing the already-quantized
    weights again would clip their largest value and change the scale).

    Args:
      model: any NNX model.
      deepspeed_config: a config path, dict or ``Config`` with ``compression_training``.
      calibration: batches run through the model to set static activation ranges.
      call: ``(model, batch) -> outputs``; default ``model(batch["input_ids"])`` for a dict
        batch, else ``model(batch)``.

    Raises:
      ConfigError: the section does not fit the model, names a technique that needs
        training (pruning, layer reduction), or needs calibration batches it did not get.
    """
    cfg, ConfigError = _section(deepspeed_config)
    cc = cfg.compression_training
    if cc.prunes or cc.layer_reduction.enabled:
        raise ConfigError("post_training_quantize applies weight_quantization and "
                          "activation_quantization; pruning and layer_reduction need "
                          "training (jds.initialize with the config)")
    if cc.quantizes_activations:  # quantize from the first batch: no schedule after training
        cc = cc.model_copy(update={"activation_quantization": cc.activation_quantization.
                                   model_copy(update={"shared_parameters": cc.
                                              activation_quantization.shared_parameters.
                                              model_copy(update={"schedule_offset": 0})})})
    try:
        p = plan(model, cc, seed=int(cfg.seed))
        aq = activation.plan(model, cc)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = nnx.clone(model)
    if p is not None:
        state = nnx.state(out, nnx.Param)
        nnx.replace_by_pure_dict(state, p.final(nnx.to_pure_dict(state)))
        nnx.update(out, state)
    if aq is None:
        return out
    aq.attach(out)
    if not any(spec.static for _, spec, _ in aq.items):
        return out
    batches = list(calibration)
    if not batches:
        raise ConfigError("compression_training.activation_quantization uses static ranges: "
                          "post_training_quantize needs calibration batches to set them")
    run = call or (lambda m, b: m(b["input_ids"]) if isinstance(b, Mapping) else m(b))
    out.eval()  # dropout off, batch statistics kept; only the activation ranges move
    quant = activation.calibrating(out)
    for m in quant:
        m.use_running_average = False
    step = nnx.jit(lambda m, b: run(m, b))
    for b in batches:
        step(out, b)
    for m in quant:  # and stay
        m.use_running_average = True
    return out


__all__ = ["STUDENT", "Distillation", "MoQSchedule", "PruningMask", "PruningPlan",
           "PruningScores", "QuantizationPlan", "activation", "distillation_loss", "hidden_states",
           "init_compression", "plan", "post_training_quantize", "pruning",
           "quantization_step", "quantizers", "redundancy_clean", "student_initialization",
           "targets"]
