"""Model presets (code, not YAML) and ``build(name, **overrides)``.

Tiny presets are byte-level (vocab 256) for CPU runs and tests. The real sizes are for
benchmarks and memory estimates; parameter counts (untied embeddings unless noted):

==============  ===============================================  ===========
preset          shapes                                           parameters
==============  ===============================================  ===========
llama-tiny      D=128, L=4, N=4, K=2, F=512, V=256               1.05M
gpt2-tiny       D=128, L=4, N=4, V=256, P=512                    0.89M
llama-125m      D=768, L=12, N=12, F=2048, V=32000               134M
llama-350m      D=1024, L=24, N=16, F=2816, V=32000              374M
llama-1b        TinyLlama-1.1B: D=2048, L=22, N=32, K=4, F=5632  1.10B
llama-3b        D=3072, L=28, N=24, K=8, F=8192, V=32000         3.01B
llama-7b        Llama-2-7B: D=4096, L=32, N=32, F=11008          6.74B
gpt2-small      D=768, L=12, N=12 (tied), V=50257                124M
gpt2-medium     D=1024, L=24, N=16                               355M
gpt2-large      D=1280, L=36, N=20                               774M
gpt2-xl         D=1600, L=48, N=25                               1.56B
==============  ===============================================  ===========

GPT-2's vocabulary (50257) is kept as released so Hugging Face weights load; for tensor
parallelism over the vocabulary pass ``vocab_size=50304`` (a multiple of 128) as override.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jds.models.gpt2 import GPT2, GPT2Config
from jds.models.llama import Llama, LlamaConfig, RopeScaling


def _llama(**kw: Any) -> LlamaConfig:
    base = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **kw})


def _gpt2(**kw: Any) -> GPT2Config:
    return GPT2Config(**{**dict(vocab_size=50257, n_positions=1024), **kw})


PRESETS: dict[str, LlamaConfig | GPT2Config] = {
    # Sized to train to a good byte-level loss on 2 CPU cores in minutes (seq 128, batch 32).
    "llama-tiny": _llama(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "gpt2-tiny": _gpt2(vocab_size=256, n_positions=512, n_embd=128, n_layer=4, n_head=4),
    "llama-125m": _llama(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "llama-350m": _llama(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
    "llama-1b": _llama(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "llama-3b": _llama(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
    "llama-7b": _llama(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "gpt2-small": _gpt2(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": _gpt2(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": _gpt2(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": _gpt2(n_embd=1600, n_layer=48, n_head=25),
}


_CLASSES: dict[str, tuple[type, type[nnx.Module]]] = {
    "llama": (LlamaConfig, Llama),
    "gpt2": (GPT2Config, GPT2),
}


def _kind(config: Any) -> str:
    for kind, (cls, _) in _CLASSES.items():
        if isinstance(config, cls):
            return kind
    raise TypeError(f"{type(config).__name__} is not a jds model config (one of "
                    f"{[c.__name__ for c, _ in _CLASSES.values()]}); build your own model "
                    "with its own class and pass the module to jds.initialize")


def is_known_config(config: Any) -> bool:
    """Whether ``config`` is one of jds's model configs (``LlamaConfig``, ``GPT2Config``)."""
    return any(isinstance(config, cls) for cls, _ in _CLASSES.values())


def model_class(config: LlamaConfig | GPT2Config) -> type[nnx.Module]:
    """The module class for a config.

    Raises:
      TypeError: not a jds model config.
    """
    return _CLASSES[_kind(config)][1]


def config_to_dict(config: LlamaConfig | GPT2Config) -> dict[str, Any]:
    """A JSON-able description of a model config (``config_from_dict`` reads it back).

    Raises:
      TypeError: not a jds model config (``jds.models.base.describe_model`` describes any).
    """
    return {"type": _kind(config), **dataclasses.asdict(config)}


def config_from_dict(d: dict[str, Any]) -> LlamaConfig | GPT2Config:
    """Inverse of ``config_to_dict``.

    Raises:
      ValueError: unknown ``type`` or unknown fields (named).
    """
    d = dict(d)
    kind = d.pop("type", None)
    if kind == "custom":
        raise ValueError(f"the checkpoint holds a user model ({d.get('class')}), not one of "
                         f"jds's {sorted(_CLASSES)}; build that model yourself and restore "
                         "the checkpoint with engine.load_checkpoint")
    if kind not in _CLASSES:
        raise ValueError(f"model config type {kind!r} is not one of {sorted(_CLASSES)}")
    cls = _CLASSES[kind][0]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
    if kind == "llama" and d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


def get_config(name: str, **overrides: Any) -> LlamaConfig | GPT2Config:
    """A preset's config with ``overrides`` replacing fields.

    Raises:
      ValueError: unknown preset or unknown field (both listed).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {type(config).__name__} field(s) {unknown} for preset {name!r}; "
            f"valid fields are {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)


def build(
    name: str, *, seed: int = 0, param_dtype: Any = jnp.float32, **overrides: Any
) -> nnx.Module:
    """Build a preset model with fresh random weights.

    Pure JAX on the seed's ``nnx.Rngs``, so ``nnx.eval_shape(lambda: build(...))`` and
    ``jax.jit(lambda: nnx.split(build(...))[1], out_shardings=...)`` both work.

    Args:
      name: a key of ``PRESETS``.
      seed: parameter initialisation seed.
      param_dtype: dtype the parameters are created in.
      **overrides: config fields to replace, e.g. ``num_hidden_layers=2``.

    Returns:
      A ``Llama`` or ``GPT2`` module.

    Raises:
      ValueError: unknown preset, unknown field, or an invalid resulting config.
    """
    config = get_config(name, **overrides)
    return model_class(config)(config, rngs=nnx.Rngs(seed), param_dtype=param_dtype)


__all__ = [
    "PRESETS",
    "build",
    "config_from_dict",
    "config_to_dict",
    "get_config",
    "is_known_config",
    "model_class",
]
