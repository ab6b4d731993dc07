"""Loading Hugging Face checkpoints: ``config_from_hf`` and ``from_pretrained``.

Supported architectures: ``LlamaForCausalLM`` (``llama``), ``MistralForCausalLM``
(``mistral``), ``Qwen2ForCausalLM`` (``qwen2``) and ``GPT2LMHeadModel`` (``gpt2``).
Weights are read from ``model.safetensors`` or a sharded ``model.safetensors.index.json``,
one tensor at a time with safetensors' numpy API, straight into the stacked layout (no torch
at load time, never unpickling). Safetensors' numpy API cannot represent bfloat16, so BF16
(and FP8) tensors are read from their raw bytes with ``ml_dtypes``.

Mistral's sliding-window attention equals full causal attention on sequences no longer than
the window, so a Mistral checkpoint whose ``sliding_window`` is below
``max_position_embeddings`` loads with ``max_position_embeddings`` capped to the window (a
warning says so) rather than silently computing something else on longer sequences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jds.models.gpt2 import GPT2Config
from jds.models.llama import LlamaConfig, RopeScaling
from jds.models.registry import model_class

SUPPORTED: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
_RAW_DTYPES: dict[str, Any] = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
# Buffers some checkpoints carry that are recomputed here, never weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


# ------------------------------------------------------------------------------ configs
def _model_type(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    if archs:
        raise ValueError(f"unsupported architectures {archs}; jds loads {sorted(SUPPORTED)}")
    model_type = hf.get("model_type")
    if model_type in SUPPORTED.values():
        return model_type
    raise ValueError(
        f"unsupported model_type {model_type!r} (no 'architectures' given); jds loads "
        f"model types {sorted(SUPPORTED.values())}"
    )


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 nests rope settings under rope_parameters; older configs use
    # top-level rope_theta and rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(
            f"config.json: rope type {rope_type!r} is not supported; jds supports 'default', "
            "'linear' and 'llama3'"
        )
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = {k: merged[k] for k in keys if k in merged and rope_type == "llama3"}
    return theta, RopeScaling(rope_type=rope_type, factor=float(merged["factor"]), **extra)


def config_from_hf(hf_config: dict) -> LlamaConfig | GPT2Config:
    """Translate a Hugging Face ``config.json`` dict into a jds config.

    Args:
      hf_config: the parsed ``config.json``.

    Returns:
      ``LlamaConfig`` (llama, mistral, qwen2) or ``GPT2Config`` (gpt2).

    Raises:
      ValueError: unsupported architecture or a feature jds does not implement (named).
    """
    hf = hf_config
    kind = _model_type(hf)
    if kind == "gpt2":
        for key, ok in (
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
            ("scale_attn_weights", True),
            ("tie_word_embeddings", True),
        ):
            if hf.get(key, ok) != ok:
                raise ValueError(f"config.json: GPT-2 with {key}={hf[key]} is not supported")
        return GPT2Config(
            vocab_size=hf["vocab_size"],
            n_positions=hf["n_positions"],
            n_embd=hf["n_embd"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation_function=hf.get("activation_function", "gelu_new"),
            initializer_range=hf.get("initializer_range", 0.02),
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')"
        )
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if kind == "qwen2":
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ValueError("config.json: Qwen2 sliding-window attention is not supported")
    elif window is not None and int(window) < max_pos:
        warnings.warn(
            f"{kind} sliding_window={window} < max_position_embeddings={max_pos}: jds has no "
            f"sliding-window attention, so sequences are limited to {window} tokens (where "
            "full causal attention is exact)",
            stacklevel=3,
        )
        max_pos = int(window)
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", kind == "qwen2"))
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        max_position_embeddings=max_pos,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if kind == "qwen2" else bias,
        attention_out_bias=False if kind == "qwen2" else bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        initializer_range=hf.get("initializer_range", 0.02),
        rope_scaling=scaling,
    )


def read_hf_config(path: str | os.PathLike) -> tuple[dict, LlamaConfig | GPT2Config]:
    """``config.json`` of a Hugging Face directory, raw and as a jds config.

    Raises:
      FileNotFoundError: no ``config.json`` (named).
      ValueError: invalid JSON or an unsupported architecture.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} is missing; a Hugging Face checkpoint needs its config.json"
        )
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    return raw, config_from_hf(raw)


