"""Tensor sources in Hugging Face naming, and jds parameters built lazily from them.

A *source* is anything that hands out tensors by their Hugging Face name, one at a time:
``SafetensorsSource`` (a ``save_pretrained`` directory, single file or sharded index) and
``DeepSpeedSource`` (a DeepSpeed ZeRO checkpoint of a ``transformers`` model: the fp32
weights, or one of Adam's moments, reassembled from the rank partitions).

``param_leaves(config, source)`` maps a source onto jds's parameter tree through the loader's
own tables (``jds.models.hf``): every leaf is a ``LazyLeaf`` that reads one layer's tensor(s)
when Orbax writes that slice. Names are checked up front: unexpected, missing and misshapen
tensors are all named before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flax import nnx

from jds.checkpoint.orbax import LazyLeaf
from jds.models.gpt2 import GPT2Config
from jds.models.hf import (
    _IGNORED,
    _gpt2_targets,
    _llama_targets,
    _normalise,
    _SafetensorsFile,
    _Target,
    _weight_files,
)
from jds.models.llama import LlamaConfig
from jds.models.registry import model_class

ModelConfig = LlamaConfig | GPT2Config


class TensorSource(Protocol):
    """Tensors by Hugging Face name, read one at a time."""

    description: str

    def names(self) -> list[str]:
        """Every tensor name."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``."""
        ...

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` (a fresh host array)."""
        ...


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint directory (``model.safetensors`` or shards).

    Reads one tensor per ``get`` (never unpickles: safetensors only).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.description = str(self.path)
        self._where: dict[str, _SafetensorsFile] = {}
        for file in _weight_files(self.path):
            st = _SafetensorsFile(file)
            for name in st.header:
                self._where[name] = st

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        st = self._where[name]
        with safe_open(st.file, framework="np") as handle:
            return st.get(handle, name)


class DeepSpeedSource:
    """One array per parameter of a DeepSpeed ZeRO checkpoint, by its module name.

    Args:
      checkpoint: a ``DeepSpeedCheckpoint``.
      which: ``"fp32"`` (the weights), ``"exp_avg"`` or ``"exp_avg_sq"`` (Adam's moments).
    """

    def __init__(self, checkpoint: Any, which: str = "fp32") -> None:
        if which not in ("fp32", "exp_avg", "exp_avg_sq"):
            raise ValueError(f"which must be fp32, exp_avg or exp_avg_sq; got {which!r}")
        self.checkpoint = checkpoint
        self.which = which
        self.description = f"{checkpoint.dir} ({which})"
        self._trainable = checkpoint.param_shapes

    def names(self) -> list[str]:
        if self.which == "fp32":
            return self.checkpoint.names()
        return list(self._trainable)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._trainable:
            return tuple(self._trainable[name])
        return tuple(self.checkpoint.fp32(name).shape)

    def get(self, name: str) -> np.ndarray:
        if self.which == "fp32":
            return self.checkpoint.fp32(name)
        m, v = self.checkpoint.moments(name)
        return m if self.which == "exp_avg" else v


def _targets(config: ModelConfig) -> dict[str, _Target]:
    return _gpt2_targets(config) if isinstance(config, GPT2Config) else _llama_targets(config)


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """The jds parameter tree of ``config`` as shape/dtype structs (nothing allocated)."""
    cls = model_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.split(abstract)[1])


def param_leaves(
    config: ModelConfig, source: TensorSource, *, dtype: Any = np.float32
) -> dict[str, Any]:
    """jds's parameter tree with one ``LazyLeaf`` per parameter, read from ``source``.

    Args:
      config: the model's jds config (e.g. from ``read_hf_config``).
      source: tensors in Hugging Face naming (``model.``/``transformer.`` prefixes optional).
      dtype: the stored dtype.

    Raises:
      ValueError: tensors that are unexpected for the architecture, missing, or of the wrong
        shape (each named, with the source).
    """
    targets = _targets(config)
    tied = getattr(config, "tie_word_embeddings", True)
    by_key: dict[str, str] = {}
    unexpected, bad_shape = [], []
    for name in source.names():
        key = _normalise(name, config)
        target = targets.get(key)
        if target is None:
            if not (_IGNORED.search(key) or (key == "lm_head.weight" and tied)):
                unexpected.append(name)
            continue
        shape = tuple(source.shape(name))
        if shape != target.hf_shape:
            bad_shape.append(f"{name}: {shape}, the config implies {target.hf_shape}")
        by_key[key] = name
    missing = sorted(set(targets) - set(by_key))
    problems = []
    if unexpected:
        problems.append(f"unexpected for {type(config).__name__}: {unexpected[:8]}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if missing:
        problems.append(f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if bad_shape:
        problems.append("wrong shape: " + "; ".join(bad_shape[:8]))
    if problems:
        raise ValueError(
            f"{source.description} does not hold this model's tensors ("
            + "; ".join(problems) + "); the weights do not match the config"
        )

    # path -> {layer or None: (source name, part index, convert, fused)}
    plan: dict[tuple[str, ...], dict[int | None, tuple[str, int, Callable, bool]]] = {}
    for key, target in targets.items():
        fused = len(target.names) > 1
        for j, path in enumerate(target.paths()):
            plan.setdefault(path, {})[target.layer] = (by_key[key], j, target.convert, fused)

    def make(path: tuple[str, ...], struct: Any) -> LazyLeaf:
        parts = plan.get(path)
        if parts is None:
            raise ValueError(f"jds parameter {'/'.join(path)} has no Hugging Face tensor")

        def read(i: int | None) -> np.ndarray:
            name, j, convert, fused = parts[i]
            value = convert(source.get(name))
            return value[j] if fused else value

        stacked = path[0] == "layers"
        if stacked and sorted(parts) != list(range(struct.shape[0])):
            raise ValueError(f"jds parameter {'/'.join(path)}: layers {sorted(parts)} found, "
                             f"{struct.shape[0]} expected")
        return LazyLeaf(tuple(struct.shape), dtype, read, sliced=stacked)

    def walk(node: dict, prefix: tuple[str, ...]) -> dict:
        return {
            k: walk(v, (*prefix, k)) if isinstance(v, dict) else make((*prefix, k), v)
            for k, v in node.items()
        }

    return walk(abstract_params(config), ())


__all__ = [
    "DeepSpeedSource",
    "SafetensorsSource",
    "TensorSource",
    "abstract_params",
    "param_leaves",
]
