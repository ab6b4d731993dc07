"""Layer reduction with knowledge distillation (DeepSpeed's ``layer_reduction``, XTC).

**Student initialisation** (``student_initialization``, which ``init_compression`` calls
with ``teacher_model``): DeepSpeed copies teacher layer ``teacher_layer[i]`` into student
layer ``i`` (the modules ``<module_name_prefix>.<i>``) and the ``other_module_name``
modules whole. jds's stacked decoders hold every layer in one array per matrix, so
``module_name_prefix`` names the stack (``model.layers`` / ``transformer.h`` as Hugging
Face, BERT's ``bert.encoder.layer`` as DeepSpeedExamples' configs write it, or jds's
``layers``) and the student's arrays become the teacher's rows ``teacher_layer``;
``other_module_name`` takes Hugging Face names (``model.embed_tokens``, ``model.norm``,
``lm_head``, ``transformer.wte``, ``transformer.wpe``, ``transformer.ln_f``), the BERT
names of the modules in the same places (``bert.embeddings``; ``bert.pooler``, between the
stack and the head: the final norm; ``classifier``: the LM head, or the embeddings it is
tied to) or attribute paths. Any other model: ``<prefix>.<i>`` are attribute paths to sub-modules
(an ``nnx.List`` of blocks, say) whose parameters are copied.

**Distillation in the same compiled step.** DeepSpeed leaves the distillation loss to the
user's script (its examples run the teacher's forward beside the student's). jds builds it:
``Distillation(student, teacher)`` is one model whose ``teacher`` is frozen (the engine's
default ``trainable`` for it is the student's parameters), so the teacher is sharded like
any frozen parameters (ZeRO-3 splits it too) and its forward runs inside the student's
compiled train step; ``distillation_loss`` is the loss: ``alpha * T^2 * KL(teacher_T ||
student_T) + (1 - alpha) * cross-entropy`` per token (Hinton et al.'s soft targets at
temperature ``T``), reported as ``kd`` and ``ce``; ``hidden=`` adds the hidden-state loss
(each student layer's output against its teacher layer's, mean squared error; every layer's
output leaves the layer scan for it). Under ZeRO-3 the student and the teacher each gather
their weights a layer at a time inside their own layer scans, as a lone decoder does
(``jds.models.base.split_model`` finds the decoders inside the wrapper).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.models import base

# A decoder's modules outside the stack by their Hugging Face names and by the BERT names
# of the modules in the same place (DeepSpeedExamples' configs): each name's alternatives,
# the first one whose attributes the model has (non-None) is the module
_HF_TOP = {"model.embed_tokens": (("embed_tokens",),), "model.norm": (("norm",),),
           "lm_head": (("lm_head",),), "transformer.wte": (("wte",),),
           "transformer.wpe": (("wpe",),), "transformer.ln_f": (("ln_f_scale", "ln_f_bias"),),
           "bert.embeddings": (("embed_tokens",), ("wte", "wpe")),
           "bert.pooler": (("norm",), ("ln_f_scale", "ln_f_bias")),  # between stack and head
           "classifier": (("lm_head",), ("embed_tokens",), ("wte",))}  # tied: the embeddings
_STACK_NAMES = ("bert.encoder.layer", "transformer.h", "model.layers")  # any decoder's stack


class Distillation(nnx.Module):
    """A student trained against a frozen teacher: ``model(x)`` is the student's output;
    ``jds.initialize(Distillation(student, teacher), config,
    loss_fn=distillation_loss())`` trains the student only (``engine.model.student``)."""

    def __init__(self, student: nnx.Module, teacher: nnx.Module) -> None:
        self.student = student
        self.teacher = teacher

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)


STUDENT = nnx.All(nnx.Param, nnx.PathContains("student"))  # Distillation's trainable filter


def hidden_states(model: nnx.Module, input_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A stacked decoder's ``(logits_BTV, every layer's output [L, B, T, D])`` (its
    ``embed`` / ``run_layers(outputs=True)`` / ``head``)."""
    from jds.models.layers import positions_from_segments, stacked_params

    B, T = input_ids_BT.shape
    positions_BT = positions_from_segments(None, B, T)
    x_BTD = model.embed(input_ids_BT, positions_BT)
    x_BTD, hidden_LBTD = model.run_layers(stacked_params(model.layers), x_BTD, positions_BT,
                                          None, outputs=True)
    return model.head(x_BTD), hidden_LBTD


