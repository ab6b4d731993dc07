"""Reading a jds Orbax checkpoint one array at a time, on the host, without a mesh.

``OrbaxCheckpoint(path)`` opens a checkpoint root (newest intact step, or ``step=``) or one
step directory, verifies it against its integrity manifest, and reads single arrays with
Orbax's partial restore into numpy. The fp32 weights are ``master`` when the run trained in
mixed precision, else ``params``. One stacked array is cached, so ``reader()`` serves layer
slices of it without re-reading: peak memory is the largest single array (e.g. one MLP
weight over all layers), not the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jds.checkpoint.integrity import CheckpointCorruptError, verify_integrity
from jds.checkpoint.recovery import checkpoint_root
from jds.models.registry import config_from_dict


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_leaf_paths(v, (*prefix, str(k))))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out.update(_leaf_paths(v, (*prefix, str(i))))
    elif tree is not None:
        out[prefix] = tree
    return out


class OrbaxCheckpoint:
    """One step of a jds checkpoint, read array by array.

    Args:
      path: a checkpoint root (``.../checkpoints``), one step directory in it, or the
        ``jds train`` run folder that holds it.
      step: the step under a root; default the newest step that verifies.
      verify: check the integrity manifest first.

    Raises:
      FileNotFoundError: no checkpoint, or no such step.
      CheckpointCorruptError: damaged files (named).
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None, *,
                 verify: bool = True) -> None:
        # a jds train run folder stands for its checkpoints folder (as in jds serve)
        path = Path(checkpoint_root(path)).resolve()  # Orbax needs an absolute path
        if (path / "state").is_dir():
            step_dirs = [path]
        elif path.is_dir():
            steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()
                            and (p / "state").is_dir()), reverse=True)
            if step is not None:
                if step not in steps:
                    raise FileNotFoundError(
                        f"no step {step} in {path}; available: {sorted(steps)}")
                steps = [step]
            step_dirs = [path / str(s) for s in steps]
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if not step_dirs:
            raise FileNotFoundError(f"no jds checkpoint in {path} (no <step>/state directory)")
        errors = []
        for d in step_dirs:
            try:
                if verify:
                    verify_integrity(d)
                self.dir = d
                break
            except CheckpointCorruptError as e:
                errors.append(str(e))
        else:
            raise CheckpointCorruptError("\n".join(errors))
        self._ckptr = ocp.PyTreeCheckpointer()
        meta_file = self.dir / "meta" / "metadata"
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() \
                else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointCorruptError(f"{meta_file} is damaged ({e})") from e
        # The handler, not the checkpointer: a step's _CHECKPOINT_METADATA lies one level up
        # (the manager writes it beside ``state``), and the checkpointer would warn that it
        # is missing from ``state`` on every correct checkpoint.
        tree = ocp.PyTreeCheckpointHandler().metadata(self.dir / "state").tree
        self.arrays: dict[tuple[str, ...], Any] = _leaf_paths(tree)
        self._cache: tuple[tuple[str, ...], np.ndarray] | None = None
        self._sliced: dict[tuple[str, ...], Any] = {}

    @property
    def weights_key(self) -> str:
        """``master`` (fp32 under mixed precision) if present, else ``params``."""
        return "master" if any(p[0] == "master" for p in self.arrays) else "params"

    def model_config(self) -> Any:
        """The model's jds config stored with the checkpoint.

        Raises:
          ValueError: the checkpoint predates model metadata (say which model instead).
        """
        model = self.meta.get("model")
        if model is None:
            raise ValueError(
                f"{self.dir} stores no model config (meta.model); give the model explicitly "
                "(jds convert ... --model PRESET_OR_HF_DIR)"
            )
        return config_from_dict(model)

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        """One whole array by its path, e.g. ``("params", "layers", "wq")``."""
        path = tuple(path)
        if self._cache is not None and self._cache[0] == path:
            return self._cache[1]
        if path not in self.arrays:
            raise KeyError(f"{self.dir} has no array {'/'.join(path)}")
        self._cache = None  # drop the previous array before reading the next
        item: dict = {}
        args: dict = {}
        node, anode = item, args
        for k in path[:-1]:
            node = node.setdefault(k, {})
            anode = anode.setdefault(k, {})
        node[path[-1]] = self.arrays[path]
        anode[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        try:
            out = self._ckptr.restore(
                self.dir / "state",
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
            )
        except Exception as e:  # TensorStore errors arrive as bare Exceptions
            raise CheckpointCorruptError(
                f"{self.dir}: reading {'/'.join(path)} failed: {str(e).splitlines()[0][:300]}"
            ) from e
        for k in path:
            out = out[k]
        value = np.asarray(out)
        self._cache = (path, value)
        return value

    def _open_sliced(self, path: tuple[str, ...]) -> Any | None:
        """A TensorStore view of an array stored one leading-axis slice per chunk (as
        ``jds convert`` writes stacked layers), or None (read the array whole instead).

        Such an array's layer ``l`` is one chunk: reading it touches nothing else, so peak
        memory is one layer. Arrays chunked otherwise (a training checkpoint's per-device
        shards span every layer) are read whole, once, as before.
        """
        if path in self._sliced:
            return self._sliced[path]
        import tensorstore as ts

        state = self.dir / "state"
        name = ".".join(path)
        kv = ({"driver": "ocdbt", "base": f"file://{state}", "path": name}
              if (state / "manifest.ocdbt").exists()
              else {"driver": "file", "path": str(state / name)})
        view = None
        for driver in ("zarr", "zarr3"):
            try:
                t = ts.open({"driver": driver, "kvstore": kv}, open=True).result()
            except Exception:  # noqa: BLE001 - another layout: fall back to a whole read
                continue
            chunk = t.chunk_layout.read_chunk.shape
            if t.ndim and chunk is not None and chunk[0] == 1:
                view = t
            break
        self._sliced[path] = view
        return view

    def read_layer(self, path: tuple[str, ...], layer: int) -> np.ndarray:
        """Slice ``layer`` of a stacked array, reading only that slice when it is its own
        chunk (``_open_sliced``), else from the whole array (read once, cached)."""
        view = self._open_sliced(tuple(path))
        if view is None:
            return self.read(path)[layer]
        try:
            return np.asarray(view[layer].read().result())
        except Exception as e:  # TensorStore errors arrive as bare Exceptions
            raise CheckpointCorruptError(
                f"{self.dir}: reading {'/'.join(path)}[{layer}] failed: "
                f"{str(e).splitlines()[0][:300]}") from e

    def lora_scale(self) -> float | None:
        """The adapters' scale (``alpha / r``) from the stored config, or None without LoRA."""
        section = (self.meta.get("config") or {}).get("lora") or {}
        if not section.get("enabled"):
            return None
        r = int(section.get("r", 8))
        alpha = float(section.get("alpha") or r)
        return alpha / (r ** 0.5 if section.get("use_rslora") else r)

    def _nf4(self, path: tuple[str, ...], codes: np.ndarray, parts: list[np.ndarray], *,
             stacked: bool) -> np.ndarray:
        """An NF4-stored matrix expanded to fp32, its input dims from the model's shapes."""
        import jax
        from flax import nnx

        from jds.kernels.quant.nf4 import NF4Weight, dequantize_nf4
        from jds.models.registry import model_class

        cfg = self.model_config()
        abstract = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
        node = abstract
        for k in path:
            node = getattr(node, k)
        full = tuple(node.shape)[1:]  # one layer's [*in, *out]
        n_out = codes.ndim - (2 if stacked else 1)
        in_shape = full[:len(full) - n_out]

        def expand(c, a, sc, mu):
            return dequantize_nf4(NF4Weight(c, a, sc, mu, in_shape))

        fn = jax.vmap(expand) if stacked else expand
        return np.asarray(fn(codes, *parts))

    def reader(self, key: str | None = None, *, merge_lora: bool = False):
        """``read(path, layer)`` over the weights, for ``save_hf`` and friends.

        A LoRA run's checkpoint keeps the frozen base under ``frozen`` (int8 with
        ``model_state`` scales under QLoRA) and the adapters under ``master``/``params``:
        with ``merge_lora`` each adapted matrix is read as ``W + scale * A @ B``
        (``jds.lora.merge``'s arithmetic, one layer at a time); without it such a
        checkpoint is refused, since its base alone is not the trained model.
        """
        key = key or self.weights_key
        scale = self.lora_scale()

        def one(path: tuple[str, ...], layer: int | None) -> np.ndarray:
            if layer is None:
                return self.read(path)
            return self.read_layer(path, layer)

        def read(path: tuple[str, ...], layer: int | None) -> np.ndarray:
            # trained, frozen, or model state (e.g. a layer's static activation ranges)
            where = next((w for w in ((key, *path), ("frozen", *path), ("model_state", *path))
                          if w in self.arrays), (key, *path))
            w = one(where, layer)
            *parent, name = path
            nf4 = [("model_state", *parent, name + sfx)
                   for sfx in ("_nf4_absmax", "_nf4_scale", "_nf4_mean")]
            if nf4[0] in self.arrays:  # QLoRA's NF4 base: the reference dequantizer
                w = self._nf4(path, w, [one(p, layer) for p in nf4], stacked=layer is None)
            qscale = ("model_state", *parent, name + "_qscale")
            if qscale in self.arrays:  # QLoRA's int8 base: dequantize per output channel
                s = one(qscale, layer).astype(np.float32)  # [*out] or [L, *out]
                if layer is None:
                    s = s.reshape(s.shape[:1] + (1,) * (w.ndim - s.ndim) + s.shape[1:])
                w = w.astype(np.float32) * s
            a_path = (key, *parent, name + "_lora_a")
            if a_path in self.arrays:
                if not merge_lora:
                    raise ValueError(
                        f"{self.dir} is a LoRA run's checkpoint: {'/'.join(path)} has an "
                        "adapter. Write the merged model with --merge-lora (jds convert "
                        "orbax-to-hf --merge-lora), or use the run's PEFT folder (OUT/adapter)")
                a = one(a_path, layer).astype(np.float32)
                b = one((key, *parent, name + "_lora_b"), layer).astype(np.float32)
                lead = a.shape[:1] if layer is None else ()
                a2 = a.reshape(*lead, -1, a.shape[-1])
                b2 = b.reshape(*lead, b.shape[len(lead)], -1)
                w = w.astype(np.float32) + (scale or 1.0) * np.matmul(a2, b2).reshape(w.shape)
            return w

        return read

    def weight_paths(self, key: str | None = None) -> list[tuple[str, ...]]:
        """Paths (without the ``params``/``master`` prefix) of every weight array."""
        key = key or self.weights_key
        return [p[1:] for p in self.arrays if p[0] == key]


__all__ = ["OrbaxCheckpoint"]
