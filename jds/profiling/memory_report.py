"""Memory and sharding reports: the library behind ``jds estimate`` and ``jds explain``.

Both commands build a ``TrainEngine(..., shapes_only=True)`` for a preset and a config on N
*simulated CPU devices*: nothing is materialised, only shapes and shardings exist, so a 7B
model on 64 devices fits a laptop.

- ``explain_report`` lists every parameter: its logical axes and the ``PartitionSpec`` and
  per-device bytes of its compute copy, its gradient and its optimizer state, read from the
  engine's ZeRO plan (``engine.zero``), i.e. exactly the layout training would use.
- ``estimate_report`` puts the formulas of ``jds.partitioning.memory`` (the ZeRO paper's
  table for stages 0-3 and the config's layout, and DeepSpeed's own estimators) next to the
  compiled truth: the state's shard bytes and ``memory_analysis()`` of the AOT-compiled
  train step, activations included.

**Why simulated CPU devices, and how they are obtained.** The compile needs real devices for
its mesh, N of them, on any machine; XLA's CPU client can pretend to have any number
(``jax_num_cpu_devices``, the successor of ``XLA_FLAGS=--xla_force_host_platform_device_count``),
but only before the first JAX backend starts, once per process. The CLI therefore sets it
when it owns a fresh process (``configure_cpu_devices``: JAX was not imported before the
CLI). When JAX is
already running — ``jds.cli.main`` called from Python, e.g. in tests — ``cpu_devices``
uses the first N of the existing CPU devices if there are enough, and otherwise the CLI
re-runs the same command in a fresh ``python -m jds.cli`` process. The alternative,
``jax.sharding.AbstractMesh``, lowers without devices but cannot be compiled, and the
compiled ``memory_analysis()`` is the point. Memory numbers are the XLA CPU compiler's
buffer assignment: state and argument bytes are exact for any backend; ``temp`` is close
to, not equal to, what the GPU or TPU compiler assigns (different fusion decisions). With
``--target h100`` the step is compiled by XLA:GPU for compile-only H100s instead
(``jds.partitioning.targets``), and the numbers are that compiler's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jds.config import Config
from jds.engine import TrainEngine
from jds.models.adapters import frozen_param_count
from jds.partitioning.axes import AXIS_LETTERS
from jds.partitioning.memory import (
    CompiledMemory,
    compiled_memory,
    deepspeed_estimates,
    model_states_for_groups,
    model_states_per_device,
    shard_bytes,
    state_memory,
)
from jds.partitioning.mesh import data_parallel_size

# Without --config: bf16 mixed precision (the ZeRO table's setting), one sequence per device.
DEFAULT_CONFIG: dict[str, Any] = {"bf16": {"enabled": True}}
GRAD_BYTES = 4  # jds accumulates, clips and applies gradients in fp32 (train_step.py)
SUBPROCESS_ENV = "JDS_SIMULATED_DEVICES"  # set in a re-run process: it must not re-run again


# ------------------------------------------------------------------ devices and engine
def simulated_env(n_devices: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a fresh process that compiles for ``n_devices`` simulated CPU devices.

    ``JAX_NUM_CPU_DEVICES`` takes precedence over any ``--xla_force_host_platform_device_count``
    already in ``XLA_FLAGS`` (the test suite sets 8 there).
    """
    out = dict(os.environ if env is None else env)
    out.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n_devices),
               **{SUBPROCESS_ENV: str(n_devices)})
    return out


def configure_cpu_devices(n_devices: int) -> None:
    """Make this process's JAX a CPU-only backend with ``n_devices`` devices.

    Only possible before JAX's first computation in the process (``jds.cli`` calls it when
    it imported JAX itself).

    Raises:
      RuntimeError: JAX's backends already started (use ``cpu_devices`` or a fresh process).
    """
    jax.config.update("jax_num_cpu_devices", n_devices)
    jax.config.update("jax_platforms", "cpu")


