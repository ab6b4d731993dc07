"""ZeRO as shardings: which mesh axes split the parameters, gradients and optimizer state.

DeepSpeed's ZeRO partitions model states over the data-parallel group by hand-written
bucketing and communication. In jds each stage is a choice of ``NamedSharding`` per state;
XLA inserts the all-gathers, and the gradient reduction is a reduce-scatter
(``train_step.py``). With ``Nd`` the data-parallel size (mesh axes ``fsdp`` x ``data``):

======  =====================  ========================  ====================
stage   params (compute copy)  fp32 master + optimizer   gradients
======  =====================  ========================  ====================
0       replicated             replicated                all-reduced
1       replicated             sharded over Nd           all-reduced
2       replicated             sharded over Nd           reduce-scattered
3       sharded, gathered      sharded over Nd           reduce-scattered
        per layer in the scan
======  =====================  ========================  ====================

Beyond DeepSpeed's single group, each of the three states may be sharded over a different
group (``ZeroLayout``): the whole data-parallel group (``fsdp`` x ``data``), only the
``fsdp`` axis (a sub-group, e.g. one node), or nothing (replicated). That covers

- ZeRO++ hpZ (``zero_hpz_partition_size=k``): stage 3 parameters sharded within groups of
  ``k`` (the ``fsdp`` axis) so the per-layer all-gathers stay inside a node, optimizer state
  and gradients over the whole group;
- MiCS (``mics_shard_size=m``): every sharded state within groups of ``m``, replicated
  across groups (gradients all-reduced across groups);
- separate sharding factors per state (``param_partition_size``, ``grad_partition_size``,
  ``optimizer_partition_size``; asked for in DeepSpeed issue 5178).

The sub-group is the mesh's ``fsdp`` axis; the engine sizes it from these keys when the
config's ``mesh`` section leaves it at 1. Sharded states use the axis order
``("fsdp", "data")`` so that an ``fsdp``-only shard is a contiguous union of whole-group
shards: going from the optimizer's layout to hpZ's parameter layout is an all-gather over
``data`` alone.

Which dimension is split: the largest dimension of the parameter that is not the
``layers`` axis (sharding the layer stack would hand whole layers to single devices, not
ZeRO) and not already split by the rules (tensor parallel), that divides by the group size.
If none divides cleanly, a dimension already split by tensor parallelism is split further
when its size allows; otherwise the parameter stays replicated over the group and
``jds explain`` shows it. The rule is the same for a parameter without logical axes (a
user's ``nnx.Conv`` or ``nnx.Linear``): every dimension is free, so the largest one that
divides is split. DeepSpeed flattens and pads each parameter instead, so it splits every
one; a sharding annotation cannot pad (JAX shards only evenly), so in jds a tensor with no
dimension divisible by the group (a 5 x 5 x 3 x 6 kernel on 8 devices) is kept whole on
every device, with its optimizer state. That is the small-tensor rule DeepSpeed applies on
purpose to ZeRO-3 parameters under ``stage3_param_persistence_threshold``; jds does not
apply the threshold itself (it is accepted and has no effect): every parameter that can be
split is, so the per-device bytes are the ZeRO table's.

**Gathering is explicit.** A ZeRO-3 model gathers its parameters where it uses them through
a ``ParamGather`` it holds (``model.param_gather``, set by the engine on its own copy of the
model, or by hand): the layer scan gathers one layer at a time, the embedding and head at
their point of use. No ambient state decides it, so a model jitted outside the engine
behaves the same as inside, and a model without a ``ParamGather`` never gathers (XLA's
partitioner then decides where the weights move).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jds.partitioning.rules import Rules, logical_to_spec, traced_sharding

ZERO_AXES: tuple[str, ...] = ("fsdp", "data")
SUBGROUP_AXES: tuple[str, ...] = ("fsdp",)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ZeroLayout:
    """The mesh axes each model state is sharded over (``()`` = replicated).

    Attributes:
      stage: the ZeRO stage this layout came from (0-3), for reports.
      params: axes of the compute copy of the parameters (stage 3).
      grads: axes of the gradient accumulation buffer (stage >= 2).
      optimizer: axes of the fp32 master weights and optimizer state (stage >= 1).
    """

    stage: int = 0
    params: tuple[str, ...] = ()
    grads: tuple[str, ...] = ()
    optimizer: tuple[str, ...] = ()

    def describe(self, mesh: Mesh) -> dict[str, int]:
        """Sharding factor (group size) of each state on ``mesh``."""
        return {
            k: math.prod(mesh.shape[a] for a in getattr(self, k))
            for k in ("params", "grads", "optimizer")
        }

    def group_size(self, mesh_shape: Mapping[str, int]) -> int:
        """The largest sharding factor: every state splits the same dimension, chosen to
        divide by this, so moving between two states' layouts gathers along it only."""
        return max(math.prod(mesh_shape[a] for a in getattr(self, k))
                   for k in ("params", "grads", "optimizer"))


