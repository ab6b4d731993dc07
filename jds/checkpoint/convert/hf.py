"""Exporting jds weights as a Hugging Face checkpoint: the inverse of ``jds.models.hf``.

``hf_config`` writes ``config.json`` (the inverse of ``config_from_hf``), ``hf_tensor_plan``
lists every Hugging Face tensor with the jds leaves it is built from, and ``save_hf`` streams
them, one tensor at a time, into ``model.safetensors`` or HF-style shards
(``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``).

The names, shapes and jds sources come from the loader's own tables
(``jds.models.hf._llama_targets`` / ``_gpt2_targets``). The inverse layout change (transpose,
reshape, GPT-2's fused ``c_attn``) is written here, and every exported tensor is checked
against the loader: the loader's conversion of the built array must give back exactly the
source slices, so the exporter cannot drift from ``from_pretrained`` without failing loudly.

Memory: shards are streamed (``safetensors_writer``): one output tensor and its sources are held
at a time; stacked parameters are read one layer at a time through ``read``, in an order that
groups the tensors of one jds leaf together.

Given the Hugging Face folder the model came from (``hf_origin.HFOrigin``), ``save_hf`` keeps
that folder's ``config.json`` fields jds does not own, writes its ``generation_config.json``
and copies its tokenizer files.

    from jds.checkpoint.convert.hf import read_from_model, save_hf
    save_hf(model.config, read_from_model(model), "out/llama-hf", dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jds.checkpoint.convert.hf_origin import HFOrigin, copy_tokenizer, merged_config
from jds.models.gpt2 import GPT2Config
from jds.models.hf import SUPPORTED, _gpt2_targets, _llama_targets
from jds.models.llama import LlamaConfig

Reader = Callable[[tuple[str, ...], int | None], np.ndarray]
"""``read(path, layer)``: one jds parameter (``layer=None``) or its slice at ``layer``."""

DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}
# jds leaves stored [in, ...out] whose HF tensor is nn.Linear's [out, in] (transposed);
# every other leaf is a plain reshape of its HF tensor (GPT-2's Conv1D is already [in, out]).
_LLAMA_TRANSPOSED = frozenset({"lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})
_GPT2_NO_TOKEN = 50256  # GPT2Config's default bos/eos id, meaningless in a smaller vocabulary


# ------------------------------------------------------------------------------ config
def _np_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _llama_architecture(c: LlamaConfig, architecture: str | None) -> str:
    """Pick (or check) the HF class able to hold ``c``'s biases."""
    qkv, out, mlp = c.attention_bias, c.attention_out_bias, c.mlp_bias
    if architecture is None:
        architecture = "Qwen2ForCausalLM" if qkv and not out else "LlamaForCausalLM"
    if architecture not in SUPPORTED or architecture == "GPT2LMHeadModel":
        llama_family = sorted(a for a in SUPPORTED if a != "GPT2LMHeadModel")
        raise ValueError(
            f"architecture {architecture!r} cannot hold a LlamaConfig; use one of {llama_family}"
        )
    flags = f"attention_bias={qkv}, attention_out_bias={out}, mlp_bias={mlp}"
    if qkv and not out and mlp:
        raise ValueError(
            f"LlamaConfig with {flags} has no Hugging Face equivalent: Qwen2ForCausalLM has "
            "q/k/v biases but no MLP biases, LlamaForCausalLM's attention_bias also puts a bias "
            "on o_proj. Set mlp_bias=False or attention_out_bias=True"
        )
    if out and not qkv:
        raise ValueError(
            f"LlamaConfig with {flags} has no Hugging Face equivalent: no class has an o_proj "
            "bias without q/k/v biases. Set attention_bias=True or attention_out_bias=False"
        )
    if architecture == "LlamaForCausalLM" and qkv != out:
        raise ValueError(
            f"LlamaForCausalLM cannot hold a LlamaConfig with {flags}: its attention_bias puts "
            "biases on all of q/k/v/o. Export as Qwen2ForCausalLM (q/k/v biases only)"
        )
    if architecture == "Qwen2ForCausalLM" and not (qkv and not out and not mlp):
        raise ValueError(
            "Qwen2ForCausalLM needs attention_bias=True, attention_out_bias=False, "
            f"mlp_bias=False; the LlamaConfig has {flags}. Export as LlamaForCausalLM instead"
        )
    if architecture == "MistralForCausalLM" and (qkv or out or mlp):
        raise ValueError(
            f"MistralForCausalLM has no biases; the LlamaConfig has {flags}. Export as "
            "LlamaForCausalLM (or Qwen2ForCausalLM for q/k/v biases only) instead"
        )
    return architecture