# ------------------------------------------------------------------------------ name maps
@dataclasses.dataclass(frozen=True)
class _Target:
    """Where one Hugging Face tensor goes.

    ``names``: our parameter(s) it fills (several for a fused tensor such as GPT-2's
    ``c_attn``); ``layer``: the index in the ``layers`` stack, or ``None`` for a top-level
    parameter; ``convert``: HF array -> our layout (a list, one per name, when fused).
    """

    names: tuple[str, ...]
    layer: int | None
    hf_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], Any]

    def paths(self) -> list[tuple[str, ...]]:
        return [(n,) if self.layer is None else ("layers", n) for n in self.names]


def _ident(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _add_layer(t: dict[str, _Target], i: int, entries: dict[str, tuple]) -> None:
    for hf_name, (shape, names, convert) in entries.items():
        names = (names,) if isinstance(names, str) else names
        t[hf_name] = _Target(names, i, shape, convert)


def _llama_targets(c: LlamaConfig) -> dict[str, _Target]:
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_size
    t = {
        "embed_tokens.weight": _Target(("embed_tokens",), None, (V, D), _ident),
        "norm.weight": _Target(("norm",), None, (D,), _ident),
    }
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = _Target(("lm_head",), None, (V, D), _transpose)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        # nn.Linear stores [out, in]; ours are [in, ...out] with heads split out.
        e = {
            p + "input_layernorm.weight": ((D,), "attn_norm", _ident),
            p + "self_attn.q_proj.weight": ((N * H, D), "wq", lambda w: w.T.reshape(D, N, H)),
            p + "self_attn.k_proj.weight": ((K * H, D), "wk", lambda w: w.T.reshape(D, K, H)),
            p + "self_attn.v_proj.weight": ((K * H, D), "wv", lambda w: w.T.reshape(D, K, H)),
            p + "self_attn.o_proj.weight": ((D, N * H), "wo", lambda w: w.T.reshape(N, H, D)),
            p + "post_attention_layernorm.weight": ((D,), "mlp_norm", _ident),
            p + "mlp.gate_proj.weight": ((F, D), "w_gate", _transpose),
            p + "mlp.up_proj.weight": ((F, D), "w_up", _transpose),
            p + "mlp.down_proj.weight": ((D, F), "w_down", _transpose),
        }
        if c.attention_bias:
            e[p + "self_attn.q_proj.bias"] = ((N * H,), "bq", lambda b: b.reshape(N, H))
            e[p + "self_attn.k_proj.bias"] = ((K * H,), "bk", lambda b: b.reshape(K, H))
            e[p + "self_attn.v_proj.bias"] = ((K * H,), "bv", lambda b: b.reshape(K, H))
        if c.attention_out_bias:
            e[p + "self_attn.o_proj.bias"] = ((D,), "bo", _ident)
        if c.mlp_bias:
            e[p + "mlp.gate_proj.bias"] = ((F,), "b_gate", _ident)
            e[p + "mlp.up_proj.bias"] = ((F,), "b_up", _ident)
            e[p + "mlp.down_proj.bias"] = ((D,), "b_down", _ident)
        _add_layer(t, i, e)
    return t


def _gpt2_targets(c: GPT2Config) -> dict[str, _Target]:
    D, F, N = c.n_embd, c.inner_size, c.n_head
    H = D // N
    t = {
        "wte.weight": _Target(("wte",), None, (c.vocab_size, D), _ident),
        "wpe.weight": _Target(("wpe",), None, (c.n_positions, D), _ident),
        "ln_f.weight": _Target(("ln_f_scale",), None, (D,), _ident),
        "ln_f.bias": _Target(("ln_f_bias",), None, (D,), _ident),
    }
    qkv = ("wq", "wk", "wv")
    for i in range(c.n_layer):
        p = f"h.{i}."
        # Conv1D stores [in, out]; c_attn's out axis is [q | k | v], each [N, H].
        _add_layer(
            t,
            i,
            {
                p + "ln_1.weight": ((D,), "ln_1_scale", _ident),
                p + "ln_1.bias": ((D,), "ln_1_bias", _ident),
                p + "attn.c_attn.weight": (
                    (D, 3 * D),
                    qkv,
                    lambda w: list(np.moveaxis(w.reshape(D, 3, N, H), 1, 0)),
                ),
                p + "attn.c_attn.bias": (
                    (3 * D,),
                    ("bq", "bk", "bv"),
                    lambda b: list(b.reshape(3, N, H)),
                ),
                p + "attn.c_proj.weight": ((D, D), "wo", lambda w: w.reshape(N, H, D)),
                p + "attn.c_proj.bias": ((D,), "bo", _ident),
                p + "ln_2.weight": ((D,), "ln_2_scale", _ident),
                p + "ln_2.bias": ((D,), "ln_2_bias", _ident),
                p + "mlp.c_fc.weight": ((D, F), "w_fc", _ident),
                p + "mlp.c_fc.bias": ((F,), "b_fc", _ident),
                p + "mlp.c_proj.weight": ((F, D), "w_proj", _ident),
                p + "mlp.c_proj.bias": ((D,), "b_proj", _ident),
            },
        )
    return t


def _normalise(name: str, config: LlamaConfig | GPT2Config) -> str:
    """Strip the base-model prefix (``model.`` / ``transformer.``) if present."""
    prefix = "transformer." if isinstance(config, GPT2Config) else "model."
    return name[len(prefix) :] if name.startswith(prefix) else name


# ------------------------------------------------------------------------------ files
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"{index} references shard {f.name}, which is missing from {path}; "
                    "download the complete checkpoint"
                )
        return files
    if single.is_file():
        return [single]
    if list(path.glob("pytorch_model*.bin")) or list(path.glob("*.pt")):
        raise ValueError(
            f"{path} holds only pickled PyTorch weights; jds reads safetensors only. Re-save "
            "with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json"
    )