def _axes_for_size(size: int, key: str, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Mesh axes giving a sharding factor of ``size`` (1, the fsdp size, or all of Nd)."""
    nd = mesh_shape["fsdp"] * mesh_shape["data"]
    if size == 1:
        return ()
    if size == nd:
        return ZERO_AXES
    if size == mesh_shape["fsdp"]:
        return SUBGROUP_AXES
    raise ValueError(
        f"zero_optimization.{key}={size}: a sharding factor must be 1, the data-parallel "
        f"size ({nd}) or the mesh's fsdp size ({mesh_shape['fsdp']}); set mesh.fsdp to "
        f"{size} to shard within groups of {size}"
    )


def subgroup_size(zero: Any) -> tuple[int, str | None]:
    """The sub-group size the ZeRO config asks for (hpZ, MiCS or a partition size) and the
    key that asks for it; ``(1, None)`` when none does.

    The engine uses it to size the mesh's ``fsdp`` axis when the config leaves it at 1.
    """
    asks = [
        ("zero_hpz_partition_size", zero.zero_hpz_partition_size),
        ("mics_shard_size", zero.mics_shard_size),
        *((k, getattr(zero, k, None)) for k in PARTITION_KEYS),
    ]
    asks = [(int(v), k) for k, v in asks if v is not None and int(v) > 1]
    return min(asks) if asks else (1, None)


PARTITION_KEYS: tuple[str, ...] = (
    "param_partition_size",
    "grad_partition_size",
    "optimizer_partition_size",
)


def mesh_sizes(mesh: Mapping[str, Any], zero: Any, n_devices: int) -> dict[str, int]:
    """The mesh axis sizes for a config, with ``fsdp`` sized for hpZ / MiCS / a partition size.

    A ZeRO sub-group (``zero_hpz_partition_size``, ``mics_shard_size``, or a partition size
    smaller than the data-parallel group) is the mesh's ``fsdp`` axis. When the config
    leaves ``mesh.fsdp`` at 1 it is set to the sub-group size here, taking that factor
    from ``mesh.data``.

    Args:
      mesh: the config's ``mesh`` section as a dict (``data`` may be -1: every device left).
      zero: the config's ``zero_optimization`` section.
      n_devices: devices the mesh will use.

    Raises:
      ValueError: naming the key, when ``mesh.fsdp`` is set to another size or the
        sub-group does not divide ``mesh.data`` or the devices.
    """
    sizes = {k: v for k, v in mesh.items() if k in ("data", "fsdp", "tensor", "stage")}
    k, key = subgroup_size(zero)
    if k <= 1 or sizes["fsdp"] == k:
        return sizes
    where = f"zero_optimization.{key}={k}"
    if sizes["fsdp"] != 1:
        raise ValueError(f"{where} shards within groups of {k} devices but mesh.fsdp is "
                         f"{sizes['fsdp']}; set mesh.fsdp to {k} (or leave it out)")
    data = n_devices if sizes["data"] == -1 else sizes["data"]
    if data % k:
        raise ValueError(f"{where} shards within groups of {k} devices, which does not divide "
                         f"the {data} data-parallel devices; use a divisor of {data}")
    sizes["fsdp"] = k
    if sizes["data"] != -1:
        sizes["data"] //= k
    return sizes


def parallel_layout(mesh_cfg: Any, zero: Any, devices: Any, rules: Rules
                    ) -> tuple[Mesh, Rules, ZeroLayout]:
    """The mesh, rules and ZeRO layout a config asks for on ``devices`` (None: all).

    The rules gain ``layers -> stage`` with pipeline stages (each stage holds its block of
    layers) and ``res_seq -> tensor`` with ``mesh.sequence_parallel``.

    Raises:
      ValueError: naming the key, for a mesh or ZeRO layout that cannot be.
    """
    from jds.partitioning.mesh import make_mesh

    n_devices = len(devices) if devices is not None else jax.device_count()
    mesh = make_mesh(mesh_sizes(mesh_cfg.model_dump(), zero, n_devices), devices)
    if mesh.shape["stage"] > 1 and not rules.get("layers"):
        rules = {**rules, "layers": ("stage",)}
    if mesh_cfg.sequence_parallel:
        if mesh.shape["tensor"] == 1:
            raise ValueError("mesh.sequence_parallel=true splits the residual stream over the "
                             "tensor axis, but mesh.tensor is 1; set mesh.tensor > 1 or drop "
                             "sequence_parallel")
        rules = {**rules, "res_seq": ("tensor",)}
    return mesh, rules, layout_from_config(zero, mesh.shape)


def layout_from_config(zero: Any, mesh_shape: Mapping[str, int]) -> ZeroLayout:
    """The ``ZeroLayout`` for a ``zero_optimization`` config section on a mesh.

    Args:
      zero: the config's ``ZeroConfig`` (stage, hpZ, MiCS and partition-size keys).
      mesh_shape: mesh axis sizes (``mesh.shape``).

    Raises:
      ValueError: naming the key, when hpZ or MiCS is set without a stage that shards
        what they shard, or a size does not match the mesh.
    """
    stage = int(zero.stage)
    nd = mesh_shape["fsdp"] * mesh_shape["data"]
    full = ZERO_AXES if nd > 1 else ()
    params = full if stage >= 3 else ()
    grads = full if stage >= 2 else ()
    optimizer = full if stage >= 1 else ()

    hpz = int(zero.zero_hpz_partition_size)
    if hpz > 1:
        if stage != 3:
            raise ValueError(
                f"zero_optimization.zero_hpz_partition_size={hpz} shards parameters, which "
                f"needs stage 3 (got stage {stage}); set zero_optimization.stage to 3"
            )
        params = _axes_for_size(hpz, "zero_hpz_partition_size", mesh_shape)
    mics = int(zero.mics_shard_size)
    if mics > 0:
        if stage == 0:
            raise ValueError(
                f"zero_optimization.mics_shard_size={mics} needs a ZeRO stage >= 1 (it "
                "limits the group sharded states are split over); set zero_optimization.stage"
            )
        sub = _axes_for_size(mics, "mics_shard_size", mesh_shape)
        params, grads, optimizer = (sub if axes else () for axes in (params, grads, optimizer))
    explicit = {k: getattr(zero, k, None) for k in PARTITION_KEYS}
    if explicit["param_partition_size"] is not None:
        params = _axes_for_size(int(explicit["param_partition_size"]),
                                "param_partition_size", mesh_shape)
    if explicit["grad_partition_size"] is not None:
        grads = _axes_for_size(int(explicit["grad_partition_size"]),
                               "grad_partition_size", mesh_shape)
    if explicit["optimizer_partition_size"] is not None:
        optimizer = _axes_for_size(int(explicit["optimizer_partition_size"]),
                                   "optimizer_partition_size", mesh_shape)
    drop = {a for a in ZERO_AXES if mesh_shape[a] == 1}  # size-1 axes: keep specs readable
    params, grads, optimizer = (tuple(a for a in ax if a not in drop)
                                for ax in (params, grads, optimizer))
    return ZeroLayout(stage=stage, params=params, grads=grads, optimizer=optimizer)


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def zero_dim(
    shape: tuple[int, ...],
    logical: tuple[str | None, ...],
    base: PartitionSpec,
    mesh_shape: Mapping[str, int],
    group: int,
) -> int | None:
    """The dimension ZeRO splits over a group of ``group`` devices, or None (replicated).

    See the module docstring for the order of preference.
    """
    if group <= 1:
        return None
    entries = list(base) + [None] * (len(shape) - len(base))
    free = [i for i, (n, e) in enumerate(zip(logical, entries, strict=True))
            if n != "layers" and e is None and shape[i] % group == 0]
    if free:
        return max(free, key=lambda i: (shape[i], -i))
    split = [i for i, (n, e) in enumerate(zip(logical, entries, strict=True))
             if n != "layers" and e is not None
             and shape[i] % (group * math.prod(mesh_shape[a] for a in _entry_axes(e))) == 0]
    if split:
        return max(split, key=lambda i: (shape[i], -i))
    return None


def add_axes(
    base: PartitionSpec, ndim: int, dim: int | None, axes: tuple[str, ...]
) -> PartitionSpec:
    """``base`` with ``axes`` appended (minor) on dimension ``dim``."""
    entries = list(base) + [None] * (ndim - len(base))
    if dim is None or not axes:
        return PartitionSpec(*entries)
    new = _entry_axes(entries[dim]) + tuple(axes)
    entries[dim] = new[0] if len(new) == 1 else new
    return PartitionSpec(*entries)


@dataclasses.dataclass(frozen=True)
class ZeroPlan:
    """Per-parameter specs of one layout on one mesh (pytrees shaped like the params).

    Attributes:
      layout: the ``ZeroLayout``.
      axes: each parameter's logical axes (tuples; pass ``is_leaf`` when mapping over them).
      base: the rules' spec of each parameter (tensor parallel only): the layout the model
        computes with, i.e. what a stage-3 parameter is gathered to inside the layer scan.
      dims: the dimension ZeRO splits per parameter (-1: kept replicated over the group).
      params, grads, optimizer: the ``PartitionSpec`` of each state.
    """

    layout: ZeroLayout
    axes: PyTree
    base: PyTree
    dims: PyTree
    params: PyTree
    grads: PyTree
    optimizer: PyTree

    def shardings(self, mesh: Mesh, which: str) -> PyTree:
        """``NamedSharding`` tree of ``which`` (``"base" | "params" | "grads" | "optimizer"``)."""
        return jax.tree.map(lambda s: NamedSharding(mesh, s), getattr(self, which),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_plan(shapes: PyTree, axes: PyTree, mesh: Mesh, rules: Rules,
              layout: ZeroLayout) -> ZeroPlan:
    """Specs of every parameter under ``layout``.

    Args:
      shapes: the parameters (arrays or ``jax.ShapeDtypeStruct``), a pure tree.
      axes: the same tree with each parameter's logical axes (a tuple; ``None`` entries
        for unnamed dimensions: ``jds.partitioning.rules.variable_axes``).
      mesh: the device mesh.
      rules: logical -> mesh rules (tensor parallelism).
      layout: which states are sharded over which axes.

    Returns:
      A ``ZeroPlan`` whose trees have ``shapes``' structure.

    Raises:
      ValueError: a parameter's axes do not resolve through the rules (named).
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    axes_leaves = treedef.flatten_up_to(axes) if paths else []
    group = layout.group_size(mesh.shape)
    out: dict[str, list] = {k: [] for k in ("axes", "base", "dims", "params", "grads",
                                            "optimizer")}
    for (path, x), ax in zip(paths, axes_leaves, strict=True):
        ax, shape = tuple(ax), tuple(x.shape)
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        base = logical_to_spec(ax, rules, mesh=mesh, shape=shape, what=name)
        dim = zero_dim(shape, ax, base, mesh.shape, group)
        out["axes"].append(ax)
        out["base"].append(PartitionSpec(*(list(base) + [None] * (len(shape) - len(base)))))
        out["dims"].append(-1 if dim is None else dim)
        for k in ("params", "grads", "optimizer"):
            out[k].append(add_axes(base, len(shape), dim, getattr(layout, k)))
    trees = {k: jax.tree_util.tree_unflatten(treedef, v) for k, v in out.items()}
    return ZeroPlan(layout=layout, **trees)