def _rope_entries(c: LlamaConfig) -> dict[str, Any]:
    """Rope settings as transformers 5 (``rope_parameters``) and 4 (top level) read them."""
    theta = float(c.rope_theta)
    s = c.rope_scaling
    if s is None:
        return {
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "rope_theta": theta,
        }
    scaling: dict[str, Any] = {"rope_type": s.rope_type, "factor": float(s.factor)}
    if s.rope_type == "llama3":
        scaling.update(
            low_freq_factor=float(s.low_freq_factor),
            high_freq_factor=float(s.high_freq_factor),
            original_max_position_embeddings=int(s.original_max_position_embeddings),
        )
    return {
        "rope_parameters": {**scaling, "rope_theta": theta},
        "rope_theta": theta,
        "rope_scaling": scaling,
    }


def hf_config(
    config: LlamaConfig | GPT2Config, *, architecture: str | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face checkpoint holding a jds model.

    The inverse of ``jds.models.hf.config_from_hf``: ``config_from_hf(hf_config(c)) == c``
    for every field but ``remat`` (a training setting, not part of the checkpoint).
    ``head_dim`` is written only when set (``None`` and HF's default agree). Rope settings
    are written both as transformers 5's ``rope_parameters`` and as the older top-level
    ``rope_theta``/``rope_scaling``; jds has no dropout, so all dropouts are 0.

    Args:
      config: a ``LlamaConfig`` or ``GPT2Config``.
      architecture: the HF class; ``None`` infers it: ``GPT2LMHeadModel`` for GPT-2,
        ``Qwen2ForCausalLM`` for q/k/v biases without an output bias, else
        ``LlamaForCausalLM``. ``"MistralForCausalLM"`` may be asked for (no biases).
      dtype: the weights' dtype, written as ``dtype`` (``"float32"``, ``"bfloat16"``,
        ``"float16"``).

    Returns:
      The ``config.json`` contents (no ``transformers_version``).

    Raises:
      ValueError: an unknown dtype or architecture, or a config no HF class can express
        (named, with the fix).
    """
    _np_dtype(dtype)
    if isinstance(config, GPT2Config):
        if architecture not in (None, "GPT2LMHeadModel"):
            raise ValueError(
                f"architecture {architecture!r} cannot hold a GPT2Config; use 'GPT2LMHeadModel'"
            )
        c = config
        out: dict[str, Any] = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.n_positions,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.n_inner,
            "activation_function": c.activation_function,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "initializer_range": c.initializer_range,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "dtype": dtype,
        }
        if c.vocab_size <= _GPT2_NO_TOKEN:
            out.update(bos_token_id=None, eos_token_id=None)
        return out
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"expected a LlamaConfig or GPT2Config, got {type(config).__name__}")
    c = config
    arch = _llama_architecture(c, architecture)
    out = {
        "architectures": [arch],
        "model_type": SUPPORTED[arch],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu",
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_dropout": 0.0,
        **_rope_entries(c),
        "dtype": dtype,
    }
    if c.head_dim is not None:
        out["head_dim"] = c.head_dim
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = None  # full causal attention, as jds computes
    else:  # Qwen2
        out.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=c.num_hidden_layers,
            layer_types=["full_attention"] * c.num_hidden_layers,
        )
    return out


# ------------------------------------------------------------------------------ tensor plan
class HFSource(NamedTuple):
    """One jds slice an HF tensor is built from: a leaf ``path`` and its ``layer`` (or None)."""

    path: tuple[str, ...]
    layer: int | None


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One Hugging Face tensor and how to build it from jds parameters.

    Attributes:
      name: the name ``save_pretrained`` writes (``model.layers.0.self_attn.q_proj.weight``,
        ``lm_head.weight``, ``transformer.h.0.attn.c_attn.weight``).
      shape: its HF shape.
      sources: the jds slices it is built from (three for GPT-2's fused ``c_attn``).
      build: ``build(*slices)`` -> the HF array (one slice per source, in order).
      load: the loader's own HF -> jds conversion (``jds.models.hf``), used to check
        ``build``: ``load(build(*slices))`` must give back ``slices`` exactly.
    """

    name: str
    shape: tuple[int, ...]
    sources: tuple[HFSource, ...]
    build: Callable[..., np.ndarray]
    load: Callable[[np.ndarray], Any]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def array(self, read: Reader) -> np.ndarray:
        """Read this tensor's sources and build it, checked against the loader.

        Raises:
          ValueError: a source whose shape does not fit the config (named).
          RuntimeError: the loader would not give back the sources (an exporter bug).
        """
        parts = [np.asarray(read(s.path, s.layer)) for s in self.sources]
        where = ", ".join(
            f"{'/'.join(s.path)}{'' if s.layer is None else f'[{s.layer}]'} {p.shape}"
            for s, p in zip(self.sources, parts, strict=True)
        )
        try:
            hf = self.build(*parts)
        except ValueError as e:
            raise ValueError(
                f"{self.name}: sources {where} do not fit its HF shape {self.shape} ({e}); "
                "the parameters do not match the config"
            ) from e
        if hf.shape != self.shape:
            raise ValueError(
                f"{self.name}: sources {where} give shape {hf.shape}, but the config implies "
                f"{self.shape}; the parameters do not match the config"
            )
        back = self.load(hf)
        back = back if len(parts) > 1 else [back]
        for s, part, got in zip(self.sources, parts, back, strict=True):
            got = np.asarray(got)
            if got.shape != part.shape:
                raise ValueError(
                    f"{self.name}: source {'/'.join(s.path)} has shape {part.shape}, but the "
                    f"config implies {got.shape}; the parameters do not match the config"
                )
            if not _bitwise_equal(part, got):
                raise RuntimeError(
                    f"{self.name}: jds.models.hf would load it back into {'/'.join(s.path)} "
                    "differently from what was exported; the exporter's layout table "
                    "(jds.checkpoint.convert.hf) is out of date with the loader's"
                )
        return hf


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bits (NaN-safe; a pure permutation must not change a bit)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(bits), b.view(bits)))