class _SafetensorsFile:
    """One safetensors file: names, dtypes and shapes, and tensors read one at a time."""

    def __init__(self, file: Path) -> None:
        self.file = file
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.data_start = 8 + n
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header

    def get(self, handle: Any, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _RAW_DTYPES:
            return handle.get_tensor(name)
        dtype = np.dtype(_RAW_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        arr = np.fromfile(
            self.file,
            dtype=dtype,
            count=(end - start) // dtype.itemsize,
            offset=self.data_start + start,
        )
        return arr.reshape(info["shape"])


def from_pretrained(path: str | os.PathLike, *, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Load a Hugging Face checkpoint directory into a jds model.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json`` and its shards).
      param_dtype: dtype of the loaded parameters (weights are cast on load).

    Returns:
      A ``Llama`` or ``GPT2`` module holding the checkpoint's weights.

    Raises:
      FileNotFoundError: missing directory, ``config.json``, weights or a shard.
      ValueError: unsupported architecture, pickled-only weights, or tensors that are
        missing, unexpected or of the wrong shape (each named).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    _, config = read_hf_config(path)
    files = _weight_files(path)

    cls = model_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    targets = _gpt2_targets(config) if isinstance(config, GPT2Config) else _llama_targets(config)
    tied = getattr(config, "tie_word_embeddings", True)
    dtype = np.dtype(param_dtype)

    def leaf(p: tuple[str, ...]) -> Any:
        node = pure
        for k in p:
            node = node[k]
        return node

    buffers: dict[tuple[str, ...], np.ndarray] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        st = _SafetensorsFile(file)
        with safe_open(file, framework="np") as handle:
            for name in st.header:
                key = _normalise(name, config)
                target = targets.get(key)
                if target is None:
                    if not (_IGNORED.search(key) or (key == "lm_head.weight" and tied)):
                        unexpected.append(f"{name} (in {file.name})")
                    continue
                shape = tuple(st.header[name]["shape"])
                if shape != target.hf_shape:
                    raise ValueError(
                        f"{file.name}: tensor {name} has shape {shape} but config.json implies "
                        f"{target.hf_shape}; the config does not match the weights"
                    )
                value = target.convert(st.get(handle, name))
                parts = value if len(target.names) > 1 else [value]
                for p, part in zip(target.paths(), parts, strict=True):
                    if p not in buffers:
                        buffers[p] = np.empty(leaf(p).shape, dtype)
                    if target.layer is None:
                        buffers[p][...] = part
                    else:
                        buffers[p][target.layer] = part
                seen.add(key)
    if unexpected:
        raise ValueError(
            f"{path}: unexpected tensors for {type(config).__name__} {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; the checkpoint does not match its "
            "config.json architecture"
        )
    missing = sorted(set(targets) - seen)
    if missing:
        raise ValueError(
            f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            "the checkpoint is incomplete or does not match config.json"
        )

    def fill(node: dict, prefix: tuple[str, ...]) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                fill(v, (*prefix, k))
            else:
                node[k] = jnp.asarray(buffers.pop((*prefix, k)))

    fill(pure, ())
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


__all__ = ["SUPPORTED", "config_from_hf", "from_pretrained", "read_hf_config"]
