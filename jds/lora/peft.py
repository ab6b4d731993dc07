"""Hugging Face PEFT adapter folders in and out.

A PEFT LoRA folder is ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors`` with, per adapted module,
``base_model.model.<module path>.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``
(torch ``nn.Linear`` layout, no adapter name). ``peft.PeftModel.from_pretrained(model,
folder)`` loads it onto the ``transformers`` model.

jds's Llama maps its stacked ``wq_lora_a [L, D, r]`` to ``model.layers.{i}.self_attn.q_proj``
(``A[i].reshape(D, r).T``; ``B[i].reshape(r, N*H).T``: the head split undone as
``jds.models.hf`` does for the weights). A user's model maps ``LoRALinear`` at path ``p``
to ``base_model.model.p`` (``nnx.Linear`` kernels are ``[in, out]``, so ``A.T`` / ``B.T``).
GPT-2's q, k and v are one ``c_attn`` matrix in Hugging Face, and jds adapts them
separately: such adapters are refused here (export the merged model instead:
``jds convert orbax-to-hf --merge-lora``); GPT-2's other matrices export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.lora.core import apply
from jds.models.adapters import LORA_A, LORA_B, LoRALinear, LoRASpec

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _safetensors() -> Any:
    try:
        import safetensors.numpy as st
    except ImportError:
        raise ImportError("PEFT adapter files are safetensors: pip install 'jds[convert]' "
                          "(or safetensors)") from None
    return st


def _entries(model: nnx.Module
             ) -> tuple[LoRASpec, dict[str, tuple[Any, Any, Any]], list[str], bool]:
    """``(spec, {PEFT module path: (A, B, layer index or None)}, target names,
    fan_in_fan_out)``."""
    spec = None
    fan_in_fan_out = False
    out: dict[str, tuple] = {}
    targets: list[str] = []
    for path, m in nnx.iter_modules(model):
        prefix = ".".join(str(x) for x in path)
        if isinstance(m, LoRALinear):
            spec = m.lora
            out[prefix] = (m.lora_a, m.lora_b, None)
            targets.append(prefix)
        elif getattr(type(m), "LINEARS", None) and getattr(m, "lora", None) is not None:
            spec = m.lora
            cls = type(m)
            fan_in_fan_out = fan_in_fan_out or bool(getattr(cls, "HF_FAN_IN_FAN_OUT", False))
            for name in cls.LINEARS:
                if not hasattr(m, name + LORA_A):
                    continue
                hf = cls.HF_NAMES[name]
                if hf == "attn.c_attn":
                    raise ValueError(
                        f"{cls.__name__}.{name} has an adapter, but Hugging Face's GPT-2 fuses "
                        "q, k and v into one c_attn matrix that PEFT adapts as one; export "
                        "the merged model (jds convert orbax-to-hf --merge-lora) or adapt "
                        "c_proj / c_fc only")
                root = cls.HF_PREFIX
                n_layers = int(getattr(m, name + LORA_A)[...].shape[0])
                for i in range(n_layers):
                    out[f"{root}.{i}.{hf}"] = (getattr(m, name + LORA_A),
                                               getattr(m, name + LORA_B), i)
                targets.append(hf.split(".")[-1])
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save "
                         "(jds.lora.apply adds them)")
    return spec, out, sorted(set(targets)), fan_in_fan_out


def _hf_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = a.shape[-1]
    return a.reshape(-1, r).T, b.reshape(r, -1).T


def save_peft(model: nnx.Module, path: str | os.PathLike, *,
              base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT LoRA folder (created; files replaced atomically).

    Raises:
      ValueError: no adapters, or adapters PEFT cannot express (GPT-2's q/k/v).
    """
    st = _safetensors()
    spec, entries, targets, fan_in_fan_out = _entries(model)
    tensors: dict[str, np.ndarray] = {}
    for module, (a_var, b_var, i) in entries.items():
        a, b = np.asarray(a_var[...], np.float32), np.asarray(b_var[...], np.float32)
        if i is not None:
            a, b = a[i], b[i]
        a_hf, b_hf = _hf_pair(a, b)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_hf)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_hf)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora, "bias": "none",
        "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    st.save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
    return out


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json``, checked for what jds can load.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` in ``path``.
      ValueError: not a LoRA adapter, or options jds does not load (named).
    """
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: a PEFT adapter folder holds {CONFIG_FILE} "
                                f"and {WEIGHTS_FILE}")
    cfg = json.loads(f.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f}: peft_type {cfg.get('peft_type')!r}; jds loads LoRA adapters")
    for key, off in (("bias", "none"), ("modules_to_save", None), ("rank_pattern", {}),
                     ("alpha_pattern", {}), ("layers_to_transform", None), ("use_dora", False)):
        if cfg.get(key, off) not in (off, None, {}, [], "none", False):
            raise ValueError(f"{f}: {key}={cfg[key]!r} is not loaded by jds (it loads plain "
                             f"LoRA adapters: {key} must be {off!r})")
    return cfg


def load_peft(model: nnx.Module, path: str | os.PathLike, *, seed: int = 0) -> nnx.Module:
    """Add the PEFT adapter folder ``path`` to ``model`` (in place; returns it).

    Raises:
      ValueError: the folder's modules do not match the model (the missing or extra tensor
        named), or options jds does not load.
    """
    st = _safetensors()
    cfg = read_peft_config(path)
    targets = cfg.get("target_modules")
    apply(model, r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
          dropout=float(cfg.get("lora_dropout", 0.0) or 0.0), target_modules=targets,
          use_rslora=bool(cfg.get("use_rslora", False)), seed=seed)
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found (PEFT's .bin adapters are pickles: jds reads "
                                "safetensors only; re-save with safe_serialization=True)")
    tensors = st.load_file(str(f))
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.",
                                                                  ".lora_B."): v
               for k, v in tensors.items()}
    _, entries, _, _ = _entries(model)
    used = set()
    stacked: dict[int, tuple[Any, Any, list, list]] = {}
    for module, (a_var, b_var, i) in entries.items():
        names = (f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{f} has no {missing[0]}: the adapter does not match this "
                             f"{type(model).__name__} (targets {targets!r})")
        a_hf, b_hf = tensors[names[0]], tensors[names[1]]
        used.update(names)
        shape_a = a_var[...].shape[1:] if i is not None else a_var[...].shape
        shape_b = b_var[...].shape[1:] if i is not None else b_var[...].shape
        if a_hf.T.size != int(np.prod(shape_a)) or b_hf.T.size != int(np.prod(shape_b)):
            raise ValueError(f"{f}: {names[0]} {a_hf.shape} / {names[1]} {b_hf.shape} do not "
                             f"fit {module} (A {shape_a}, B {shape_b})")
        a, b = a_hf.T.reshape(shape_a), b_hf.T.reshape(shape_b)
        if i is None:
            a_var[...] = jnp.asarray(a, a_var[...].dtype)
            b_var[...] = jnp.asarray(b, b_var[...].dtype)
        else:
            slot = stacked.setdefault(id(a_var), (a_var, b_var, [], []))
            slot[2].append((i, a))
            slot[3].append((i, b))
    for a_var, b_var, a_list, b_list in stacked.values():
        a_var[...] = jnp.asarray(np.stack([x for _, x in sorted(a_list, key=lambda t: t[0])]),
                                 a_var[...].dtype)
        b_var[...] = jnp.asarray(np.stack([x for _, x in sorted(b_list, key=lambda t: t[0])]),
                                 b_var[...].dtype)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{f} holds {len(extra)} tensors this model has no place for, e.g. "
                         f"{extra[0]}")
    return model


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_peft", "read_peft_config", "save_peft"]