def _builder(hf_shape: tuple[int, ...], transposed: bool, fused: bool) -> Callable:
    if fused and transposed:
        raise RuntimeError(  # no such tensor exists today; a new loader table would add it
            "jds.models.hf has a fused, transposed tensor; add its inverse layout to _builder"
        )

    def build(*parts: np.ndarray) -> np.ndarray:
        if fused:  # GPT-2 c_attn: [q | k | v] along HF's last axis
            x = np.concatenate([p.reshape(*hf_shape[:-1], -1) for p in parts], axis=-1)
        else:
            (x,) = parts
        return x.reshape(hf_shape[::-1]).T if transposed else x.reshape(hf_shape)

    return build


def hf_tensor_plan(config: LlamaConfig | GPT2Config) -> list[HFTensor]:
    """Every tensor of the Hugging Face checkpoint, in ``jds.models.hf``'s table order.

    Tied embeddings write no ``lm_head.weight`` (as ``save_pretrained``).

    Args:
      config: a ``LlamaConfig`` or ``GPT2Config``.

    Returns:
      One ``HFTensor`` per HF tensor.
    """
    if isinstance(config, GPT2Config):
        targets, prefix, transposed = _gpt2_targets(config), "transformer.", frozenset()
    else:
        targets, prefix, transposed = _llama_targets(config), "model.", _LLAMA_TRANSPOSED
    plan = []
    for key, t in targets.items():
        name = key if key == "lm_head.weight" else prefix + key
        fused = len(t.names) > 1
        plan.append(
            HFTensor(
                name=name,
                shape=tuple(t.hf_shape),
                sources=tuple(HFSource(p, t.layer) for p in t.paths()),
                build=_builder(tuple(t.hf_shape), t.names[0] in transposed, fused),
                load=t.convert,
            )
        )
    return plan


