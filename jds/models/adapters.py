"""How adapters and quantized bases look inside a model, and how the layer scan uses them.

``jds.lora`` changes a model (adds LoRA adapters, quantizes a frozen base); this module is
the part the models themselves run, so that it depends on nothing but ``layers``:

- On a stacked decoder's layers module (``LlamaLayers``, ``GPT2Layers``), an adapted matrix
  ``wq [L, *in, *out]`` gains ``wq_lora_a [L, *in, r]`` and ``wq_lora_b [L, r, *out]``
  (``nnx.LoRAParam``: their own variable type, so ``trainable`` can select them), the
  module gains a static ``lora`` (``LoRASpec``) and, with dropout, ``lora_dropout``
  (``AdapterDropout``: its PRNG stream and the train/eval switch). A quantized base (QLoRA)
  is ``wq`` as int8 plus ``wq_qscale [L, *out]`` (``QuantScale``, fp32), or ``wq`` as
  packed NF4 codes ``[L, K/2, *out]`` plus ``wq_nf4_absmax`` / ``_nf4_scale`` / ``_nf4_mean``
  (``jds.kernels.quant.nf4``; the input dims in the static ``nf4_in_shapes``).
- ``prepare_layers`` adds the per-layer dropout keys to the scanned weights and returns the
  ``bind`` that ``scan_layers`` applies to each layer's gathered weights: adapted or
  quantized matrices become ``LoRAWeight`` / ``QuantizedWeight``, which ``dense`` multiplies
  in one path (the base matrix is gathered once, the adapter product added to its output).
- A user's ``nnx.Linear`` is wrapped by ``LoRALinear`` instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.kernels.quant.nf4 import NF4Weight
from jds.models.layers import LoRAWeight, QuantizedWeight, QuantScale, dense

LORA_A, LORA_B, QSCALE = "_lora_a", "_lora_b", "_qscale"
NF4_ABSMAX, NF4_SCALE, NF4_MEAN = "_nf4_absmax", "_nf4_scale", "_nf4_mean"
LAYER_KEY = "_lora_key"  # per-layer dropout keys, scanned beside the weights


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """A LoRA adapter's hyper-parameters (static: part of the model's graph).

    Attributes:
      r: the rank. alpha: the scaling numerator (PEFT's ``lora_alpha``).
      dropout: dropout on the adapter's input in training.
      use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if int(self.r) <= 0:
            raise ValueError(f"lora.r must be a positive rank; got {self.r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout must lie in [0, 1); got {self.dropout}")

    @property
    def scale(self) -> float:
        """The adapter's output scale."""
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else float(self.r))