def distillation_loss(temperature: float = 1.0, alpha: float = 0.5,
                      vocab_size: int | None = None, *, hidden: float = 0.0,
                      teacher_layer: list[int] | None = None) -> base.Loss:
    """The causal-LM distillation loss of a ``Distillation`` model, per valid target token:
    ``alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE``
    (labels as the causal-LM loss reads them: ``labels`` with -100 ignored, else
    ``input_ids``), plus with ``hidden > 0`` the hidden-state loss (TinyBERT / XTC's):
    ``hidden * sum_i mean_D (h_student_i - h_teacher_{teacher_layer[i]})**2``, ``h`` a
    layer's output (the residual stream), for stacked decoders of one width. The teacher
    carries no gradient; ``kd``, ``ce`` (and ``hidden``) are reported.

    Args:
      temperature, alpha: the soft targets' temperature and weight.
      vocab_size: checked against the batch's token ids.
      hidden: the hidden-state loss's weight (0: logits only).
      teacher_layer: the teacher layer each student layer learns from (the config's
        ``layer_reduction.teacher_layer``); default: evenly spaced, the last student layer
        on the last teacher layer (4 -> 2 layers: ``[1, 3]``).

    Raises:
      ValueError: ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, ``hidden < 0``; when
        the loss is traced with ``hidden``, models that are not stacked decoders of one
        width, or a ``teacher_layer`` that does not fit them.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"distillation alpha must be in [0, 1]; got {alpha}")
    if hidden < 0:
        raise ValueError(f"distillation hidden (the hidden-state loss's weight) must be >= 0; "
                         f"got {hidden}")
    t = float(temperature)

    def outputs(model: Distillation, ids_BT: jax.Array):
        if not hidden:
            return model.student(ids_BT), jax.lax.stop_gradient(model.teacher(ids_BT)), None
        for who in ("student", "teacher"):
            if not base.is_stacked_decoder(getattr(model, who)):
                raise ValueError(f"distillation_loss(hidden=...) reads every layer's output of "
                                 f"jds's stacked decoders; the {who} is a "
                                 f"{type(getattr(model, who)).__name__}")
        s_BTV, s_LBTD = hidden_states(model.student, ids_BT)
        t_BTV, t_LBTD = jax.lax.stop_gradient(hidden_states(model.teacher, ids_BT))
        n_s, n_t = s_LBTD.shape[0], t_LBTD.shape[0]
        idx = (list(teacher_layer) if teacher_layer is not None
               else [round((i + 1) * n_t / n_s) - 1 for i in range(n_s)])
        if len(idx) != n_s or any(not 0 <= i < n_t for i in idx):
            raise ValueError(f"distillation_loss teacher_layer {idx}: needs one teacher layer "
                             f"(0 to {n_t - 1}) for each of the student's {n_s} layers")
        if s_LBTD.shape[1:] != t_LBTD.shape[1:]:
            raise ValueError(f"distillation_loss(hidden=...): the student's layer outputs "
                             f"{s_LBTD.shape[1:]} and the teacher's {t_LBTD.shape[1:]} differ")
        diff = s_LBTD.astype(jnp.float32) - t_LBTD[jnp.asarray(idx)].astype(jnp.float32)
        return s_BTV, t_BTV, jnp.sum(jnp.mean(diff * diff, axis=-1), axis=0)  # [B, T]

    def fn(model: Distillation, batch: Mapping[str, jax.Array]):
        ids_BT = batch["input_ids"]
        student_BTV, teacher_BTV, mse_BT = outputs(model, ids_BT)
        ce_sum, _ = base.causal_lm_loss_sum(student_BTV, ids_BT, batch.get("labels"))
        labels_BT = batch.get("labels", ids_BT)
        valid_BT = labels_BT[:, 1:] != base.IGNORE_INDEX  # the positions the CE counts
        log_s = jax.nn.log_softmax(student_BTV[:, :-1].astype(jnp.float32) / t, axis=-1)
        log_t = jax.nn.log_softmax(teacher_BTV[:, :-1].astype(jnp.float32) / t, axis=-1)
        kl_BT = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
        kd_sum = t * t * jnp.sum(jnp.where(valid_BT, kl_BT, 0.0))
        total = alpha * kd_sum + (1 - alpha) * ce_sum
        aux = {"kd": kd_sum, "ce": ce_sum}
        if mse_BT is not None:
            aux["hidden"] = jnp.sum(jnp.where(valid_BT, mse_BT[:, :-1], 0.0))
            total = total + hidden * aux["hidden"]
        return total, aux

    return base.Loss(fn=fn, weight=base.valid_targets, per_example=True,
                     weight_metric="tokens",
                     check=lambda batch: base.check_lm_batch(batch, vocab_size))


def _stack_path(model: nnx.Module, prefix: str) -> tuple | None:
    """The path of ``model``'s stacked layers named by ``prefix`` (None: not a stack)."""
    for path, m in nnx.iter_modules(model):
        cls = type(m)
        if getattr(cls, "LINEARS", None) and getattr(cls, "HF_PREFIX", None):
            if prefix in (cls.HF_PREFIX, ".".join(map(str, path)), *_STACK_NAMES):
                return tuple(path)
    return None


