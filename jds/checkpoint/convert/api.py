"""Checkpoint conversion, every direction ``jds convert`` offers, streamed a tensor at a time.

==========================  ===========================================================
direction                   what is written
==========================  ===========================================================
``hf_to_orbax``             a weights-only jds checkpoint (``{"params"}`` fp32 + model
                            config); ``engine.load_checkpoint`` starts training from it
``orbax_to_hf``             ``config.json`` + ``model.safetensors`` (or shards) that
                            ``transformers`` loads; a model that came from a Hugging Face
                            folder gets that folder's ``config.json`` fields,
                            ``generation_config.json`` and tokenizer files back
                            (``hf_origin``)
``orbax_to_safetensors``    one consolidated safetensors file (``zero_to_fp32``'s
                            equivalent), jds or Hugging Face names, fp32/bf16/fp16
``deepspeed_to_orbax``      from a DeepSpeed ZeRO-1/2/3 checkpoint of a ``transformers``
                            model: the weights, or (``optimizer=True``) the whole train
                            state (Adam moments, step) so the run continues in jds
==========================  ===========================================================

Memory: sources are read one tensor at a time (safetensors by offset, DeepSpeed partitions
memory-mapped, Orbax by partial restore) and Orbax checkpoints are written slice by slice
(``LazyLeaf``, one chunk per layer). Reading Orbax, a stacked array stored one layer per
chunk (what these converters write) is read a layer at a time; one chunked otherwise (a
training checkpoint's per-device shards span every layer) is read whole, once. So peak host
memory is about one layer's tensors for converted checkpoints and one stacked array (all
layers of one weight) for training checkpoints; ``scripts/bench_convert.py`` measures it
against the checkpoint size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from jds.checkpoint.convert import hf_origin
from jds.checkpoint.convert.orbax_reader import OrbaxCheckpoint
from jds.checkpoint.convert.sources import (
    DeepSpeedSource,
    SafetensorsSource,
    abstract_params,
    param_leaves,
)
from jds.checkpoint.orbax import Checkpointer, LazyLeaf, _state_to_dict
from jds.models.hf import read_hf_config
from jds.models.registry import config_to_dict, get_config

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _fresh_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already exists and is not empty; choose a new output directory"
        )


def _write(out: Path, step: int, tree: dict, meta: dict) -> Path:
    ck = Checkpointer(out, max_to_keep=None, async_save=False)
    try:
        ck.save_tree(step, tree, meta)
    finally:
        ck.close()
    return out / str(step)


def hf_to_orbax(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Hugging Face directory -> weights-only jds checkpoint ``out/0``.

    The folder's ``config.json`` (every field) and ``generation_config.json`` are recorded
    in the meta (``meta["hf"]``, with the folder's path for its tokenizer files), so
    ``orbax_to_hf`` gives them back.

    Args:
      src: a ``save_pretrained`` directory (``config.json`` + safetensors).
      out: new checkpoint root.

    Returns:
      The step directory written.
    """
    src, out = Path(src), Path(out)
    _fresh_dir(out)
    _, config = read_hf_config(src)
    leaves = param_leaves(config, SafetensorsSource(src))
    meta = {"kind": "weights", "model": config_to_dict(config),
            "source": {"format": "huggingface", "path": str(src.resolve())},
            "hf": hf_origin.record(src)}
    return _write(out, 0, {"params": leaves}, meta)


def _config_for(model: str | os.PathLike) -> Any:
    """A model config from a Hugging Face directory or a jds preset name."""
    if os.path.isdir(model):
        return read_hf_config(model)[1]
    return get_config(str(model))


def _model_config(ckpt: OrbaxCheckpoint, model: str | os.PathLike | None) -> Any:
    return ckpt.model_config() if model is None else _config_for(model)


