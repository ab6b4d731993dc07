"""LoRA on any NNX model: add adapters, quantize the frozen base (QLoRA), merge them back.

``apply(model, ...)`` changes ``model`` in place and returns it:

- a jds stacked decoder (a layers module with ``LINEARS``: ``Llama``, ``GPT2``) gets
  stacked adapters beside each targeted matrix (``jds.models.adapters``): one adapter per
  layer, all layers scanned together as before;
- any ``nnx.Linear`` elsewhere (a user's own model) is wrapped in ``LoRALinear``.

Adapters are ``nnx.LoRAParam``; once a model holds one, the engine's default ``trainable``
is ``nnx.LoRAParam``, so the base has no master weights, optimizer state or gradients. An
adapter carries the logical axes of the matrix it adapts (``A``: the input axes and an
unsplit rank; ``B``: the rank and the output axes), so under tensor parallelism it is split
as that matrix is, and under ZeRO-3 it is sharded and gathered per layer with it.

Targets (``target_modules``), as PEFT reads them: a list of names, each matching a module
whose path equals it or ends with ``.name`` (jds names such as ``wq`` or Hugging Face names
such as ``q_proj`` / ``self_attn.q_proj`` for the stacked decoders), or one string, a regex
that must match the whole path (``layers.wq``, or a Hugging Face path such as
``model.layers.3.self_attn.q_proj``; in a stacked decoder a regex must select a matrix in
every layer or in none, since the layers share one stack).

Initialisation (``init``): ``"default"`` is PEFT's (``A`` Kaiming-uniform with
``a = sqrt(5)``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); ``B`` zero), ``"gaussian"``
(``A ~ N(0, 1/r)``, ``B`` zero), ``"pissa"`` (PiSSA: ``A``, ``B`` from the top ``r``
singular vectors of ``W``, and the base becomes the residual ``W - scale * A @ B``, so the
model's output is unchanged at step 0).

QLoRA (``quantize_base``): every adaptable matrix of the base (not only the targets;
embeddings and the LM head stay) is stored quantized, and the adapters train in the compute
dtype over it. ``"int8"``: symmetric int8 with one fp32 scale per output channel
(``jds.kernels.quant.quantize``), multiplied with the W8A16 matmul: 1 byte per base parameter
plus the scales. ``"nf4"``: QLoRA's 4-bit NormalFloat with double-quantized block constants
(``jds.kernels.quant.nf4``), expanded per layer in the scan: about 0.52 bytes per parameter.
The NF4 codes are packed along the input dims, so tensor parallelism splits them only over
output dims (a row-parallel matrix's NF4 codes are replicated over ``tensor``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.kernels.quant import quantize
from jds.kernels.quant.nf4 import NF4Weight, check_nf4_shape, dequantize_nf4, quantize_nf4
from jds.models.adapters import (
    LORA_A,
    LORA_B,
    NF4_ABSMAX,
    NF4_MEAN,
    NF4_SCALE,
    QSCALE,
    AdapterDropout,
    LoRALinear,
    LoRASpec,
)
from jds.models.layers import QuantizedWeight, QuantScale

INITS = ("default", "gaussian", "pissa")
QUANTIZE_BASE = (None, "int8", "nf4")


def _stacked_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    return [(tuple(path), m) for path, m in nnx.iter_modules(model)
            if getattr(type(m), "LINEARS", None)]


def _matches(path: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _stacked_targets(layers: nnx.Module, targets: str | Sequence[str] | None) -> list[str]:
    cls = type(layers)
    if targets is None:
        return list(cls.LORA_DEFAULT_TARGETS)
    n_layers = int(next(iter(vars(layers)[n] for n in cls.LINEARS)).shape[0])
    chosen = []
    for name in cls.LINEARS:
        hf = cls.HF_NAMES[name]
        hits = [_matches(f"layers.{name}", targets)
                or _matches(f"{cls.HF_PREFIX}.{i}.{hf}", targets) for i in range(n_layers)]
        if any(hits) and not all(hits):
            raise ValueError(
                f"lora.target_modules={targets!r} selects {hf} in some layers only; jds's "
                f"{cls.__name__} stacks every layer's {name} into one array, so a target "
                "must select a matrix in every layer or in none")
        if all(hits):
            chosen.append(name)
    return chosen


def _init_ab(key: jax.Array, w: jax.Array, n_in: int, spec: LoRASpec, init: str
             ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(A [L, *in, r], B [L, r, *out], new base or None)`` for stacked matrices
    ``w [L, *in, *out]`` (every layer at once: one compiled computation, not one per layer)."""
    n_layers, in_dims, out_dims = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
    k, n = int(np.prod(in_dims)), int(np.prod(out_dims))
    r, dtype = spec.r, w.dtype
    if init == "pissa":
        w32 = w.astype(jnp.float32).reshape(n_layers, k, n)
        u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
        root = jnp.sqrt(s[:, :r] / spec.scale)  # [L, r]
        a = u[:, :, :r] * root[:, None, :]
        b = root[:, :, None] * vt[:, :r]
        residual = (w32 - spec.scale * a @ b).reshape(w.shape).astype(dtype)
        return (a.reshape(n_layers, *in_dims, r).astype(dtype),
                b.reshape(n_layers, r, *out_dims).astype(dtype), residual)
    if init == "gaussian":
        a = jax.random.normal(key, (n_layers, k, r), jnp.float32) / r
    else:  # PEFT's default: kaiming_uniform(a=sqrt(5)) on lora_A.weight [r, in]
        bound = 1.0 / math.sqrt(k)
        a = jax.random.uniform(key, (n_layers, k, r), jnp.float32, -bound, bound)
    return (a.reshape(n_layers, *in_dims, r).astype(dtype),
            jnp.zeros((n_layers, r, *out_dims), dtype), None)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _init_all(key: jax.Array, weights: tuple, n_ins: tuple, spec: LoRASpec, init: str
              ) -> tuple:
    return tuple(_init_ab(k, w, n, spec, init) for w, n, k in
                 zip(weights, n_ins, jax.random.split(key, len(weights)), strict=True))


