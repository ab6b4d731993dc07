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
GPT-2's q, k and v are one ``c_attn`` matrix in Hugging Face (a ``Conv1D``, stored
``[in, out]``: ``fan_in_fan_out``), and jds adapts them separately: ``save_peft`` writes
them as one ``c_attn`` adapter of rank ``3 r`` (``B`` block-diagonal, zero blocks for an
unadapted one, the scale kept by ``rank_pattern`` / ``alpha_pattern``), exact;
``load_peft`` reads such a file back block by block, and one trained by PEFT (one ``A``
shared by q, k and v) into three adapters that share that ``A``'s values (the same
product; trained further, jds updates them apart).
"""

from __future__ import annotations

import dataclasses
import json
import math
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


@dataclasses.dataclass
class _Module:
    """One PEFT module: a jds adapter, or GPT-2's q, k and v adapters as one ``c_attn``.

    ``parts``: ``(A, B)`` variables per jds adapter; ``slots``: each part's block of the
    fused output (``[q | k | v]``); ``layer``: the index into stacked adapters, or None.
    """

    path: str
    parts: list[tuple[nnx.Variable, nnx.Variable]]
    slots: list[int]
    n_slots: int
    layer: int | None

    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for a_var, b_var in self.parts:
            a, b = np.asarray(a_var[...], np.float32), np.asarray(b_var[...], np.float32)
            out.append((a, b) if self.layer is None else (a[self.layer], b[self.layer]))
        return out

    def to_hf(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lora_A.weight [R, in], lora_B.weight [out, R])``; a fused module's rank is
        ``n_slots x r`` (B block-diagonal), so the product is exact."""
        pairs = [_hf_pair(a, b) for a, b in self.arrays()]
        if self.n_slots == 1:
            return pairs[0]
        # every slot gets a block (zeros where jds has no adapter), so the file reads back
        # into the q, k and v adapters that a "c_attn" target makes
        (r, k), d = pairs[0][0].shape, pairs[0][1].shape[0]
        a_hf = np.zeros((self.n_slots * r, k), np.float32)
        b_hf = np.zeros((self.n_slots * d, self.n_slots * r), np.float32)
        for (a, b), slot in zip(pairs, self.slots, strict=True):
            a_hf[slot * r:(slot + 1) * r] = a
            b_hf[slot * d:(slot + 1) * d, slot * r:(slot + 1) * r] = b
        return a_hf, b_hf

    def from_hf(self, a_hf: np.ndarray, b_hf: np.ndarray, where: str
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The parts' ``(A, B)`` (one layer's) from PEFT's tensors.

        A fused module of PEFT's own rank ``r`` shares its A between q, k and v: each part
        gets that A and its rows of B (exact). One of rank ``n_slots x r`` (as ``save_peft``
        writes) must be block-diagonal, each part reading its block.
        """
        shapes = [(a.shape, b.shape) for a, b in self.arrays()]
        r = shapes[0][0][-1]
        if self.n_slots == 1:
            (sa, sb), = shapes
            if a_hf.size != int(np.prod(sa)) or b_hf.size != int(np.prod(sb)):
                raise ValueError(f"{where}: lora_A {a_hf.shape} / lora_B {b_hf.shape} do not "
                                 f"fit {self.path} (A {sa}, B {sb})")
            return [(a_hf.T.reshape(sa), b_hf.T.reshape(sb))]
        d = b_hf.shape[0] // self.n_slots
        rank = a_hf.shape[0]
        if rank not in (r, r * self.n_slots) or b_hf.shape[1] != rank:
            raise ValueError(f"{where}: {self.path} has rank {rank}; this model's q/k/v "
                             f"adapters take rank {r} (shared A) or {r * self.n_slots} "
                             "(block-diagonal)")
        out, used = [], np.zeros(b_hf.shape, bool)
        for (sa, sb), slot in zip(shapes, self.slots, strict=True):
            cols = slice(0, r) if rank == r else slice(slot * r, (slot + 1) * r)
            rows = slice(slot * d, (slot + 1) * d)
            used[rows, cols] = True
            out.append((a_hf[cols].T.reshape(sa), b_hf[rows, cols].T.reshape(sb)))
        if rank != r and np.any(b_hf[~used]):
            raise ValueError(f"{where}: {self.path}'s lora_B is not block-diagonal over "
                             "q, k and v, so it has no form as separate q/k/v adapters")
        return out


def _modules(model: nnx.Module) -> tuple[LoRASpec, list[_Module], list[str], bool]:
    """``(spec, PEFT modules, target names, fan_in_fan_out)`` of ``model``'s adapters."""
    spec = None
    fan_in_fan_out = False
    out: list[_Module] = []
    targets: list[str] = []
    for path, m in nnx.iter_modules(model):
        prefix = ".".join(str(x) for x in path)
        if isinstance(m, LoRALinear):
            spec = m.lora
            out.append(_Module(prefix, [(m.lora_a, m.lora_b)], [0], 1, None))
            targets.append(prefix)
        elif getattr(type(m), "LINEARS", None) and getattr(m, "lora", None) is not None:
            spec = m.lora
            cls = type(m)
            fan_in_fan_out = fan_in_fan_out or bool(getattr(cls, "HF_FAN_IN_FAN_OUT", False))
            groups: dict[str, list[str]] = {}
            for name in cls.LINEARS:
                if hasattr(m, name + LORA_A):
                    groups.setdefault(cls.HF_NAMES[name], []).append(name)
            for hf, names in groups.items():
                fused = [n for n, h in cls.HF_NAMES.items() if h == hf]
                parts = [(getattr(m, n + LORA_A), getattr(m, n + LORA_B)) for n in names]
                slots = [fused.index(n) for n in names]
                for i in range(int(parts[0][0][...].shape[0])):
                    out.append(_Module(f"{cls.HF_PREFIX}.{i}.{hf}", parts, slots, len(fused), i))
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

    GPT-2's q/k/v adapters become one ``c_attn`` adapter of rank ``3 r`` (B
    block-diagonal), with ``rank_pattern`` / ``alpha_pattern`` keeping the scale.

    Raises:
      ValueError: the model has no adapters.
    """
    st = _safetensors()
    spec, modules, targets, fan_in_fan_out = _modules(model)
    tensors: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for mod in modules:
        a_hf, b_hf = mod.to_hf()
        tensors[f"{PREFIX}{mod.path}.lora_A.weight"] = np.ascontiguousarray(a_hf)
        tensors[f"{PREFIX}{mod.path}.lora_B.weight"] = np.ascontiguousarray(b_hf)
        if mod.n_slots > 1:
            key, k = mod.path.split(".")[-1], mod.n_slots
            rank_pattern[key] = spec.r * k
            alpha_pattern[key] = spec.alpha * (math.sqrt(k) if spec.use_rslora else k)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora, "bias": "none",
        "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    st.save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
    return out


def _scale(r: float, alpha: float, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json``, checked for what jds can load.

    ``rank_pattern`` / ``alpha_pattern`` are accepted where they keep every module's scale
    at ``lora_alpha / r`` (as ``save_peft`` writes for GPT-2's fused ``c_attn``): jds gives
    all of a model's adapters one scale.

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
    for key, off in (("bias", "none"), ("modules_to_save", None),
                     ("layers_to_transform", None), ("use_dora", False)):
        if cfg.get(key, off) not in (off, None, {}, [], "none", False):
            raise ValueError(f"{f}: {key}={cfg[key]!r} is not loaded by jds (it loads plain "
                             f"LoRA adapters: {key} must be {off!r})")
    r, alpha = float(cfg["r"]), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for key in set(ranks) | set(alphas):
        got = _scale(float(ranks.get(key, r)), float(alphas.get(key, alpha)), rslora)
        if not math.isclose(got, _scale(r, alpha, rslora), rel_tol=1e-6):
            raise ValueError(f"{f}: rank_pattern / alpha_pattern give {key!r} the scale {got:g} "
                             f"and the other modules {_scale(r, alpha, rslora):g}; jds gives "
                             "one model's adapters one scale")
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
    _, modules, _, _ = _modules(model)
    used = set()
    values: dict[int, tuple[nnx.Variable, np.ndarray]] = {}  # every adapter, filled here
    for mod in modules:
        names = (f"{PREFIX}{mod.path}.lora_A.weight", f"{PREFIX}{mod.path}.lora_B.weight")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{f} has no {missing[0]}: the adapter does not match this "
                             f"{type(model).__name__} (targets {targets!r})")
        used.update(names)
        got = mod.from_hf(np.asarray(tensors[names[0]], np.float32),
                          np.asarray(tensors[names[1]], np.float32), str(f))
        for (a_var, b_var), pair in zip(mod.parts, got, strict=True):
            for var, value in zip((a_var, b_var), pair, strict=True):
                buf = values.setdefault(id(var), (var, np.array(var[...], np.float32)))[1]
                if mod.layer is None:
                    buf[...] = value
                else:
                    buf[mod.layer] = value
    for var, buf in values.values():
        var[...] = jnp.asarray(buf, var[...].dtype)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{f} holds {len(extra)} tensors this model has no place for, e.g. "
                         f"{extra[0]}")
    return model


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_peft", "read_peft_config", "save_peft"]