GATHERED = "zero_gathered"  # checkpoint name of a ZeRO-3 parameter gathered for compute


# Element-wise and layout primitives: their outputs are recomputed in the backward pass
# from saved inputs (inside the fusions that use them) rather than kept (see below).
RECOMPUTED = frozenset("""
    abs add and broadcast_in_dim concatenate convert_element_type copy copy_p cos div eq erf
    exp exp2 expand_dims ge gt integer_pow iota le log log1p logistic lt max min mul ne neg
    not or pad pow reduce_precision reshape rev rsqrt select_n sign sin slice sqrt square
    squeeze stop_gradient sub tanh transpose
""".split())


def save_costly_not_gathered(prim: Any, *_: Any, **params: Any) -> bool:
    """A ``jax.checkpoint`` policy for training without remat: keep what is costly to
    recompute for the backward pass (matmul outputs, reductions, custom calls and kernels,
    anything not listed), but not

    - parameters constrained to their compute layout: ZeRO-3's gathered parameters, which
      the backward pass gathers again (as DeepSpeed's ZeRO-3 does), and under ZeRO 0-2 the
      constrained copy of a layer's weights, which the backward pass reads from the stack,
      so no second copy of the layer stack is kept between the passes;
    - outputs of element-wise and layout primitives (``RECOMPUTED``): the backward pass
      recomputes them from their saved inputs inside the fusions that read them.

    ``save_anything_except_these_names(GATHERED)`` is not enough for the first: the gather
    is a sharding constraint whose output is saveable, so the name (applied after it) is
    recomputed from the saved, gathered value — a whole ``[layers, ...]`` stack of unsharded
    weights. Here no sharding constraint's output is saved either; each is recomputed from
    its input, which is saved when it is an activation, and is a scan input (the sharded
    stack) when it is a parameter. Measured on an 8-layer Llama over 8 devices
    (``scripts/bench_zero_peak.py``), the compiled ZeRO-3 step's peak fell from 8.36 to
    4.51 bytes/parameter in bf16 and from 8.49 to 4.64 in fp32.

    The second: saving every intermediate kept, per layer, the masked attention scores, a
    broadcast mask constant, SiLU's sigmoid and product, RMSNorm's normalised copies...
    each a full activation written in the forward and read back in the backward. On a
    3.0M-parameter Llama step (8 x 256 tokens, fp32, one CPU device) the step's
    temporaries fell from 428 to 270 MiB at the same step time (the recomputation is
    element-wise work fused into ops that read those inputs anyway; issue 25's
    ``scripts/bench_vs_deepspeed.py``).
    """
    if prim.name == "name":
        return params.get("name") != GATHERED
    return prim.name != "sharding_constraint" and prim.name not in RECOMPUTED


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(x: jax.Array, gathered: NamedSharding, sharded: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, gathered)