def cpu_devices(n_devices: int) -> list[jax.Device] | None:
    """The first ``n_devices`` CPU devices of this process, or None if it has fewer.

    Raises:
      ValueError: ``n_devices`` below 1.
    """
    if n_devices < 1:
        raise ValueError(f"--devices {n_devices}: need at least one device")
    try:
        devices = jax.devices("cpu")
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
        return None
    return list(devices[:n_devices]) if len(devices) >= n_devices else None


def load_config(
    config: str | os.PathLike | Mapping | Config | None,
    *,
    stage: int | None = None,
    pipeline: Mapping[str, Any] | None = None,
    offload_optimizer: str | None = None,
) -> Config:
    """The config an estimate or explanation runs with.

    ``None`` is ``DEFAULT_CONFIG`` (bf16). ``stage`` replaces ``zero_optimization.stage``.
    ``pipeline`` overrides the pipeline: ``stages`` (``mesh.stage``), ``schedule``,
    ``virtual_stages`` and ``micro_batches`` (``gradient_accumulation_steps``; the global
    batch follows); None values are left as configured. A config without any batch size
    gets ``train_micro_batch_size_per_gpu=1``.

    Raises:
      ConfigError: an invalid config or stage.
    """
    cfg = Config.load(DEFAULT_CONFIG if config is None else config)
    data = cfg.to_dict()
    if stage is not None:
        data["zero_optimization"] = {**data["zero_optimization"], "stage": stage}
    if offload_optimizer is not None:
        zero = data["zero_optimization"]
        zero.pop("cpu_offload", None)
        zero["offload_optimizer"] = {**(zero.get("offload_optimizer") or {}),
                                     "device": offload_optimizer}
    over = {k: v for k, v in (pipeline or {}).items() if v is not None}
    if "stages" in over:
        data["mesh"] = {**data.get("mesh", {}), "stage": over["stages"]}
        data["pipeline"] = {**data.get("pipeline", {}), "stages": None}
    for key in ("schedule", "virtual_stages"):
        if key in over:
            data["pipeline"] = {**data.get("pipeline", {}), key: over[key]}
    if "micro_batches" in over:
        data["gradient_accumulation_steps"] = over["micro_batches"]
        data["train_batch_size"] = None
        if data.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            data["train_micro_batch_size_per_gpu"] = 1
    if all(data.get(k) in (None, "auto") for k in (
            "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")):
        data["train_micro_batch_size_per_gpu"] = 1
    return Config.load(data)


def model_factory(model: str) -> str | Any:
    """What ``shapes_engine`` builds: a preset name as it is, or for a Hugging Face folder
    a factory of the model its ``config.json`` describes (built abstractly: no weights read).

    Raises:
      ValueError: neither a preset nor a folder with a ``config.json``.
    """
    from jds import models

    if model in models.PRESETS:
        return model
    path = Path(model) / "config.json"
    if not path.is_file():
        presets = ", ".join(sorted(models.PRESETS))
        raise ValueError(f"model {model!r} is neither a preset ({presets}) nor a Hugging Face "
                         "folder with a config.json")
    cfg = models.config_from_hf(json.loads(path.read_text()))
    return lambda: models.model_class(cfg)(cfg, rngs=nnx.Rngs(0))


def shapes_engine(
    model: str,
    config: str | os.PathLike | Mapping | Config | None,
    devices: list[jax.Device],
    *,
    stage: int | None = None,
    pipeline: Mapping[str, Any] | None = None,
    offload_optimizer: str | None = None,
) -> TrainEngine:
    """A ``TrainEngine`` with shapes and shardings only (nothing materialised).

    Args:
      model: a preset name (``jds.models.PRESETS``) or a Hugging Face folder.
      config: ``ds_config.json`` path, dict or ``Config``; None = ``DEFAULT_CONFIG``.
      devices: the mesh's devices (``cpu_devices``).
      stage: replaces ``zero_optimization.stage`` when given.
      pipeline: pipeline overrides (``load_config``).
      offload_optimizer: replaces ``zero_optimization.offload_optimizer.device`` when given.
    """
    cfg = load_config(config, stage=stage, pipeline=pipeline, offload_optimizer=offload_optimizer)
    return TrainEngine(model_factory(model), cfg, devices=devices, shapes_only=True)


