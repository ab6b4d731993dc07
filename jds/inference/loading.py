"""Loading a model to serve: a module, a preset, a Hugging Face folder, or a jds training
run (its newest intact checkpoint step, LoRA adapters merged), and what it says about
itself (its dtype, the compression it was trained with)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.config import ConfigError

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16", "int8": "int8",
           "auto": "auto"}


def _checkpoint_root(path: str | os.PathLike) -> str | None:
    """The jds checkpoint under ``path`` (a run folder, a checkpoint root or a step), or None."""
    p = os.fspath(path)
    if os.path.isdir(os.path.join(p, "checkpoints")):
        p = os.path.join(p, "checkpoints")
    if os.path.isdir(os.path.join(p, "state")):
        return p
    if os.path.isdir(p) and any(n.isdigit() and os.path.isdir(os.path.join(p, n, "state"))
                                for n in os.listdir(p)):
        return p
    return None


def _trained_compression(model: nnx.Module | str | os.PathLike) -> dict[str, Any] | None:
    """The ``compression_training`` section a jds run folder's checkpoint was trained with."""
    if isinstance(model, nnx.Module) or (root := _checkpoint_root(model)) is None:
        return None
    from jds.checkpoint.convert.orbax_reader import OrbaxCheckpoint

    section = (OrbaxCheckpoint(root).meta.get("config") or {}).get("compression_training")
    enabled = ((section or {}).get("weight_quantization", {}).get("shared_parameters", {})
               .get("enabled", False))
    return section if enabled else None


def _from_checkpoint(path: str) -> nnx.Module:
    """The model of a jds training checkpoint (its newest intact step), fp32 weights."""
    from jds.checkpoint.convert.orbax_reader import OrbaxCheckpoint
    from jds.models.registry import model_class

    ckpt = OrbaxCheckpoint(path)
    cfg = ckpt.model_config()
    pruned, inputs = _compression_of(
        ckpt, nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))

    def build() -> nnx.Module:
        m = model_class(cfg)(cfg, rngs=nnx.Rngs(0))
        if pruned is not None:  # its masks and scores are in the checkpoint too
            pruned.attach(m)
        if inputs is not None:  # activation quantization: static ranges too
            inputs.attach(m)
        return m

    graphdef, state = nnx.split(nnx.eval_shape(build))
    read = ckpt.reader(merge_lora=True)  # a LoRA run is served with its adapters merged
    pure = nnx.to_pure_dict(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    loaded = []
    for keypath, leaf in flat:
        names = tuple(str(getattr(k, "key", k)) for k in keypath)
        value = np.asarray(read(names, None)).astype(np.float32)
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{ckpt.dir}: {'/'.join(names)} has shape {value.shape}, the "
                             f"model config says {tuple(leaf.shape)}")
        loaded.append(value)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, loaded))
    model = nnx.merge(graphdef, state)
    if pruned is not None:  # served as pruned: the masks' zeros, or the smaller model
        from jds.compression.pruning import clean

        model = clean(model, pruned)
    return model


def _compression_of(ckpt: Any, abstract: nnx.Module) -> tuple[Any, Any]:
    """The pruning and activation quantization plans a checkpoint's run trained with (each
    None when off): the model is served as it was trained, pruned and quantizing its layers'
    inputs (``jds.compression.activation.serving_bind``)."""
    from jds.compression import activation
    from jds.compression.pruning import plan
    from jds.config.compression import CompressionConfig

    section = (ckpt.meta.get("config") or {}).get("compression_training")
    if not section:
        return None, None
    cc = CompressionConfig.model_validate(section)
    return plan(abstract, cc) if cc.prunes else None, activation.plan(abstract, cc)


def source_dtype(model: nnx.Module | str | os.PathLike) -> str:
    """``dtype="auto"``: the dtype the model's weights come in.

    A Hugging Face folder: its ``config.json``'s ``torch_dtype`` (or ``dtype``; float32 when
    absent, as ``transformers`` reads it); a jds run: the compute dtype it trained in (its
    config's ``bf16`` / ``fp16``); a module: its parameters' floating dtype; a preset:
    float32.
    """
    if isinstance(model, nnx.Module):
        kinds = {str(v[...].dtype) for _, v in nnx.iter_graph(model)
                 if isinstance(v, nnx.Param) and jnp.issubdtype(v[...].dtype, jnp.floating)}
        return next((k for k in ("float32", "bfloat16", "float16") if k in kinds), "float32")
    if (root := _checkpoint_root(model)) is not None:
        from jds.checkpoint.convert.orbax_reader import OrbaxCheckpoint

        cfg = OrbaxCheckpoint(root).meta.get("config") or {}
        for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
            if (cfg.get(key) or {}).get("enabled"):
                return name
        return "float32"
    config = os.path.join(os.fspath(model), "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            raw = json.load(f)
        name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        return _DTYPES.get(name.removeprefix("torch.").lower(), "float32")
    return "float32"


def load_model(model: nnx.Module | str | os.PathLike, *, adapter: str | os.PathLike | None = None
               ) -> nnx.Module:
    """The model ``init_inference`` serves: a module, preset, Hugging Face folder or jds run,
    plus an optional PEFT LoRA ``adapter`` folder; adapters (and a QLoRA int8 base) are
    merged into the weights (``jds.lora.merge``) on a copy, so serving costs nothing extra.
    """
    from jds import lora
    from jds.models.layers import QuantScale

    module = _load_model(model)
    if adapter is not None:
        module = lora.load_peft(nnx.merge(*nnx.split(module)), adapter)
    if any(isinstance(v, (nnx.LoRAParam, QuantScale)) for _, v in nnx.iter_graph(module)):
        module = lora.merge(nnx.merge(*nnx.split(module)))
    return module


def _load_model(model: nnx.Module | str | os.PathLike) -> nnx.Module:
    if isinstance(model, nnx.Module):
        return model
    from jds import models

    if isinstance(model, str) and model in models.PRESETS:
        return models.build(model)
    if (root := _checkpoint_root(model)) is not None:
        return _from_checkpoint(root)
    if os.path.isdir(model):
        return models.from_pretrained(model)
    raise ValueError(f"model {model!r}: give an nnx.Module, a preset name "
                     f"({', '.join(sorted(models.PRESETS))}), a Hugging Face directory or a "
                     "jds run / checkpoint directory")


def with_input_quantization(model: nnx.Module, section: dict[str, Any] | None
                            ) -> nnx.Module:
    """``model``, or a copy that quantizes its layers' inputs as ``section``'s
    ``activation_quantization`` says (a model given with the section; a trained model or a
    run folder already carries them).

    Raises:
      ConfigError: the section does not fit the model, or asks for static ranges (they come
        from training or ``post_training_quantize``'s calibration: serve that model).
    """
    if not section or getattr(getattr(model, "layers", None), "act_quant", None):
        return model
    from jds.compression import activation
    from jds.config.compression import CompressionConfig

    try:
        plan = activation.plan(model, CompressionConfig.model_validate(section))
    except ValueError as e:
        raise ConfigError(f"compression_training: {e}") from None
    if plan is None:
        return model
    if any(spec.static for _, spec, _ in plan.items):
        raise ConfigError("compression_training.activation_quantization uses static ranges, "
                          "which training or post_training_quantize's calibration set: serve "
                          "that model (engine.model, its run folder, or the calibrated copy)")
    model = nnx.clone(model)
    plan.attach(model)
    return model