def _axes(v: nnx.Variable, ndim: int) -> tuple:
    axes = v.get_metadata().get("axes")
    return tuple(axes) if axes is not None else (None,) * ndim


def _adapt_stacked(layers: nnx.Module, names: list[str], spec: LoRASpec, init: str,
                   key: jax.Array) -> None:
    linears = type(layers).LINEARS
    params = [getattr(layers, name) for name in names]
    for name, param in zip(names, params, strict=True):
        if not jnp.issubdtype(param[...].dtype, jnp.floating):
            raise ValueError(f"LoRA on {type(layers).__name__}.{name}: the base is "
                             f"{param[...].dtype}; apply LoRA before quantizing the base "
                             "(apply(..., quantize_base='int8') does both in that order)")
    if init == "pissa":
        for name, param in zip(names, params, strict=True):
            k, n = (int(np.prod(d)) for d in (param[...].shape[1:1 + linears[name]],
                                                param[...].shape[1 + linears[name]:]))
            if spec.r > min(k, n):
                raise ValueError(f"lora.init='pissa' needs r <= min(in, out) = {min(k, n)} "
                                 f"for {name}; got r={spec.r}")
    made = _init_all(key, tuple(p[...] for p in params), tuple(linears[n] for n in names),
                     spec, init)
    for name, param, (a, b, residual) in zip(names, params, made, strict=True):
        n_in = linears[name]
        ax = _axes(param, param[...].ndim)
        if residual is not None:  # a new variable: a copy's variables are the original's
            setattr(layers, name, nnx.Param(residual, axes=ax))
        setattr(layers, name + LORA_A, nnx.LoRAParam(a, axes=(*ax[:1 + n_in], None)))
        setattr(layers, name + LORA_B, nnx.LoRAParam(b, axes=(ax[0], None, *ax[1 + n_in:])))


@partial(jax.jit, static_argnums=(1, 2))
def _quantize_all(weights: tuple, n_ins: tuple, kind: str) -> tuple:
    out = []
    for w, n_in in zip(weights, n_ins, strict=True):
        if kind == "nf4":
            out.append(jax.vmap(lambda m, n=n_in: quantize_nf4(m, n))(w))
        else:
            k = int(np.prod(w.shape[1:1 + n_in]))
            q, s = jax.vmap(lambda m, k=k: quantize(m.reshape(k, -1), axis=0))(w)
            out.append((q.reshape(w.shape), s.reshape(w.shape[:1] + w.shape[1 + n_in:])))
    return tuple(out)