class AdapterDropout(nnx.Module):
    """The adapters' dropout: a rate, a PRNG stream, and ``deterministic`` (set by
    ``model.eval()`` / ``model.train()``, as ``nnx.Dropout``)."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = float(rate)
        self.deterministic = False
        self.rngs = nnx.Rngs(lora_dropout=seed)

    def key(self) -> jax.Array | None:
        """A fresh key in training with a rate above 0; None otherwise (no dropout)."""
        if self.deterministic or self.rate == 0.0:
            return None
        return self.rngs.lora_dropout()


def _names(layers: nnx.Module) -> dict[str, int]:
    return dict(getattr(type(layers), "LINEARS", {}))


def prepare_layers(layers: nnx.Module, params_L: dict[str, jax.Array]
                   ) -> tuple[dict[str, jax.Array], Callable[[dict], dict] | None]:
    """``(params_L, bind)`` for ``scan_layers``: per-layer dropout keys added to the scanned
    weights, and the function that turns one layer's adapted or int8 matrices into
    ``LoRAWeight`` / ``QuantizedWeight`` (None for a plain model: nothing to bind)."""
    linears = _names(layers)
    spec: LoRASpec | None = getattr(layers, "lora", None)
    quantized = [n for n in linears if n + QSCALE in params_L]
    nf4 = {e[0]: e[1] for e in getattr(layers, "nf4_in_shapes", ())}
    four_bit = [n for n in linears if n + NF4_ABSMAX in params_L]
    adapted = [n for n in linears if n + LORA_A in params_L]
    if getattr(layers, "act_quant", None):  # activation quantization (jds.compression)
        from jds.compression.activation import bind_layer, layer_flags

        params_L, inner = prepare_layers_plain(layers, params_L, linears, spec, quantized,
                                               nf4, four_bit, adapted)
        return layer_flags(layers, params_L), lambda p: bind_layer(
            layers, inner(p) if inner is not None else p)
    return prepare_layers_plain(layers, params_L, linears, spec, quantized, nf4, four_bit,
                                adapted)


def prepare_layers_plain(layers: nnx.Module, params_L: dict[str, jax.Array],
                         linears: dict[str, int], spec: LoRASpec | None, quantized: list,
                         nf4: dict, four_bit: list, adapted: list
                         ) -> tuple[dict[str, jax.Array], Callable[[dict], dict] | None]:
    """``prepare_layers`` for adapters and quantized bases."""
    if not quantized and not adapted and not four_bit:
        return params_L, None
    drop = getattr(layers, "lora_dropout", None)
    key = drop.key() if isinstance(drop, AdapterDropout) else None
    if key is not None:
        n_layers = int(params_L[adapted[0] + LORA_A].shape[0])
        params_L = {**params_L, LAYER_KEY: jax.random.split(key, n_layers)}
    axes = {k: tuple(v.get_metadata()["axes"])[1:] for k, v in vars(layers).items()
            if k in linears and isinstance(v, nnx.Param)}
    scale = spec.scale if spec is not None else 1.0
    rate = spec.dropout if spec is not None else 0.0

    def bind(p: dict) -> dict:
        p = dict(p)
        layer_key = p.pop(LAYER_KEY, None)
        keys = (None,) * len(adapted) if layer_key is None else tuple(
            jax.random.split(layer_key, len(adapted)))
        for name in quantized:
            p[name] = QuantizedWeight(q=p[name], scale=p.pop(name + QSCALE),
                                      n_in=linears[name], axes=axes[name])
        for name in four_bit:
            p[name] = NF4Weight(codes=p[name], absmax_q=p.pop(name + NF4_ABSMAX),
                                absmax_scale=p.pop(name + NF4_SCALE),
                                absmax_mean=p.pop(name + NF4_MEAN), in_shape=nf4[name])
        for name, k in zip(adapted, keys, strict=True):
            p[name] = LoRAWeight(p[name], p.pop(name + LORA_A), p.pop(name + LORA_B), k,
                                 scale=scale, rate=rate)
        return p

    return params_L, bind


class LoRALinear(nnx.Module):
    """An ``nnx.Linear`` with a LoRA adapter: ``base(x) + dropout(x) @ A @ B * scale``.

    The wrapped linear is ``base`` (its kernel frozen: an ``nnx.Param`` the default
    ``trainable`` leaves out once adapters exist); ``lora_a [in, r]`` and ``lora_b [r, out]``
    are ``nnx.LoRAParam``. With a quantized base (QLoRA) ``base.kernel`` is int8 and
    ``kernel_scale`` holds its fp32 per-output-channel scales.
    """

    def __init__(self, base: nnx.Linear, a: nnx.LoRAParam, b: nnx.LoRAParam, spec: LoRASpec,
                 seed: int) -> None:
        self.base = base
        self.lora_a = a
        self.lora_b = b
        self.lora = spec
        self.lora_dropout = AdapterDropout(spec.dropout, seed) if spec.dropout else None
        self.kernel_scale: QuantScale | None = None  # int8 base: per output channel
        self.kernel_nf4: tuple[QuantScale, QuantScale, QuantScale] | None = None  # NF4 base

    def base_weight(self) -> jax.Array | QuantizedWeight | NF4Weight:
        """The base kernel as ``dense`` takes it (int8 / NF4 wrapped with their scales)."""
        w = self.base.kernel[...]
        if self.kernel_scale is not None:
            return QuantizedWeight(q=w, scale=self.kernel_scale[...], n_in=1)
        if self.kernel_nf4 is not None:
            absmax, scale, mean = (v[...] for v in self.kernel_nf4)
            return NF4Weight(codes=w, absmax_q=absmax, absmax_scale=scale, absmax_mean=mean,
                             in_shape=(2 * int(w.shape[0]),))
        return w

    def __call__(self, x: jax.Array) -> jax.Array:
        base = self.base
        w = self.base_weight()
        key = self.lora_dropout.key() if self.lora_dropout is not None else None
        dtype = base.dtype or jnp.result_type(x, self.lora_a[...])
        x = x.astype(dtype)
        y = dense("...i,io->...o", x, LoRAWeight(w if isinstance(w, (QuantizedWeight, NF4Weight))
                                                  else w.astype(dtype),
                                                  self.lora_a[...], self.lora_b[...], key,
                                                  scale=self.lora.scale,
                                                  rate=self.lora.dropout))
        if base.bias is not None:
            y = y + base.bias[...].astype(y.dtype)
        return y


def frozen_param_count(frozen: Any, model_state: Any) -> int:
    """How many parameters a frozen tree stands for: an NF4 matrix's packed codes (beside
    their ``_nf4_absmax`` in the model state) hold two parameters per element."""
    total = 0

    def walk(node: Any, state: Any) -> None:
        nonlocal total
        for k, v in node.items():
            sub = state.get(k, {}) if isinstance(state, dict) else {}
            if isinstance(v, dict):
                walk(v, sub)
            else:
                packed = isinstance(state, dict) and k + NF4_ABSMAX in state
                total += int(np.prod(v.shape)) * (2 if packed else 1)

    walk(frozen, model_state)
    return total


def is_adapted(model: nnx.Module) -> bool:
    """Whether ``model`` holds any LoRA adapter (``nnx.LoRAParam``)."""
    return any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))


__all__ = ["AdapterDropout", "LAYER_KEY", "LORA_A", "LORA_B", "LoRALinear", "LoRASpec",
           "NF4_ABSMAX", "NF4_MEAN", "NF4_SCALE", "QSCALE", "frozen_param_count", "is_adapted",
           "prepare_layers"]