def orbax_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 2**30,
    model: str | os.PathLike | None = None,
    architecture: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    merge_lora: bool = False,
) -> list[Path]:
    """jds checkpoint -> Hugging Face directory (``config.json`` + safetensors).

    When the model came from a Hugging Face folder (``hf_to_orbax``'s record, ``model`` given
    as that folder, or a ``jds train --model <HF dir>`` run whose folder is still there),
    ``config.json`` keeps every field of the folder's that jds does not own (token ids,
    ``use_cache``, ...), its ``generation_config.json`` is written and its tokenizer files
    are copied (``hf_origin``).

    Args:
      src: checkpoint root or step directory.
      out: new Hugging Face directory.
      step: the step under a root (default newest intact).
      dtype: ``float32`` / ``bfloat16`` / ``float16`` on disk.
      max_shard_bytes: largest shard file (shards are streamed a tensor at a time).
      model: preset or HF directory giving the model config, for checkpoints that do not
        store it.
      architecture: HF class to write (default inferred).
      tokenizer: a directory to copy the tokenizer files from (default: the origin
        folder's, when it still exists).
      merge_lora: a LoRA run's checkpoint: write ``W + scale * A @ B`` (and a QLoRA base
        dequantized); such a checkpoint is refused without it.
    """
    from jds.checkpoint.convert.hf import save_hf

    ckpt = OrbaxCheckpoint(src, step)
    config = _model_config(ckpt, model)
    origin = hf_origin.find_origin(ckpt.meta, config, model=model, tokenizer=tokenizer)
    return save_hf(config, ckpt.reader(merge_lora=merge_lora), out, dtype=dtype,
                   max_shard_bytes=max_shard_bytes, architecture=architecture, origin=origin)


def orbax_to_safetensors(
    src: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str = "float32",
    names: str = "jds",
    model: str | os.PathLike | None = None,
) -> Path:
    """jds checkpoint -> one consolidated safetensors file (the ``zero_to_fp32`` equivalent).

    Args:
      src: checkpoint root or step directory.
      out_file: the ``.safetensors`` file to write (atomically).
      step: the step under a root (default newest intact).
      dtype: ``float32`` / ``bfloat16`` / ``float16``.
      names: ``"jds"`` (stacked parameters, ``layers.wq`` ``[L, D, N, H]``) or ``"hf"``
        (``transformers`` names and layouts, one tensor per layer).
      model: preset or HF directory, for checkpoints without a stored model config.
    """
    from jds.checkpoint.convert.safetensors_writer import write_safetensors

    np_dtype = _dtype(dtype)
    out_file = Path(out_file)
    if out_file.exists():
        raise FileExistsError(f"{out_file} already exists; choose a new file name")
    ckpt = OrbaxCheckpoint(src, step)
    key = ckpt.weights_key
    meta = {"format": "pt" if names == "hf" else "jds", "source": str(ckpt.dir)}
    if names == "jds":
        entries = [
            (".".join(p), tuple(ckpt.arrays[(key, *p)].shape), np_dtype,
             (lambda p=p: ckpt.read((key, *p))))
            for p in ckpt.weight_paths()
        ]
    elif names == "hf":
        from jds.checkpoint.convert.hf import hf_tensor_plan, source_order

        read = ckpt.reader()
        plan = sorted(hf_tensor_plan(_model_config(ckpt, model)), key=source_order)
        entries = [(t.name, t.shape, np_dtype, (lambda t=t: t.array(read))) for t in plan]
    else:
        raise ValueError(f"names must be 'jds' or 'hf'; got {names!r}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_file, entries, metadata=meta)
    return out_file


# --------------------------------------------------------------------------- DeepSpeed
def _scalar(value: Any, dtype: Any) -> np.ndarray:
    return np.asarray(value, dtype=dtype)


def deepspeed_to_orbax(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike,
    tag: str | None = None,
    optimizer: bool = False,
    config: str | os.PathLike | dict | None = None,
) -> Path:
    """DeepSpeed ZeRO-1/2/3 checkpoint -> jds checkpoint ``out/<step>``.

    The fp32 weights are reassembled from the flat partitions as DeepSpeed's
    ``zero_to_fp32.py`` does (any world size). With ``optimizer=True`` the result is a full
    jds train state for ``config`` (default: the DeepSpeed config stored in the checkpoint):
    Adam's ``exp_avg``/``exp_avg_sq`` become optax's ``mu``/``nu``, every step count the
    DeepSpeed step, so ``engine.load_checkpoint`` continues the run with the same next
    losses.

    Args:
      src: DeepSpeed ``save_dir`` (its ``latest`` names the tag) or a ``global_stepN`` dir.
      out: new checkpoint root.
      model: the ``transformers`` model directory (its ``config.json``) or a jds preset.
      tag: DeepSpeed tag under ``src``.
      optimizer: also map the optimizer state and step (a resumable train state).
      config: the jds/DeepSpeed config the run continues with (for ``optimizer=True``).

    Raises:
      ValueError: tensors that do not fit the model (named), an optimizer state jds cannot
        map (named), or no config for ``optimizer=True``.
    """
    from jds.checkpoint.convert.deepspeed import DeepSpeedCheckpoint

    src, out = Path(src), Path(out)
    _fresh_dir(out)
    ds = DeepSpeedCheckpoint(src, tag)
    model_cfg = _config_for(model)
    params = param_leaves(model_cfg, DeepSpeedSource(ds, "fp32"))
    source = {"format": "deepspeed", "path": str(ds.dir), "zero_stage": ds.stage,
              "world_size": ds.world_size, "step": ds.step}
    hf = {"hf": hf_origin.record(model)} if hf_origin.is_hf_dir(model) else {}
    if not optimizer:
        meta = {"kind": "weights", "model": config_to_dict(model_cfg), "source": source, **hf}
        return _write(out, ds.step, {"params": params}, meta)

    ds_config = config if config is not None else ds.ds_config
    if ds_config is None:
        raise ValueError(
            f"{ds.dir} stores no DeepSpeed config; pass the run's config (--config)"
        )
    tree, jds_config = _train_state_tree(model_cfg, ds_config, ds, params)
    meta = {"kind": "train_state", "model": config_to_dict(model_cfg), "source": source,
            "config": jds_config.to_dict(), "client_state": {}, **hf}
    return _write(out, ds.step, tree, meta)


def _train_state_tree(model_cfg: Any, ds_config: Any, ds: Any, params: dict) -> tuple[dict, Any]:
    """A full jds train state for ``ds_config``, filled from DeepSpeed's checkpoint."""
    from jds.precision import LossScaleConfig, init_loss_scale, policy_for
    from jds.state import train_state_template

    fp32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32),
                        abstract_params(model_cfg))
    state, tx, cfg = train_state_template(ds_config, fp32)
    abstract = _state_to_dict(state)
    mu = param_leaves(model_cfg, DeepSpeedSource(ds, "exp_avg"))
    nu = param_leaves(model_cfg, DeepSpeedSource(ds, "exp_avg_sq"))
    step = ds.step
    total = step if ds.global_steps is None else ds.global_steps

    def like_params(tree: dict, dtype: Any) -> dict:
        return jax.tree.map(lambda leaf: dataclasses.replace(leaf, dtype=dtype), tree,
                            is_leaf=lambda x: isinstance(x, LazyLeaf))

    compute = policy_for(cfg.precision).compute_dtype
    mixed = compute != jnp.float32
    tree: dict[str, Any] = {
        # jds's step counts fp16-skipped steps (DeepSpeed's global_steps); Adam's count and
        # the LR schedule use the applied ones (DeepSpeed's optimizer step).
        "step": _scalar(total, np.int32),
        "skipped": _scalar(total - step, np.int32),
        "params": like_params(params, np.dtype(compute)) if mixed else params,
        "rng": np.asarray(jax.random.key_data(jax.random.key(cfg.seed))),
        "loss_scale": jax.tree.map(np.asarray, init_loss_scale(
            LossScaleConfig.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None)),
    }
    if mixed:
        tree["master"] = params
    tree["opt_state"] = _map_opt_state(abstract["opt_state"], tx, mu, nu, step)
    return tree, cfg