def _attr(model: nnx.Module, dotted: str, where: str) -> Any:
    node = model
    for k in dotted.split("."):
        try:
            node = node[int(k)] if k.isdigit() else getattr(node, k)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(f"{where}: {type(model).__name__} has no {dotted!r}") from None
    return node


def _copy(dst: Any, src: Any, where: str) -> None:
    if isinstance(src, nnx.Variable):
        if tuple(dst.get_value().shape) != tuple(src.get_value().shape):
            raise ValueError(f"{where}: shapes differ, student {tuple(dst.get_value().shape)} "
                             f"vs teacher {tuple(src.get_value().shape)}")
        dst.set_value(src.get_value())
        return
    s_state, t_state = nnx.state(dst, nnx.Param), nnx.state(src, nnx.Param)
    s_flat, t_flat = dict(nnx.to_flat_state(s_state)), dict(nnx.to_flat_state(t_state))
    if set(s_flat) != set(t_flat):
        raise ValueError(f"{where}: the student's and teacher's modules differ in structure")
    for k, v in t_flat.items():
        if s_flat[k].get_value().shape != v.get_value().shape:
            raise ValueError(f"{where}: {'/'.join(map(str, k))} shapes differ, student "
                             f"{s_flat[k].get_value().shape} vs teacher {v.get_value().shape}")
    nnx.update(dst, t_state)


def student_initialization(student: nnx.Module, teacher: nnx.Module, section: Any) -> None:
    """DeepSpeed's ``student_initialization``: copy the teacher's ``teacher_layer`` layers
    and ``other_module_name`` modules into ``student`` in place (see the module docstring).

    Args:
      section: the config's ``layer_reduction`` section (``jds.config.compression``).

    Raises:
      ValueError: a layer index outside the teacher, a student whose layer count is not
        ``keep_number_layer``, a prefix or module name that is not in the models, shapes
        that differ.
    """
    key = "compression_training.layer_reduction"
    layers = list(section.teacher_layer)
    stack = _stack_path(teacher, section.module_name_prefix)
    if stack is not None:
        t_stack = _attr(teacher, ".".join(map(str, stack)), key)
        s_stack = _attr(student, ".".join(map(str, stack)), key)
        t_state = nnx.to_flat_state(nnx.state(t_stack, nnx.Param))
        n_teacher = int(next(iter(t_state))[1].get_value().shape[0])
        s_flat = dict(nnx.to_flat_state(nnx.state(s_stack, nnx.Param)))
        n_student = int(next(iter(s_flat.values())).get_value().shape[0])
        _check_layers(layers, n_teacher, n_student, section.keep_number_layer, key)
        idx = np.asarray(layers)
        for k, v in t_state:
            if k not in s_flat:
                raise ValueError(f"{key}: the student's layers have no {'/'.join(map(str, k))}")
            _copy(s_flat[k], type(v)(jnp.asarray(v.get_value())[idx]), f"{key}: layers/{k}")
    else:
        t_blocks = _attr(teacher, section.module_name_prefix, f"{key}.module_name_prefix")
        s_blocks = _attr(student, section.module_name_prefix, f"{key}.module_name_prefix")
        _check_layers(layers, len(t_blocks), len(s_blocks), section.keep_number_layer, key)
        for i, t in enumerate(layers):
            _copy(s_blocks[i], t_blocks[t], f"{key}: {section.module_name_prefix}.{i}")
    for name in section.other_module_name:
        attrs = (name,)
        if stack is not None and name in _HF_TOP:
            attrs = next((alt for alt in _HF_TOP[name] if all(
                getattr(teacher, a, None) is not None for a in alt)), _HF_TOP[name][0])
        for a in attrs:
            _copy(_attr(student, a, f"{key}.other_module_name"),
                  _attr(teacher, a, f"{key}.other_module_name"),
                  f"{key}.other_module_name {name!r}")


def _check_layers(layers: list[int], n_teacher: int, n_student: int, keep: int,
                  key: str) -> None:
    if any(not 0 <= t < n_teacher for t in layers):
        raise ValueError(f"{key}.teacher_layer {layers} names layers outside the teacher's "
                         f"{n_teacher} (0 to {n_teacher - 1})")
    if n_student != keep:
        raise ValueError(f"{key}.keep_number_layer is {keep} but the student has "
                         f"{n_student} layers; build the student with {keep}")


__all__ = ["STUDENT", "Distillation", "distillation_loss", "hidden_states",
           "student_initialization"]
