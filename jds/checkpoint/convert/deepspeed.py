"""Read DeepSpeed ZeRO-1/2/3 checkpoints: full fp32 weights and Adam moments, per parameter.

A DeepSpeed checkpoint (``engine.save_checkpoint(root, tag)``) is a directory ``root/tag/``
(``root/latest`` names the newest tag) holding, for ``W`` data-parallel ranks:

- ZeRO-1/2: one ``mp_rank_00_model_states.pt`` and, per rank ``r``,
  ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``;
- ZeRO-3: per rank both ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` and
  ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``.

The model states hold ``param_shapes`` (one ordered ``name -> shape`` dict per parameter group,
in the order the parameters were flattened), ``buffer_names``, ``shared_params``, frozen
parameters, ``global_steps`` and ``ds_config``. The fp32 master weights live only in the optimizer
files, flattened and partitioned; :class:`DeepSpeedCheckpoint` reassembles each parameter the way
DeepSpeed's own ``deepspeed/utils/zero_to_fp32.py`` does (its logic reproduced here, not
imported, so DeepSpeed need not be installed):

- ZeRO-1/2: per group, the full flat vector is the concatenation of every rank's
  ``single_partition_of_fp32_groups[g]`` (DeepSpeed trims the alignment padding off the tail
  before saving). Parameters lie back to back in ``param_shapes`` order, each followed by
  ``param_alignment_paddings[g][i]`` elements when that key is present; the consumed length,
  rounded up to ``2 * W``, must equal the available length rounded the same way.
- ZeRO-3: every parameter is split on its own: each rank holds ``ceil(numel / W)`` elements of
  it (the last ranks zero-padded), the ranks' pieces lying at the same offset of their
  ``fp32_flat_groups`` (sub-groups concatenated). A parameter is the concatenation over ranks of
  its pieces, cut to ``numel``.

Adam's ``exp_avg`` / ``exp_avg_sq`` are partitioned exactly like the fp32 weights (ZeRO-1/2:
``base_optimizer_state``, ZeRO-3: ``optimizer_state_dict``, one state per flat group), so
:meth:`DeepSpeedCheckpoint.moments` reassembles them the same way.

Safety: every file is read with :func:`safe_torch_load`, i.e. ``torch.load(weights_only=True)``
with an allow-list of the few plain DeepSpeed records these files contain, bound to inert jds
stand-ins. jds never unpickles arbitrary objects and never imports DeepSpeed to read them.

Memory: the files are opened with ``mmap=True``; the partitions stay on disk (in the page cache
as they are touched) and :meth:`~DeepSpeedCheckpoint.fp32` copies only the slices of one
parameter into a new array, so the peak resident memory is one parameter (two for
:meth:`~DeepSpeedCheckpoint.moments`) plus the pickled metadata, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import pickle
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALLOWED_PICKLE_TYPES", "DeepSpeedCheckpoint", "safe_torch_load"]


# --- the allow-list: DeepSpeed's records, bound to inert jds stand-ins ------------------------


class ZeroStage(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (pickled as its int value)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:
    """Stand-in for DeepSpeed's ``LossScaler``: a plain record of the pickled attributes."""


class DynamicLossScaler(LossScaler):
    """Stand-in for DeepSpeed's ``DynamicLossScaler`` (fp16 dynamic loss scaling)."""