def _map_opt_state(abstract: Any, tx: Any, mu: dict, nu: dict, step: int) -> Any:
    """optax state shaped like ``abstract``: ``mu``/``nu`` from Adam's moments, counts = step."""
    kinds = jax.tree.leaves(optax.tree_map_params(
        tx, lambda _: "param", abstract, transform_non_params=lambda _: "other",
    ))
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for (path, leaf), kind in zip(flat, kinds, strict=True):
        names = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path]
        where = "opt_state/" + "/".join(names)
        field = next((n for n in names if n in ("mu", "nu")), None)
        if kind == "param" and field is not None:
            node: Any = mu if field == "mu" else nu
            for k in names[names.index(field) + 1:]:
                node = node[k]
            if tuple(node.shape) != tuple(leaf.shape):
                raise ValueError(f"{where}: DeepSpeed gives {node.shape}, jds has {leaf.shape}")
            out.append(dataclasses.replace(node, dtype=leaf.dtype))
        elif kind != "param" and names and names[-1] == "count" and leaf.shape == ():
            out.append(_scalar(step, leaf.dtype))
        else:
            raise ValueError(
                f"{where} ({leaf.dtype}{list(leaf.shape)}) has no DeepSpeed counterpart jds "
                "knows (only Adam/AdamW moments and step counts map); convert without "
                "--optimizer to take the weights only"
            )
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = [
    "deepspeed_to_orbax",
    "hf_to_orbax",
    "orbax_to_hf",
    "orbax_to_safetensors",
]