def _gather_fwd(x, gathered, sharded):
    return jax.lax.with_sharding_constraint(x, gathered), None


def _gather_bwd(gathered, sharded, _, ct):
    return (jax.lax.with_sharding_constraint(ct, sharded),)


_gather.defvjp(_gather_fwd, _gather_bwd)


@dataclasses.dataclass(frozen=True)
class ParamGather:
    """Where a model's parameters are gathered to compute with: one mesh, rules and layout.

    A model holds one (``param_gather``) and calls it on each parameter at its point of
    use. Hashable, so it can sit in an NNX graph definition as static data.

    Attributes:
      mesh: the device mesh.
      rules: logical -> mesh rules, as ``((name, mesh axes), ...)`` (hashable).
      layout: the ZeRO layout (which states are sharded over which axes).
      host: the parameters rest in host memory (ZeRO-Infinity's ``offload_param``): each
        is copied to the device at its point of use (one layer's slice inside the layer
        scan), and its gradient goes back to host memory.
    """

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]
    layout: ZeroLayout
    host: bool = False

    @classmethod
    def create(cls, mesh: Mesh, rules: Rules, layout: ZeroLayout, *,
               host: bool = False) -> ParamGather:
        """A ``ParamGather`` for ``rules`` given as a mapping."""
        return cls(mesh, tuple((k, tuple(v)) for k, v in rules.items()), layout, host)

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded at rest (ZeRO-3), i.e. gathering moves bytes."""
        return bool(self.layout.params)

    def __call__(self, x: jax.Array, axes: tuple[str | None, ...],
                 after: Any = None) -> jax.Array:
        """A parameter at its point of use, gathered to its compute layout (the rules' spec).

        Under ZeRO-3 this is the per-layer all-gather, and its gradient is constrained
        straight back to the ZeRO gradient layout, so the backward scan emits one
        reduce-scatter per layer and stacks only gradient *shards* — never a full-size
        gradient of the layer stack. Under ZeRO-2 (parameters replicated, gradients
        sharded) nothing is gathered but the gradient is constrained the same way, so it
        too is reduce-scattered a layer at a time inside the backward scan. Otherwise it
        only pins the compute layout.

        Args:
          x: the parameter (one layer's slice inside the scan, or a whole embedding).
          axes: its logical axes (without ``layers``).
          after: under ZeRO-3, values the gather waits for (``optimization_barrier``): the
            token ids for the embedding, the final hidden state for the LM head. Without
            it XLA gathers the embedding and head once before the micro-batch loop (they
            do not change between micro-batches) and keeps them gathered through every
            layer of every micro-batch; DeepSpeed gathers them at their use. Issue 19's
            8-layer Llama: ZeRO-3 peak 3.89 -> 3.76 bytes/param (before the pin below).
        """
        mesh, rules = self.mesh, dict(self.rules)
        base = logical_to_spec(axes, rules, mesh=mesh, shape=tuple(x.shape),
                               what=f"param {axes}")
        dim = zero_dim(tuple(x.shape), axes, base, mesh.shape,
                       self.layout.group_size(mesh.shape))
        grad_spec = add_axes(base, x.ndim, dim, self.layout.grads)
        if not self.sharded:
            if self.host:  # to the device (its cotangent goes back to the host)
                x = jax.device_put(x, traced_sharding(mesh, base).with_memory_kind("device"))
            if self.layout.grads and not self.host:
                # ZeRO-2: no gather, but the gradient is reduce-scattered to its shard
                # right here, in the backward scan, a layer at a time
                return _gather(x, traced_sharding(mesh, base), traced_sharding(mesh, grad_spec))
            return jax.lax.with_sharding_constraint(x, traced_sharding(mesh, base))
        if self.host:  # this shard to the device (its cotangent goes back to the host)
            x = jax.device_put(x, traced_sharding(mesh, grad_spec).with_memory_kind("device"))
        if after is not None:
            x, _ = jax.lax.optimization_barrier((x, after))
        # Pin the shard as it arrives (inside the scan: the layer's slice, its leading
        # ``layers`` dimension already squeezed away) so the all-gather runs on it. Left
        # free, the partitioner gathers the ``[1, d/n, ...]`` slice before the squeeze;
        # XLA:CPU's layout assignment then wants the gathered dimension major-most, the
        # size-1 layer dimension in front defeats it, and it transposes the whole sharded
        # stack once, outside the loop, kept for the whole step (issue 19's 8-layer
        # Llama, fp32 ZeRO-3: 3.76 -> 3.28 bytes/param, "other" 0.50 -> 0.02).
        x = jax.lax.with_sharding_constraint(x, traced_sharding(mesh, grad_spec))
        return checkpoint_name(
            _gather(x, traced_sharding(mesh, base), traced_sharding(mesh, grad_spec)), GATHERED
        )

    def tree(self, params: PyTree, axes: PyTree) -> PyTree:
        """``self(x, axes)`` on every leaf of ``params`` (``axes``: the same tree of tuples)."""
        leaves, treedef = jax.tree.flatten(params)
        return treedef.unflatten([self(x, tuple(a)) for x, a
                                  in zip(leaves, treedef.flatten_up_to(axes), strict=True)])


def gather_param(x: jax.Array, axes: tuple[str | None, ...],
                 gather: ParamGather | None, after: Any = None) -> jax.Array:
    """``gather(x, axes, after)``, or ``x`` unchanged when the model holds no
    ``ParamGather``."""
    return x if gather is None else gather(x, axes, after)


__all__ = [
    "PARTITION_KEYS",
    "SUBGROUP_AXES",
    "ZERO_AXES",
    "ZeroLayout",
    "ZeroPlan",
    "GATHERED",
    "ParamGather",
    "add_axes",
    "gather_param",
    "layout_from_config",
    "make_plan",
    "mesh_sizes",
    "parallel_layout",
    "subgroup_size",
    "zero_dim",
]