def _quantize_stacked(layers: nnx.Module, kind: str) -> None:
    names = [n for n in type(layers).LINEARS if getattr(layers, n, None) is not None
             and jnp.issubdtype(getattr(layers, n)[...].dtype, jnp.floating)]
    n_ins = tuple(type(layers).LINEARS[n] for n in names)
    if kind == "nf4":
        for name, n_in in zip(names, n_ins, strict=True):
            w = getattr(layers, name)[...]
            check_nf4_shape(int(np.prod(w.shape[1:1 + n_in])), f"{type(layers).__name__}.{name}")
    made = _quantize_all(tuple(getattr(layers, n)[...] for n in names), n_ins, kind)
    shapes = []
    for name, n_in, q in zip(names, n_ins, made, strict=True):
        param = getattr(layers, name)
        w = param[...]
        ax = _axes(param, w.ndim)
        out_ax = ax[1 + n_in:]
        if kind == "nf4":
            setattr(layers, name, nnx.Param(q.codes, axes=(ax[0], None, *out_ax)))
            setattr(layers, name + NF4_ABSMAX, QuantScale(q.absmax_q,
                                                          axes=(ax[0], None, *out_ax)))
            setattr(layers, name + NF4_SCALE, QuantScale(q.absmax_scale, axes=(ax[0], *out_ax)))
            setattr(layers, name + NF4_MEAN, QuantScale(q.absmax_mean, axes=(ax[0], *out_ax)))
            shapes.append((name, tuple(int(d) for d in w.shape[1:1 + n_in]), ax[1:1 + n_in]))
        else:
            setattr(layers, name, nnx.Param(q[0], axes=ax))
            setattr(layers, name + QSCALE, QuantScale(q[1], axes=(ax[0], *out_ax)))
    if shapes:
        layers.nf4_in_shapes = tuple(shapes)


def _set_child(model: nnx.Module, path: tuple, value: Any) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def _wrap_linear(lin: nnx.Linear, spec: LoRASpec, init: str, key: jax.Array, seed: int,
                 quantize_base: str | None) -> LoRALinear:
    w = lin.kernel[...]
    if init == "pissa" and spec.r > min(w.shape):
        raise ValueError(f"lora.init='pissa' needs r <= min(in, out) = {min(w.shape)}; "
                         f"got r={spec.r}")
    (a, b, residual), = _init_all(key, (w[None],), (1,), spec, init)
    a, b = a[0], b[0]
    ax = _axes(lin.kernel, 2)
    if residual is not None:  # a new variable: a copy's variables are the original's
        lin.kernel = nnx.Param(residual[0], axes=ax)
    wrapped = LoRALinear(lin, nnx.LoRAParam(a, axes=(ax[0], None)),
                         nnx.LoRAParam(b, axes=(None, ax[1])), spec, seed)
    if quantize_base == "int8":
        q, s = quantize(lin.kernel[...], axis=0)
        lin.kernel = nnx.Param(q, axes=ax)
        wrapped.kernel_scale = QuantScale(s.reshape(-1), axes=(ax[1],))
    elif quantize_base == "nf4":
        check_nf4_shape(int(lin.kernel[...].shape[0]), "nnx.Linear kernel")
        q = quantize_nf4(lin.kernel[...])
        lin.kernel = nnx.Param(q.codes, axes=(None, ax[1]))
        wrapped.kernel_nf4 = (QuantScale(q.absmax_q, axes=(None, ax[1])),
                              QuantScale(q.absmax_scale, axes=(ax[1],)),
                              QuantScale(q.absmax_mean, axes=(ax[1],)))
    return wrapped