# ------------------------------------------------------------------ per-parameter facts
@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter's layout and per-device bytes.

    Attributes:
      path: ``/``-joined tree path (``layers/wq``).
      shape: global shape.
      axes: logical axes.
      specs: ``PartitionSpec`` of ``params`` (compute copy), ``grads`` and ``optimizer``
        (fp32 master and optimizer state).
      nbytes: per-device bytes of ``params``, ``grads`` (fp32) and ``optimizer`` (master
        plus optimizer state).
      zero_dim: the dimension ZeRO splits (-1: kept replicated over the ZeRO group).
      trainable: False for a frozen parameter (no gradient, master copy or optimizer
        state: its ``grads`` and ``optimizer`` specs are None and their bytes 0).
    """

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    specs: dict[str, PartitionSpec | None]
    nbytes: dict[str, int]
    zero_dim: int
    trainable: bool = True


def _path(keys: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def _by_path(tree: Any, is_leaf: Any = None) -> dict[str, Any]:
    return {_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _optimizer_bytes(engine: TrainEngine) -> dict[str, int]:
    """Per-device bytes of the optimizer-state arrays belonging to each parameter."""
    paths = jax.tree_util.tree_map_with_path(lambda p, _: _path(p), engine.state.params)
    out: dict[str, int] = {}

    def add(leaf: Any, path: str) -> Any:
        out[path] = out.get(path, 0) + shard_bytes(leaf)
        return leaf

    optax.tree_map_params(engine.tx, add, engine.state.opt_state, paths,
                          transform_non_params=lambda x: x)
    return out


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_rows(engine: TrainEngine) -> list[ParamRow]:
    """Every parameter of ``engine``'s model with its specs and per-device bytes."""
    mesh, zero = engine.mesh, engine.zero
    axes = _by_path(zero.axes, is_leaf=lambda x: isinstance(x, tuple))
    params = _by_path(engine.state.params)
    master = {} if engine.state.master is None else _by_path(engine.state.master)
    opt = _optimizer_bytes(engine)
    specs = {k: _by_path(getattr(zero, k), is_leaf=_is_spec)
             for k in ("params", "grads", "optimizer")}
    dims = _by_path(zero.dims)
    rows = []
    for path, p in params.items():
        shape = tuple(p.shape)
        grad_shard = NamedSharding(mesh, specs["grads"][path]).shard_shape(shape)
        rows.append(ParamRow(
            path=path,
            shape=shape,
            axes=axes[path],
            specs={k: specs[k][path] for k in specs},
            nbytes={
                "params": shard_bytes(p),
                "grads": math.prod(grad_shard) * GRAD_BYTES,
                "optimizer": (shard_bytes(master[path]) if master else 0) + opt.get(path, 0),
            },
            zero_dim=int(dims[path]),
        ))
    fz = engine.frozen_plan
    f_axes = _by_path(fz.axes, is_leaf=lambda x: isinstance(x, tuple))
    f_specs, f_dims = _by_path(fz.params, is_leaf=_is_spec), _by_path(fz.dims)
    for path, p in _by_path(engine.state.frozen).items():
        rows.append(ParamRow(
            path=path, shape=tuple(p.shape), axes=f_axes[path],
            specs={"params": f_specs[path], "grads": None, "optimizer": None},
            nbytes={"params": shard_bytes(p), "grads": 0, "optimizer": 0},
            zero_dim=int(f_dims[path]), trainable=False,
        ))
    return rows


def _header(engine: TrainEngine, model: str) -> dict[str, Any]:
    layout = engine.zero_layout
    device = engine.mesh.devices.flat[0]
    return {
        "model": model,
        "devices": int(engine.mesh.size),
        # XLA CPU for simulated CPU devices; XLA:GPU for jds estimate --target's cards
        "compiler": "XLA CPU" if device.platform == "cpu" else
                    f"XLA:{device.platform.upper()} for {device.device_kind}",
        "mesh": {k: int(v) for k, v in engine.mesh.shape.items()},
        "precision": engine.config.precision,
        "stage": int(layout.stage),
        "layout": {k: list(getattr(layout, k)) for k in ("params", "grads", "optimizer")},
        "groups": {k: int(v) for k, v in layout.describe(engine.mesh).items()},
    }