@dataclasses.dataclass
class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (ZeRO-1/2 slices)."""

    numel: int
    start: int


# Exactly the non-tensor types DeepSpeed 0.19 pickles into ZeRO checkpoints beyond what
# ``weights_only`` allows by default (OrderedDict, torch.Size, tensors): found by loading real
# ZeRO-1/2/3 checkpoints. DynamicLossScaler is what the same ``loss_scaler`` field holds under
# fp16 with dynamic loss scaling.
ALLOWED_PICKLE_TYPES: dict[str, type] = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStage,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": DynamicLossScaler,
    "deepspeed.utils.tensor_fragment.fragment_address": FragmentAddress,
}

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "reading DeepSpeed checkpoints needs PyTorch (for its file format only): "
            "pip install jds[convert]"
        ) from err
    return torch


def safe_torch_load(path: str | Path) -> Any:
    """Load a ``torch.save`` file without running code from it.

    ``torch.load(path, map_location="cpu", weights_only=True, mmap=True)`` inside
    ``torch.serialization.safe_globals`` holding only :data:`ALLOWED_PICKLE_TYPES`, each mapped
    to a jds stand-in (DeepSpeed is never imported). Files in the legacy (non-zip) format cannot
    be memory-mapped and are read without ``mmap``.

    Args:
        path: a ``.pt`` file.

    Returns:
        The unpickled object: dicts, lists, tensors (memory-mapped), numbers, strings and the
        stand-in records.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file pickles a type outside the allow-list (named in the message).
        ImportError: PyTorch is not installed.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    allowed = [(cls, name) for name, cls in ALLOWED_PICKLE_TYPES.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _REFUSED_GLOBAL.search(str(err))
        what = found.group(1) if found else "an object outside the allow-list"
        raise ValueError(
            f"{path}: refusing to unpickle {what}. jds never unpickles arbitrary objects: it "
            "loads checkpoints with torch.load(weights_only=True) and allows only tensors, "
            f"plain containers and {sorted(ALLOWED_PICKLE_TYPES)}. Details: "
            f"{str(err).splitlines()[-1] if str(err) else err!r}"
        ) from err


# --- flat partitions ------------------------------------------------------------------------


def _as_numpy(tensor) -> np.ndarray:
    """A numpy view of a 1-D CPU tensor (bf16/fp16 upcast to fp32, an exact conversion)."""
    torch = _torch()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.detach().numpy()


class _Concat:
    """The concatenation of 1-D tensors, read by range without building it."""

    def __init__(self, pieces: Sequence[Any]):
        self.pieces = list(pieces)
        sizes = [int(p.numel()) for p in self.pieces]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    @property
    def numel(self) -> int:
        return int(self.starts[-1])

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Copy elements ``[start, start + out.size)`` into ``out``."""
        stop = start + out.size
        if stop > self.numel:
            raise ValueError(f"range [{start}, {stop}) runs past the {self.numel} stored elements")
        for i, piece in enumerate(self.pieces):
            lo, hi = max(start, int(self.starts[i])), min(stop, int(self.starts[i + 1]))
            if lo < hi:
                local = lo - int(self.starts[i])
                out[lo - start : hi - start] = _as_numpy(piece[local : local + hi - lo])


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one trainable parameter lies: flat group ``group`` from ``offset``, ``numel`` long."""

    group: int
    offset: int
    numel: int
    shape: tuple[int, ...]


# ``{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``; prefix "bf16_" for bf16 runs.
_RANK_FILE = re.compile(
    r"^(?P<prefix>.*zero_pp_rank_)(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$"
)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class DeepSpeedCheckpoint:
    """A DeepSpeed ZeRO-1/2/3 checkpoint, read per parameter without DeepSpeed.

    Args:
        path: the checkpoint root (``save_dir`` of ``engine.save_checkpoint``; its ``latest``
            file names the tag when ``tag`` is None) or one tag directory (``global_stepN``).
        tag: the tag directory under ``path`` to read.

    Raises:
        FileNotFoundError: the directory, the tag or a rank's file is missing (named).
        ValueError: ``path`` is not a DeepSpeed ZeRO checkpoint, or its files contradict each
            other (stage, world size, parameter layout).
    """

    def __init__(self, path: str | Path, tag: str | None = None):
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"DeepSpeed checkpoint directory {root} does not exist")
        if tag is not None:
            ckpt_dir = root / tag
        elif (root / "latest").is_file():
            tag = (root / "latest").read_text().strip()
            ckpt_dir = root / tag
        elif any(root.glob("*_states.pt")):
            ckpt_dir = root
        else:
            raise ValueError(
                f"{root} is not a DeepSpeed checkpoint: it has no 'latest' file naming a tag and "
                "no *_optim_states.pt / *_model_states.pt files. Pass the save_dir given to "
                "engine.save_checkpoint, or its global_stepN directory."
            )
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(f"DeepSpeed checkpoint tag directory {ckpt_dir} does not exist")
        self.dir = ckpt_dir
        self._optim = self._load_rank_files()
        self._model = self._load_model_files()
        self._check_model_states()
        self._slots = self._index_trainable()

    # --- loading and checks -------------------------------------------------------------

    def _load_rank_files(self) -> list[dict]:
        files = sorted(self.dir.glob("*_optim_states.pt"), key=lambda p: _natural_key(p.name))
        if not files:
            model_files = sorted(p.name for p in self.dir.glob("*_model_states.pt"))
            hint = (
                f" It has {model_files}: a checkpoint without ZeRO (stage 0) keeps the optimizer "
                "inside the model states, which this reader does not handle."
                if model_files
                else ""
            )
            raise ValueError(f"{self.dir} holds no *_optim_states.pt ZeRO partition files.{hint}")
        ranks: dict[int, Path] = {}
        prefix = None
        for file in files:
            match = _RANK_FILE.match(file.name)
            if match is None:
                raise ValueError(f"{file}: not a DeepSpeed ZeRO partition file name")
            if int(match["mp"]) != 0:
                raise ValueError(
                    f"{file}: model-parallel rank {int(match['mp'])}; only mp_rank_00 "
                    "(no tensor/pipeline parallelism) checkpoints are supported"
                )
            ranks[int(match["rank"])] = file
            prefix = match["prefix"]
        first = safe_torch_load(files[0])
        stage, world_size = self._zero_header(first, files[0])
        expected = {
            r: self.dir / f"{prefix}{r}_mp_rank_00_optim_states.pt" for r in range(world_size)
        }
        missing = [str(p) for r, p in expected.items() if r not in ranks]
        if missing:
            raise FileNotFoundError(
                f"missing ZeRO partition file(s) {missing}: {files[0].name} records a "
                f"data-parallel world size of {world_size}, so ranks 0..{world_size - 1} must each "
                "have one (a rank did not finish saving, or files were lost in a copy)"
            )
        extra = sorted(r for r in ranks if r >= world_size)
        if extra:
            raise ValueError(
                f"{self.dir}: partition files for ranks {extra}, but {files[0].name} records a "
                f"world size of {world_size} (files from two different runs?)"
            )
        states = []
        for r in range(world_size):
            state = first if ranks[r] == files[0] else safe_torch_load(ranks[r])
            if self._zero_header(state, ranks[r]) != (stage, world_size):
                raise ValueError(
                    f"{ranks[r]} records ZeRO stage/world size {self._zero_header(state, ranks[r])}"
                    f", {files[0].name} records {(stage, world_size)}: files from different runs"
                )
            states.append(state[_OPT])
        self._stage, self._world_size = stage, world_size
        self._optim_files = [ranks[r] for r in range(world_size)]
        return states

    @staticmethod
    def _zero_header(state: Any, file: Path) -> tuple[int, int]:
        if not isinstance(state, dict) or not isinstance(state.get(_OPT), dict):
            raise ValueError(f"{file} is not a DeepSpeed ZeRO optimizer-state file (no '{_OPT}')")
        opt = state[_OPT]
        if "zero_stage" not in opt or "partition_count" not in opt:
            raise ValueError(f"{file} has no zero_stage / partition_count: not a ZeRO checkpoint")
        stage = int(opt["zero_stage"])
        count = opt["partition_count"]
        world_size = max(int(c) for c in count) if isinstance(count, list) else int(count)
        if stage not in (1, 2, 3):
            raise ValueError(f"{file}: unknown ZeRO stage {stage} (expected 1, 2 or 3)")
        return stage, world_size

    def _load_model_files(self) -> list[dict]:
        if self._stage <= 2:
            names = ["mp_rank_00_model_states.pt"]
        else:
            names = [
                f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self._world_size)
            ]
        states = []
        for name in names:
            file = self.dir / name
            if not file.is_file():
                present = sorted(p.name for p in self.dir.glob("*_model_states.pt"))
                raise FileNotFoundError(
                    f"missing model-states file {file}: the optimizer files record ZeRO stage "
                    f"{self._stage} with {self._world_size} ranks, which writes {names}; the "
                    f"directory has {present}"
                )
            state = safe_torch_load(file)
            if not isinstance(state, dict) or "param_shapes" not in state:
                raise ValueError(f"{file} is not a DeepSpeed model-states file (no param_shapes)")
            states.append(state)
        return states

    def _check_model_states(self) -> None:
        head = self._model[0]
        dp = head.get("dp_world_size")
        if dp is not None and int(dp) != self._world_size:
            raise ValueError(
                f"{self.dir}: model states record dp_world_size={dp}, the optimizer files "
                f"{self._world_size} partitions"
            )
        config = head.get("ds_config")
        if isinstance(config, dict):
            stage = config.get("zero_optimization", {}).get("stage")
            if stage is not None and int(stage) != self._stage:
                raise ValueError(
                    f"{self.dir}: ds_config says zero_optimization.stage={stage}, the optimizer "
                    f"files were written by ZeRO stage {self._stage}"
                )
        if not isinstance(head["param_shapes"], list) or not head["param_shapes"]:
            raise ValueError(f"{self.dir}: param_shapes is empty: nothing was trained")

    def _index_trainable(self) -> dict[str, _Slot]:
        groups = self._model[0]["param_shapes"]
        if self._stage <= 2:
            return self._index_zero12(groups)
        return self._index_zero3(groups)

    def _index_zero12(self, groups: list) -> dict[str, _Slot]:
        flats = [opt[_FP32_12] for opt in self._optim]
        if any(len(f) != len(groups) for f in flats):
            raise ValueError(
                f"{self.dir}: param_shapes has {len(groups)} groups, the optimizer files "
                f"{[len(f) for f in flats]}"
            )
        paddings = self._optim[0].get("param_alignment_paddings")
        self._fp32 = [_Concat([flat[g] for flat in flats]) for g in range(len(groups))]
        slots: dict[str, _Slot] = {}
        align = 2 * self._world_size
        for g, shapes in enumerate(groups):
            pads = paddings[g] if paddings is not None else None
            if pads is not None and len(pads) != len(shapes):
                raise ValueError(
                    f"{self.dir}: group {g} has {len(shapes)} parameters but "
                    f"{len(pads)} param_alignment_paddings"
                )
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                slots[name] = _Slot(g, offset, numel, tuple(int(d) for d in shape))
                offset += numel + (int(pads[i]) if pads is not None else 0)
            avail = self._fp32[g].numel
            # DeepSpeed aligns each group to 2 * world_size elements (zero_to_fp32's check).
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise ValueError(
                    f"{self.dir}: group {g}'s parameters take {offset} elements but the ranks "
                    f"store {avail}: param_shapes and the partitions disagree"
                )
        return slots

    def _index_zero3(self, groups: list) -> dict[str, _Slot]:
        flats = [opt[_FP32_3] for opt in self._optim]
        self._fp32 = [_Concat(flat) for flat in flats]  # one per rank, sub-groups concatenated
        if len({c.numel for c in self._fp32}) != 1:
            raise ValueError(
                f"{self.dir}: ZeRO-3 ranks store {[c.numel for c in self._fp32]} elements; "
                "every rank's partition must be the same size"
            )
        slots: dict[str, _Slot] = {}
        offset = 0
        for shapes in groups:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                slots[name] = _Slot(-1, offset, numel, tuple(int(d) for d in shape))
                offset += math.ceil(numel / self._world_size)
        if offset != self._fp32[0].numel:
            raise ValueError(
                f"{self.dir}: ZeRO-3 parameters take {offset} elements per rank but each rank "
                f"stores {self._fp32[0].numel}: param_shapes and the partitions disagree"
            )
        return slots

    # --- metadata ---------------------------------------------------------------------------

    @property
    def stage(self) -> int:
        """The ZeRO stage (1, 2 or 3) the optimizer files were written by."""
        return self._stage

    @property
    def world_size(self) -> int:
        """The data-parallel world size (number of partitions)."""
        return self._world_size

    @property
    def step(self) -> int:
        """Optimizer steps taken (Adam's ``step``; skipped fp16-overflow steps not counted)."""
        steps = set()
        for opt in self._optim:
            for state in self._base_states(opt):
                if "step" in state:
                    steps.add(int(state["step"]))
            if "base_optimizer_state_step" in opt:
                steps.add(int(opt["base_optimizer_state_step"]))
        if len(steps) > 1:
            raise ValueError(f"{self.dir}: ranks/groups record different steps {sorted(steps)}")
        return steps.pop() if steps else 0

    @property
    def global_steps(self) -> int | None:
        """``engine.global_steps`` at the save (counts fp16-overflow skipped steps too)."""
        value = self._model[0].get("global_steps")
        return None if value is None else int(value)

    @property
    def param_shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        """Trainable parameters, ``name -> shape``, in DeepSpeed's flattening order."""
        return OrderedDict((name, slot.shape) for name, slot in self._slots.items())

    @property
    def ds_config(self) -> dict | None:
        """The DeepSpeed config stored with the checkpoint, or None if it was not stored."""
        config = self._model[0].get("ds_config")
        return config if isinstance(config, dict) else None

    def _buffers(self) -> list[str]:
        module = self._model[0].get("module") or {}
        return [name for name in module if name in set(self._model[0].get("buffer_names") or [])]

    def _frozen(self) -> dict[str, tuple[int, ...]]:
        shapes = self._model[0].get("frozen_param_shapes") or {}
        return {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}

    def _shared(self) -> dict[str, str]:
        return dict(self._model[0].get("shared_params") or {})

    def names(self) -> list[str]:
        """Every name :meth:`fp32` returns, in ``zero_to_fp32``'s order.

        Buffers, then frozen parameters, then trainable ones, then shared (tied) aliases whose
        target is present.
        """
        names = [*self._buffers(), *self._frozen(), *self._slots]
        present = set(names)
        for alias, target in self._shared().items():
            if target in present and alias not in present:
                names.append(alias)
                present.add(alias)
        return names

    # --- tensors ----------------------------------------------------------------------------

    def _resolve(self, name: str) -> str:
        if name in self._slots or name in self._frozen() or name in self._buffers():
            return name
        target = self._shared().get(name)
        if target is not None and target in self.names():
            return target
        raise KeyError(f"{name!r} is not in checkpoint {self.dir}; see DeepSpeedCheckpoint.names()")

    def fp32(self, name: str) -> np.ndarray:
        """The full fp32 value of parameter (or buffer) ``name``, reassembled from the ranks.

        Buffers come from the model states as stored (floating ones upcast to fp32), frozen
        parameters from their fragments, trainable ones from the fp32 master partitions.
        """
        name = self._resolve(name)
        if name in self._slots:
            return self._gather(self._slots[name], self._fp32)
        if name in self._frozen():
            return self._frozen_value(name)
        value = self._model[0]["module"][name]
        return _as_numpy(value.float() if value.is_floating_point() else value).copy()

    def moments(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Adam's ``(exp_avg, exp_avg_sq)`` for trainable parameter ``name``, full shape."""
        name = self._resolve(name)
        if name not in self._slots:
            raise ValueError(f"{name!r} is a buffer or frozen parameter: it has no optimizer state")
        return tuple(self._gather(self._slots[name], self._moment(key)) for key in _MOMENTS)

    def _gather(self, slot: _Slot, flat: list[_Concat]) -> np.ndarray:
        out = np.empty(slot.numel, dtype=np.float32)
        if self._stage <= 2:
            flat[slot.group].read_into(slot.offset, out)
        else:
            per_rank = math.ceil(slot.numel / self._world_size)
            for r in range(self._world_size):
                lo = r * per_rank
                n = min(per_rank, slot.numel - lo)
                if n > 0:
                    flat[r].read_into(slot.offset, out[lo : lo + n])
        return out.reshape(slot.shape)

    def _frozen_value(self, name: str) -> np.ndarray:
        shape = self._frozen()[name]
        numel = math.prod(shape)
        # ZeRO-1/2: the whole tensor in the one model-states file; ZeRO-3: each rank's
        # ceil(numel / W) elements in its own, zero-padded at the end.
        frags = [_as_numpy(m["frozen_param_fragments"][name].reshape(-1)) for m in self._model]
        value = np.concatenate(frags)[:numel]
        if value.size != numel:
            raise ValueError(f"{self.dir}: frozen {name} has {value.size} of {numel} elements")
        return value.astype(np.float32, copy=False).reshape(shape)

    def _base_states(self, opt: dict) -> list[dict]:
        """Per flat group (ZeRO-3: per sub-group), the inner optimizer's state dict."""
        base = opt.get("base_optimizer_state") if self._stage <= 2 else opt.get(_OPT)
        if isinstance(base, list):  # ZeRO-1/2 elastic checkpoint: one state per group
            return base
        if not isinstance(base, dict) or "state" not in base:
            return []
        # One flat tensor per group: its index in param_groups order keys its state.
        order = [i for group in base.get("param_groups", []) for i in group["params"]]
        return [base["state"][i] for i in order if i in base["state"]]

    def _moment(self, key: str) -> list[_Concat]:
        per_rank = []
        for r, opt in enumerate(self._optim):
            states = self._base_states(opt)
            fp32_groups = opt[_FP32_12 if self._stage <= 2 else _FP32_3]
            if len(states) != len(fp32_groups) or any(key not in s for s in states):
                found = sorted({k for s in states for k in s}) if states else []
                raise ValueError(
                    f"{self._optim_files[r]}: no '{key}' for each of its {len(fp32_groups)} flat "
                    f"groups (optimizer state keys: {found}); moments() reads Adam/AdamW states"
                )
            per_rank.append([s[key].reshape(-1) for s in states])
        if self._stage <= 2:
            return [_Concat([pieces[g] for pieces in per_rank]) for g in range(len(per_rank[0]))]
        return [_Concat(pieces) for pieces in per_rank]


_OPT = "optimizer_state_dict"
_FP32_12 = "single_partition_of_fp32_groups"
_FP32_3 = "fp32_flat_groups"
_MOMENTS = ("exp_avg", "exp_avg_sq")