def apply(model: nnx.Module, *, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
          target_modules: str | Sequence[str] | None = None, init: str = "default",
          use_rslora: bool = False, quantize_base: str | None = None, seed: int = 0
          ) -> nnx.Module:
    """Add LoRA adapters to ``model`` (in place) and return it.

    Args:
      model: any ``nnx.Module``: a jds ``Llama`` / ``GPT2``, or a model of ``nnx.Linear`` s.
      r: the rank. alpha: the scale's numerator (default ``r``: scale 1; PEFT's default is 8).
      dropout: dropout on each adapter's input in training (off in ``model.eval()``).
      target_modules: names or a regex (module docstring); None = the stacked decoder's
        default (Llama: ``q_proj, v_proj``; GPT-2: ``c_attn``), or every ``nnx.Linear``.
      init: ``"default"``, ``"gaussian"`` or ``"pissa"`` (module docstring).
      use_rslora: scale by ``alpha / sqrt(r)``.
      quantize_base: None, or QLoRA's frozen base: ``"int8"`` or ``"nf4"``.
      seed: the adapters' initialisation and dropout seed.

    Raises:
      ValueError: a bad value (named), a model that already has adapters, or targets that
        select no linear layer.
    """
    if init not in INITS:
        raise ValueError(f"lora.init must be one of {list(INITS)}; got {init!r}")
    if quantize_base not in QUANTIZE_BASE:
        raise ValueError(f"lora.quantize_base must be one of {list(QUANTIZE_BASE)}; "
                         f"got {quantize_base!r}")
    if any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model)):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; merge them "
                         "(jds.lora.merge) before applying new ones")
    spec = LoRASpec(r=int(r), alpha=float(r if alpha is None else alpha),
                    dropout=float(dropout), use_rslora=bool(use_rslora))
    key = jax.random.key(seed)
    found = 0
    stacked = _stacked_layers(model)
    for i, (_, layers) in enumerate(stacked):
        names = _stacked_targets(layers, target_modules)
        if not names:
            continue
        _adapt_stacked(layers, names, spec, init, jax.random.fold_in(key, i))
        layers.lora = spec
        if spec.dropout:
            layers.lora_dropout = AdapterDropout(spec.dropout, seed)
        if quantize_base is not None:
            _quantize_stacked(layers, quantize_base)
        found += len(names)
    inside = {p for p, _ in stacked}
    linears = [(tuple(p), m) for p, m in nnx.iter_modules(model)
               if isinstance(m, nnx.Linear) and not any(tuple(p)[:len(s)] == s for s in inside)]
    for j, (path, lin) in enumerate(linears):
        name = ".".join(str(x) for x in path)
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if not path:
            raise ValueError("jds.lora.apply adapts the linear layers inside a model; "
                             "wrap this nnx.Linear in a module first")
        _set_child(model, path, _wrap_linear(lin, spec, init,
                                             jax.random.fold_in(key, 1000 + j), seed + 1 + j,
                                             quantize_base))
        found += 1
    if not found:
        raise ValueError(
            f"lora.target_modules={target_modules!r} selects no linear layer of "
            f"{type(model).__name__}; name nnx.Linear submodules by path (e.g. 'fc1'), or for "
            "jds's models matrices such as 'q_proj' / 'wq'")
    return model


def adapter_targets(model: nnx.Module) -> list[str]:
    """The adapted matrices' paths (``layers.wq``, ``blocks.0.fc1``), in graph order."""
    out = []
    for path, m in nnx.iter_modules(model):
        prefix = ".".join(str(x) for x in path)
        if isinstance(m, LoRALinear):
            out.append(prefix)
        elif getattr(type(m), "LINEARS", None):
            out += [f"{prefix}.{n}".lstrip(".") for n in type(m).LINEARS
                    if hasattr(m, n + LORA_A)]
    return out


def _dequantized(q: jax.Array, scale: jax.Array, n_in: int, dtype: Any, *, stacked: bool
                 ) -> jax.Array:
    """``q * scale``: ``[L, *in, *out] x [L, *out]`` (stacked) or ``[*in, *out] x [*out]``."""
    s = jnp.asarray(scale, jnp.float32)
    if stacked:
        s = s.reshape(s.shape[:1] + (1,) * n_in + s.shape[1:])
    return (q.astype(jnp.float32) * s).astype(dtype)


def _merged_matrix(arrays: dict, n_in: int, in_shape: tuple | None, scale: float,
                   dtype: Any) -> jax.Array:
    """One stacked matrix ``[L, *in, *out]``: the base dequantized, plus ``scale * A @ B``."""
    w = arrays["w"]
    if "nf4" in arrays:
        w = jax.vmap(lambda c, q, s, u: dequantize_nf4(NF4Weight(c, q, s, u, in_shape)))(
            w, *arrays["nf4"])
    elif "qscale" in arrays:
        w = _dequantized(w, arrays["qscale"], n_in, jnp.float32, stacked=True)
    w = w.astype(jnp.float32)
    if "a" in arrays:
        a, b = (arrays[k].astype(jnp.float32) for k in "ab")
        w = w + scale * jnp.einsum("lkr,lrn->lkn", a.reshape(a.shape[0], -1, a.shape[-1]),
                                   b.reshape(b.shape[0], b.shape[1], -1)).reshape(w.shape)
    return w.astype(dtype)


@partial(jax.jit, static_argnums=(1,))
def _merge_all(arrays: tuple, static: tuple) -> tuple:
    return tuple(_merged_matrix(a, *st) for a, st in zip(arrays, static, strict=True))