def _spec_dict(spec: PartitionSpec) -> list[Any]:
    return [e if e is None or isinstance(e, str) else list(e) for e in spec]


def explain_report(engine: TrainEngine, model: str) -> dict[str, Any]:
    """``jds explain`` as data: the set-up, one entry per parameter, totals."""
    rows = param_rows(engine)
    totals = {k: sum(r.nbytes[k] for r in rows) for k in ("params", "grads", "optimizer")}
    sharded = max(engine.zero_layout.describe(engine.mesh).values()) > 1
    return {
        **_header(engine, model),
        "num_params": sum(math.prod(r.shape) for r in rows),
        "params": [
            {"path": r.path, "shape": list(r.shape), "axes": list(r.axes),
             "specs": {k: None if v is None else _spec_dict(v) for k, v in r.specs.items()},
             "bytes_per_device": r.nbytes, "zero_dim": r.zero_dim, "trainable": r.trainable}
            for r in rows
        ],
        "bytes_per_device": {**totals, "total": sum(totals.values())},
        "replicated_over_zero_group": [r.path for r in rows if r.zero_dim < 0] if sharded
                                      else [],
    }


# ------------------------------------------------------------------ text
def _spec_text(spec: list[Any] | None) -> str:
    """``[None, ["fsdp", "data"], "tensor"]`` -> ``- fsdp+data tensor``; None -> frozen."""
    if spec is None:
        return "(frozen)"
    return " ".join("-" if e is None else e if isinstance(e, str) else "+".join(e)
                    for e in spec) or "(scalar)"


def _axes_text(axes: list[str | None]) -> str:
    return "".join("_" if a is None else AXIS_LETTERS[a] for a in axes) or "-"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


def _layout_text(head: Mapping[str, Any]) -> str:
    parts = []
    for k in ("params", "grads", "optimizer"):
        axes = head["layout"][k]
        parts.append(f"{k} over {'+'.join(axes)} ({head['groups'][k]})" if axes
                     else f"{k} replicated")
    return f"ZeRO-{head['stage']}: " + ", ".join(parts)


# The mesh's pipeline axis is called "stage" in code; printed beside "ZeRO-<stage>" it
# read as a ZeRO stage, so the header calls it what it is.
_MESH_NAMES = {"stage": "pipeline"}


def _setup_line(head: Mapping[str, Any]) -> str:
    mesh = " ".join(f"{_MESH_NAMES.get(k, k)}={v}" for k, v in head["mesh"].items())
    return (f"{head['model']} | {head['devices']} devices | mesh {mesh} | {head['precision']} | "
            + _layout_text(head))


def explain_text(report: Mapping[str, Any]) -> str:
    """``explain_report`` as an aligned table (stable: exact byte counts, no timings)."""
    header = ["param", "shape", "axes", "params spec", "grads spec", "optimizer spec",
              "params B", "grads B", "master+opt B"]
    rows = [[p["path"], "x".join(map(str, p["shape"])), _axes_text(p["axes"]),
             _spec_text(p["specs"]["params"]), _spec_text(p["specs"]["grads"]),
             _spec_text(p["specs"]["optimizer"]),
             *(f"{p['bytes_per_device'][k]:,}" for k in ("params", "grads", "optimizer"))]
            for p in report["params"]]
    tot = report["bytes_per_device"]
    rows.append(["total", f"{report['num_params']:,} params", "", "", "", "",
                 *(f"{tot[k]:,}" for k in ("params", "grads", "optimizer"))])
    lines = [_setup_line(report), *_table(header, rows, right={6, 7, 8})]
    lines.append(f"bytes per device: {tot['total']:,} (grads are fp32 accumulators, live "
                 "during the step only)")
    if report["replicated_over_zero_group"]:
        lines.append("kept replicated over the ZeRO group (no dimension divides): "
                     + ", ".join(report["replicated_over_zero_group"]))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ estimate