# ------------------------------------------------------------------------------ writing
def _shards(plan: list[HFTensor], itemsize: int, max_bytes: int) -> list[list[HFTensor]]:
    """Greedy, in plan order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[HFTensor]] = [[]]
    used = 0
    for t in plan:
        n = t.size * itemsize
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += n
    return shards


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory; choose another path")
        if any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists and is not empty; save_hf writes a fresh checkpoint "
                "directory. Remove it or choose another out_dir"
            )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_hf(
    config: LlamaConfig | GPT2Config,
    read: Reader,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
    architecture: str | None = None,
    origin: HFOrigin | None = None,
) -> list[Path]:
    """Write a Hugging Face checkpoint directory, one tensor at a time.

    Writes ``config.json`` and either ``model.safetensors`` or, when the weights exceed
    ``max_shard_bytes``, ``model-0000i-of-0000N.safetensors`` shards plus
    ``model.safetensors.index.json``. Each shard is streamed: its header first, then one tensor
    at a time, so one tensor and its sources are held at once. Everything is written into a
    temporary directory beside ``out_dir`` and renamed into place at the end: ``out_dir`` is
    either complete or absent.

    Args:
      config: the model's config.
      read: ``read(path, layer)`` -> one jds parameter (``layer=None``) or its slice at
        ``layer`` (e.g. ``read_from_model(model)``).
      out_dir: the checkpoint directory; must not exist or be empty.
      dtype: weights' dtype on disk: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      max_shard_bytes: largest shard (a single larger tensor gets its own shard).
      architecture: the HF class (see ``hf_config``); ``None`` infers it.
      origin: the Hugging Face folder the model came from (``hf_origin.find_origin``):
        ``config.json`` starts from its config (``hf_origin.merged_config``: its other
        fields, token ids, ``use_cache``, ... are kept), its ``generation_config.json`` is
        written and its tokenizer files are copied.

    Returns:
      The files written in ``out_dir``: the weight file(s), the index if sharded,
      ``config.json``, and ``generation_config.json`` and tokenizer files from ``origin``.

    Raises:
      FileExistsError: ``out_dir`` exists and is not an empty directory.
      ValueError: bad ``dtype``/``max_shard_bytes``, a config HF cannot express, or a
        parameter whose shape does not match the config (named).
    """
    from jds.checkpoint.convert.safetensors_writer import write_safetensors

    np_dtype = _np_dtype(dtype)
    if (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, int)
        or (max_shard_bytes <= 0)
    ):
        raise ValueError(f"max_shard_bytes must be a positive int; got {max_shard_bytes!r}")
    origin = origin or HFOrigin()
    config_json = merged_config(hf_config(config, architecture=architecture, dtype=dtype),
                                origin.config, config)
    plan = hf_tensor_plan(config)
    itemsize = np.dtype(np_dtype).itemsize
    shards = _shards(plan, itemsize, max_shard_bytes)
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    written = list(files)
    try:
        for file, tensors in zip(files, shards, strict=True):
            # Streamed: the header first, then one tensor at a time; grouped by source leaf
            # so a reader caching one stacked array reads each array once per shard.
            write_safetensors(
                tmp / file,
                [(t.name, t.shape, np_dtype, (lambda t=t: t.array(read)))
                 for t in sorted(tensors, key=source_order)],
                metadata={"format": "pt"},
            )
        if n > 1:
            _write_json(
                tmp / "model.safetensors.index.json",
                {
                    "metadata": {
                        "total_parameters": sum(t.size for t in plan),
                        "total_size": sum(t.size for t in plan) * itemsize,
                    },
                    "weight_map": {
                        t.name: file for file, ts in zip(files, shards, strict=True) for t in ts
                    },
                },
            )
            written.append("model.safetensors.index.json")
        _write_json(tmp / "config.json", config_json)
        written.append("config.json")
        if origin.generation_config is not None:
            _write_json(tmp / "generation_config.json", origin.generation_config)
            written.append("generation_config.json")
        if origin.tokenizer_dir is not None:
            written += copy_tokenizer(origin.tokenizer_dir, tmp)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above; fails (and cleans up) if filled since
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / f for f in written]


def source_order(t: HFTensor) -> tuple:
    """Sort key grouping HF tensors by the jds leaf they read (then by layer)."""
    first = t.sources[0]
    return (first.path, -1 if first.layer is None else first.layer)


def read_from_model(model: nnx.Module) -> Reader:
    """A ``read`` for ``save_hf`` over an in-memory jds model (single process).

    Each call copies one parameter, or one layer of a stacked one, to host memory.

    Args:
      model: a ``Llama`` or ``GPT2`` module.

    Returns:
      ``read(path, layer) -> np.ndarray``.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def read(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        node: Any = params
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"the model has no parameter {'/'.join(path)}")
            node = node[key]
        return np.asarray(jax.device_get(node if layer is None else node[layer]))

    return read


__all__ = [
    "DTYPES",
    "HFSource",
    "HFTensor",
    "Reader",
    "hf_config",
    "hf_tensor_plan",
    "read_from_model",
    "save_hf",
]