def _merge_stacked(m: nnx.Module, dtype: Any) -> None:
    spec: LoRASpec | None = getattr(m, "lora", None)
    nf4 = {e[0]: e for e in getattr(m, "nf4_in_shapes", ())}
    names, arrays, static, drop = [], [], [], []
    for name, n_in in type(m).LINEARS.items():
        if not hasattr(m, name):
            continue
        entry: dict[str, Any] = {"w": getattr(m, name)[...]}
        if hasattr(m, name + NF4_ABSMAX):
            entry["nf4"] = tuple(getattr(m, name + x)[...] for x in (NF4_ABSMAX, NF4_SCALE,
                                                                     NF4_MEAN))
            drop += [name + x for x in (NF4_ABSMAX, NF4_SCALE, NF4_MEAN)]
        if hasattr(m, name + QSCALE):
            entry["qscale"] = getattr(m, name + QSCALE)[...]
            drop.append(name + QSCALE)
        if hasattr(m, name + LORA_A):
            entry["a"], entry["b"] = (getattr(m, name + x)[...] for x in (LORA_A, LORA_B))
            drop += [name + LORA_A, name + LORA_B]
        if len(entry) == 1:
            continue
        dt = dtype or (entry["a"].dtype if "a" in entry else jnp.float32)
        names.append(name)
        arrays.append(entry)
        static.append((n_in, nf4[name][1] if name in nf4 else None,
                       spec.scale if spec is not None else 1.0, jnp.dtype(dt)))
    merged = _merge_all(tuple(arrays), tuple(static))
    for name, w in zip(names, merged, strict=True):
        ax = _axes(getattr(m, name), getattr(m, name)[...].ndim)
        if name in nf4:  # codes [L, K/2, *out] -> [L, *in, *out]
            ax = (ax[0], *nf4[name][2], *ax[2:])
        setattr(m, name, nnx.Param(w, axes=ax))
    for attr in (*drop, "lora", "lora_dropout", "nf4_in_shapes"):
        if hasattr(m, attr):
            delattr(m, attr)


def merge(model: nnx.Module, *, dtype: Any = None) -> nnx.Module:
    """Fold every adapter into its base (``W + scale * A @ B``) and remove it, in place.

    A quantized base is dequantized first; the merged matrices take ``dtype`` (default: the
    adapters' dtype). The result is the plain model (``nnx.Linear`` s unwrapped), which
    ``jds.checkpoint.convert`` exports and the inference engine serves.
    """
    for path, m in list(nnx.iter_modules(model)):
        if isinstance(m, LoRALinear):
            base = m.base
            dt = dtype or m.lora_a[...].dtype
            w = m.base_weight()
            w = (dequantize_nf4(w) if isinstance(w, NF4Weight) else
                 _dequantized(w.q, w.scale, 1, jnp.float32, stacked=False)
                 if isinstance(w, QuantizedWeight) else w.astype(jnp.float32))
            delta = m.lora_a[...].astype(jnp.float32) @ m.lora_b[...].astype(jnp.float32)
            base.kernel = nnx.Param((w + m.lora.scale * delta).astype(dt),
                                    axes=_axes(base.kernel, 2))
            _set_child(model, tuple(path), base)
        elif getattr(type(m), "LINEARS", None):
            _merge_stacked(m, dtype)
    return model


_FLAG_KEYS = {"r": "r", "alpha": "alpha", "dropout": "dropout", "target": "target_modules",
              "target_modules": "target_modules", "init": "init", "rslora": "use_rslora",
              "quantize": "quantize_base", "quantize_base": "quantize_base"}


def parse_lora_flag(spec: str) -> dict[str, Any]:
    """``jds train --lora r=16,alpha=32,target=q_proj|v_proj`` as a ``lora`` config section.

    ``target`` takes module names joined by ``|`` (or ``re:<regex>`` for one regex over
    module paths); ``rslora`` is ``true``/``false``; ``quantize=int8`` is QLoRA.

    Raises:
      ValueError: an unknown key or a value that is not ``key=value``, naming the flag.
    """
    out: dict[str, Any] = {"enabled": True}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _FLAG_KEYS:
            raise ValueError(f"--lora {spec!r}: {item!r} is not key=value with a key in "
                             f"{sorted(_FLAG_KEYS)}")
        key, value = _FLAG_KEYS[key.strip()], value.strip()
        if key == "target_modules":
            out[key] = value[3:] if value.startswith("re:") else value.split("|")
        elif key == "use_rslora":
            out[key] = value.lower() in ("1", "true", "yes")
        elif key in ("r",):
            out[key] = int(value)
        elif key in ("alpha", "dropout"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


__all__ = ["INITS", "QUANTIZE_BASE", "adapter_targets", "apply", "merge", "parse_lora_flag"]