def _largest_layer_params(rows: list[ParamRow]) -> int:
    """DeepSpeed's ``largest_layer_params``: the largest parameter of one layer (a stacked
    ``layers`` dimension counts as that many separate layers)."""
    def per_layer(r: ParamRow) -> int:
        n = math.prod(r.shape)
        return n // r.shape[r.axes.index("layers")] if "layers" in r.axes else n
    return max((per_layer(r) for r in rows), default=0)


def _model_parallel_params(engine: TrainEngine) -> int:
    """Parameters per model-parallel rank: elements of each parameter's shard under the
    rules alone (tensor parallelism), before ZeRO."""
    bases = jax.tree.leaves(engine.zero.base, is_leaf=_is_spec)
    shapes = [tuple(p.shape) for p in jax.tree.leaves(engine.state.params)]
    return sum(math.prod(NamedSharding(engine.mesh, s).shard_shape(shape))
               for s, shape in zip(bases, shapes, strict=True))


def estimate_report(
    engine: TrainEngine,
    model: str,
    seq_len: int,
    *,
    compile: bool = True,
    nodes: int = 1,
) -> dict[str, Any]:
    """``jds estimate`` as data: formulas by stage and for the config's layout, DeepSpeed's
    estimators, and (``compile=True``) the compiled train step's memory.

    Args:
      engine: a ``shapes_only`` engine (``shapes_engine``).
      model: the preset name, for the report.
      seq_len: tokens per sequence.
      compile: AOT-compile the train step (seconds); False = formulas only.
      nodes: nodes the data-parallel devices span, for DeepSpeed's per-node CPU estimate.

    Raises:
      ValueError: ``nodes`` does not divide the data-parallel size.
    """
    dp = data_parallel_size(engine.mesh)
    if nodes < 1 or dp % nodes:
        raise ValueError(f"--nodes {nodes} must divide the {dp} data-parallel devices")
    rows = param_rows(engine)
    psi_mp = _model_parallel_params(engine)
    state = state_memory(engine.state)
    # bytes of optimizer state per parameter, from the state itself (Adam 8, Lion 4, ...)
    global_opt = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(engine.state.opt_state) if len(x.shape) > 0)
    psi_trained = sum(math.prod(r.shape) for r in rows if r.trainable)
    opt_bytes = round(global_opt / psi_trained) if psi_trained else 0
    frozen_global = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in
                        jax.tree.leaves((engine.state.frozen, engine.state.model_state)))
    n_frozen = frozen_param_count(engine.state.frozen, engine.state.model_state)
    prec = engine.config.precision
    kw = dict(precision=prec, optimizer_state_bytes=opt_bytes)
    formula = {str(s): model_states_per_device(psi_mp, s, dp, **kw).as_dict() for s in range(4)}
    groups = engine.zero_layout.describe(engine.mesh)
    config_states = model_states_for_groups(psi_mp, groups, **kw)
    formula["config"] = {**config_states.as_dict(),
                         **config_states.placement(engine.offload.optimizer is not None,
                                                   engine.offload.params is not None)}
    largest = _largest_layer_params(rows)
    batch = engine.batch
    report: dict[str, Any] = {
        **_header(engine, model),
        "seq_len": int(seq_len),
        "batch": {"train_batch_size": batch.train_batch_size,
                  "micro_batch_per_device": batch.micro_batch_per_device,
                  "gradient_accumulation_steps": batch.gradient_accumulation_steps,
                  "dp_size": dp},
        "remat": engine.config.remat,
        "offload": engine.offload.describe(),
        "num_params": psi_trained + n_frozen,  # NF4 codes count two parameters each
        "params_per_model_parallel_rank": psi_mp,
        "largest_layer_params": largest,
        "optimizer_state_bytes_per_param": opt_bytes,
        "frozen_params": n_frozen,
        # a frozen (LoRA) base as stored: 1 B/param + scales under QLoRA's int8, ~0.5 in NF4
        "frozen_bytes_per_param": frozen_global / n_frozen if n_frozen else None,
        "formula": formula,
        "deepspeed": {"num_gpus_per_node": dp // nodes, "num_nodes": nodes,
                      "rows": deepspeed_estimates(psi_mp, largest, dp // nodes, nodes)},
        "state": state,
        "compiled": None,
    }
    if compile:
        c: CompiledMemory = compiled_memory(engine, seq_len)
        report["compiled"] = c.as_dict()
    return report


def fit_report(
    config: str | os.PathLike | Mapping | Config | None,
    devices: list[jax.Device],
    device_memory: int,
    seq_len: int | None = None,
    candidates: list[str] | None = None,
    nodes: int = 1,
    offload_optimizer: str | None = None,
) -> dict[str, Any]:
    """The largest model that fits ``device_memory`` per device, per ZeRO stage.

    For each stage the candidates are tried from the largest down; the first whose
    compiled train step's peak (argument + temp + output - alias, as ``estimate_report``)
    fits is the answer. A candidate whose persistent train state alone (from its
    shardings) exceeds the memory is ruled out without compiling. Beside it: the answer of
    the ZeRO paper's formula (model states only) and of DeepSpeed's own estimator
    (stages 2 and 3, no offload; ``estimate_zero{2,3}_model_states_mem_needs``), both of
    which ignore activations and every temporary buffer — the difference is what the
    compiled truth adds.

    Args:
      config: as ``load_config``; the stage is replaced for each row.
      devices: the mesh's devices.
      device_memory: bytes per device.
      seq_len: tokens per sequence (default the config's ``train.seq_len``).
      candidates: preset names (default every llama preset), any order.
      nodes: nodes the devices span (DeepSpeed's estimator).
      offload_optimizer: as ``load_config`` ("cpu": ZeRO-Offload; what must fit is then the
        device-memory part of the state and of the compiled step's peak).

    Raises:
      ValueError: ``device_memory`` below 1 or an unknown preset.
    """
    from jds.models import PRESETS

    if device_memory < 1:
        raise ValueError(f"--device-memory {device_memory}: give a size such as 80GiB")
    names = candidates or [n for n in PRESETS if n.startswith("llama-")]
    for n in names:
        if n not in PRESETS:
            raise ValueError(f"unknown model preset {n!r}; choose from {sorted(PRESETS)}")
    counts = {n: _preset_params(n) for n in names}  # (parameters, largest layer)
    sizes = {n: c[0] for n, c in counts.items()}
    order = sorted(names, key=lambda n: -sizes[n])
    rows = []
    for stage in range(4):
        row: dict[str, Any] = {"stage": stage, "fits": None, "peak": None, "tried": []}
        for n in order:
            engine = shapes_engine(n, config, devices, stage=stage,
                                   offload_optimizer=offload_optimizer)
            state = state_memory(engine.state)["device"]
            tried = {"model": n, "params": sizes[n], "state": state, "peak": None}
            row["tried"].append(tried)
            if state > device_memory:
                continue
            tried["peak"] = compiled_memory(
                engine, seq_len or engine.config.train.seq_len, breakdown=False).device_peak
            if tried["peak"] <= device_memory:
                row["fits"], row["peak"] = n, tried["peak"]
                break
        dp = data_parallel_size(engine.mesh)
        prec = engine.config.precision
        offloaded = (engine.offload.optimizer is not None, engine.offload.params is not None)
        row["formula"] = next((n for n in order if _formula_device_bytes(
            sizes[n], stage, dp, prec, offloaded) <= device_memory), None)
        row["deepspeed"] = None
        if stage >= 2:
            for n in order:
                ds = deepspeed_estimates(*counts[n], dp // nodes, nodes)
                gpu = next((r["gpu_bytes"] for r in ds if r["stage"] == stage
                            and bool(r["offload_optimizer"]) == offloaded[0]
                            and bool(r["offload_param"]) == offloaded[1]
                            and r["zero_init"] in (None, True)), None)
                if gpu is not None and gpu <= device_memory:  # None: DeepSpeed has no row
                    row["deepspeed"] = n
                    break
        rows.append(row)
    return {"device_memory": int(device_memory), "devices": len(devices),
            "precision": engine.config.precision, "offload": engine.offload.describe(),
            "params": sizes, "rows": rows}


def _formula_device_bytes(psi: int, stage: int, dp: int, precision: str,
                          offloaded: tuple[bool, bool]) -> float:
    """The ZeRO formula's model-state bytes per device left in device memory (gradients
    included; without what ``offloaded`` = (optimizer, parameters) moves to the host)."""
    states = model_states_per_device(psi, stage, dp, precision=precision)
    return states.total - states.placement(*offloaded)["host"]


def _preset_params(name: str) -> tuple[int, int]:
    """A preset's parameter count and its largest single layer's (a stacked weight counts
    once per layer), from shapes only (``nnx.eval_shape``: nothing is allocated)."""
    from jds.models import build

    model = nnx.eval_shape(lambda: build(name))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    total = sum(math.prod(x.shape) for x in leaves)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
    largest = max(math.prod(x.shape[1:]) if x.shape and x.shape[0] == n_layers
                  else math.prod(x.shape) for x in leaves)
    return total, largest


def fit_text(report: Mapping[str, Any]) -> str:
    """``fit_report`` for people."""
    r = report
    lines = [f"Largest model that fits {_b(r['device_memory'])} per device, {r['devices']} "
             f"devices, {r['precision']} (compiled train step vs model-state formulas):"]
    rows = []
    for row in r["rows"]:
        name = row["fits"] or "none"
        peak = _b(row["peak"]) if row["peak"] is not None else "-"
        params = _count(r["params"][row["fits"]]) if row["fits"] else "-"
        rows.append([str(row["stage"]), name, params, peak, row["formula"] or "none",
                     "-" if row["stage"] < 2 else (row["deepspeed"] or "none")])
    lines += _table(["stage", "compiled step fits", "params", "peak", "ZeRO formula",
                     "DeepSpeed estimator"], rows, right={2, 3})
    return "\n".join(lines) + "\n"


def _b(n: float) -> str:
    """Bytes for people: binary units, 3 significant digits."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def estimate_text(report: Mapping[str, Any]) -> str:
    """``estimate_report`` for people: three tables."""
    r = report
    bt = r["batch"]
    lines = [
        _setup_line(r),
        f"batch {bt['train_batch_size']} x {r['seq_len']} tokens (micro "
        f"{bt['micro_batch_per_device']} x accumulation {bt['gradient_accumulation_steps']}"
        f" x data-parallel {bt['dp_size']}),"
        f" remat {r['remat']}",
        f"parameters {_count(r['num_params'])} ({r['num_params']:,}; per model-parallel rank "
        f"{r['params_per_model_parallel_rank']:,}), largest layer "
        f"{_count(r['largest_layer_params'])}, optimizer state "
        f"{r['optimizer_state_bytes_per_param']} B/param",
        "",
        f"Model states per device, ZeRO paper formula (Nd = {bt['dp_size']}; gradients at the "
        "compute dtype's size):",
    ]
    keys = ["params", "grads", "master", "optimizer", "persistent", "total"]
    rows = []
    for s in ("0", "1", "2", "3", "config"):
        f = r["formula"][s]
        if s == "config":
            name = "config layout"
        else:
            name = f"stage {s}" + (" (config)" if int(s) == r["stage"] else "")
        rows.append([name, *(_b(f[k]) for k in keys)])
    lines += _table(["", *keys], rows, right=set(range(1, 7)))
    ds = r["deepspeed"]
    lines += ["", f"DeepSpeed's estimator ({ds['num_nodes']} node(s) x {ds['num_gpus_per_node']}"
              " devices; counts fp16 + fp32 gradient partitions and a 1.5x host buffer):"]
    yn = lambda v: "-" if v is None else "yes" if v else "no"  # noqa: E731
    lines += _table(
        ["stage", "offload_optimizer", "offload_param", "zero_init", "per CPU node", "per GPU"],
        [[str(x["stage"]), yn(x["offload_optimizer"]), yn(x["offload_param"]), yn(x["zero_init"]),
          _b(x["cpu_bytes"]), _b(x["gpu_bytes"])] for x in ds["rows"]],
        right={4, 5})
    st, f = r["state"], r["formula"]["config"]
    lines += ["", "Train state per device, from the shardings (formula for the config layout; "
              f"{r.get('offload', 'no offload')}):"]
    rows = [["state", *(_b(st[k]) for k in ("params", "master", "optimizer", "frozen", "other",
                                             "total", "device", "host"))],
            ["formula", *(_b(f[k]) for k in ("params", "master", "optimizer")), "", "",
             _b(f["persistent"]), _b(f["device"]), _b(f["host"])]]
    head = ["", "params", "master", "optimizer", "frozen", "other", "total", "in device",
            "in host"]
    if st.get("nvme"):  # the NVMe tier: the formula's offloaded states are in its files
        head.append("on NVMe")
        rows[0].append(_b(st["nvme"]))
        rows[1][-1:] = [_b(0), _b(f["host"])]
    lines += _table(head, rows, right=set(range(1, len(head))))
    if r.get("frozen_bytes_per_param") is not None:
        lines += [f"frozen parameters {_count(r['frozen_params'])} (no gradient, master or "
                  f"optimizer state): {r['frozen_bytes_per_param']:.2f} B/param as stored "
                  "(QLoRA's int8 base: 1 B + its fp32 scales; the rest in the compute dtype)"]
    c = r["compiled"]
    if c is None:
        lines += ["", "Compiled train step: skipped (--no-compile)"]
    else:
        lines += [
            "",
            f"Compiled train step per device ({r.get('compiler', 'XLA CPU')}, AOT; lowered "
            f"in {c['lower_s']:.1f} s, "
            f"compiled in {c['compile_s']:.1f} s):",
            *_table(["argument", "output", "alias", "temp", "generated code", "host temp"],
                    [[_b(c[k]) for k in ("argument", "output", "alias", "temp",
                                         "generated_code", "host_temp")]],
                    right=set(range(6))),
            f"peak estimate (argument + temp + output - alias): {_b(c['peak'])}",
        ]
        if c.get("host_argument"):
            lines.append(f"  of which in host memory: arguments {_b(c['host_argument'])}, "
                         f"outputs {_b(c['host_output'])}; device peak "
                         f"{_b(c['device_peak'])}")
        if c.get("breakdown"):
            lines += _breakdown_lines(c["breakdown"])
            if c.get("host_argument"):  # XLA:CPU simulates one heap for both memories
                lines.append("(XLA:CPU simulates one heap: the host-memory states above — "
                             f"{r.get('offload', 'offload')} — count in this table; they "
                             "are not in the device peak)")
    return "\n".join(lines) + "\n"


def _breakdown_lines(bd: Mapping[str, Any]) -> list[str]:
    """What is live at XLA's peak: bytes per category, then the largest buffers."""
    cats = {k: v for k, v in bd["by_category"].items() if v}
    lines = ["", f"Live at XLA's simulated peak ({_b(bd['total'])}; jds.partitioning.peak "
             "explains the categories):"]
    lines += _table(list(cats), [[_b(v) for v in cats.values()]], right=set(range(len(cats))))
    lines += ["", "Largest buffers live at the peak:"]
    lines += _table(["bytes", "category", "what", "shape"],
                    [[_b(i["bytes"]), i["category"], _short(i["name"], i["where"]), i["shape"]]
                     for i in bd["items"]], right={0})
    return lines


def _short(name: str, where: str, width: int = 72) -> str:
    """An XLA name for a table: the argument path or the tail of the op's name stack."""
    text = f"{where}.{name}" if where.startswith("state") else name
    text = text.replace("jit(train_step)/", "")
    return text if len(text) <= width else "..." + text[-(width - 3):]


__all__ = [
    "DEFAULT_CONFIG",
    "ParamRow",
    "SUBPROCESS_ENV",
    "configure_cpu_devices",
    "cpu_devices",
    "estimate_report",
    "estimate_text",
    "explain_report",
    "explain_text",
    "load_config",
    "param_rows",
    "shapes_engine",
    "simulated_env",
]
