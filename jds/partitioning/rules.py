"""Logical -> mesh axis rules: the one table that decides the parallel layout.

A rule maps a logical axis (``jds.partitioning.axes``) to a tuple of mesh axes (or to
nothing: replicated). Rules are data and strict: an unknown logical name, two logical names
mapped onto the same mesh axis within one array, or a dimension that its mesh axes do not
divide is an error naming the parameter — never a silent fallback to replication.

``constrain(x, axes)`` resolves names through the rules made active with ``use_rules`` and
applies ``with_sharding_constraint``; outside ``use_rules`` it returns ``x`` unchanged, so
models run eagerly on one device with no mesh at all. (Flax's own logical-name machinery does
not reach ``with_sharding_constraint`` the way we need, and its eager variable sharding
would shard at construction time; jds keeps parameters' logical names as plain ``axes``
metadata on ``nnx.Param`` and resolves them here.)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jds.partitioning.axes import AXIS_LETTERS, check_axes

Rules = Mapping[str, tuple[str, ...]]

# Data parallel on ``data`` and ``fsdp``; Megatron tensor parallel on ``tensor`` (a no-op at
# tensor=1). Parameters carry no batch axis, so under these rules they are replicated; ZeRO
# (jds/partitioning/zero.py) shards states by adding the data axes to a parameter dimension.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "res_seq": (),  # ("tensor",) with mesh.sequence_parallel (Megatron sequence parallelism)
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jds_rules", default=None
)


def logical_to_spec(
    axes: tuple[str | None, ...],
    rules: Rules = DEFAULT_RULES,
    *,
    mesh: Mesh | None = None,
    shape: tuple[int, ...] | None = None,
    what: str = "array",
) -> PartitionSpec:
    """Resolve logical axis names to a ``PartitionSpec``.

    Args:
      axes: one logical name (or ``None``) per dimension.
      rules: logical name -> mesh axes.
      mesh: if given with ``shape``, each dimension is checked to divide by its mesh axes.
      shape: the array shape, for the divisibility check.
      what: the parameter or activation name used in error messages.

    Returns:
      The ``PartitionSpec``; mesh axes of size 1 are kept (harmless) so specs are stable.

    Raises:
      ValueError: unknown logical name, a mesh axis used twice, a non-dividing dimension,
        or a rank mismatch between ``axes`` and ``shape``.
    """
    check_axes(axes, what=what)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"{what}: {len(axes)} logical axes {axes} for shape {shape}")
    missing = [a for a in axes if a is not None and a not in rules]
    if missing:
        raise ValueError(f"{what}: no rule for logical axis {missing}; add it to the rules")
    used: dict[str, str] = {}
    entries: list[Any] = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(rules[name]) if name is not None else ()
        for m in mesh_axes:
            if m in used:
                raise ValueError(
                    f"{what}: logical axes {used[m]!r} and {name!r} both map to mesh axis "
                    f"{m!r}; one array cannot be sharded twice over the same mesh axis"
                )
            used[m] = name  # type: ignore[assignment]
        if mesh is not None and shape is not None and mesh_axes:
            n = math.prod(mesh.shape[m] for m in mesh_axes)
            if shape[i] % n:
                raise ValueError(
                    f"{what}: dimension {i} ({name}, size {shape[i]}) does not divide over "
                    f"mesh axes {mesh_axes} (size {n}); change the mesh or the rules"
                )
        entry = None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
        entries.append(entry)
    return PartitionSpec(*entries)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Make ``(mesh, rules)`` active for ``constrain`` inside the block (trace time)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    """The ``(mesh, rules)`` made active by ``use_rules``, or None outside one."""
    return _ACTIVE.get()


def traced_sharding(mesh: Mesh, spec: PartitionSpec) -> NamedSharding:
    """``NamedSharding(mesh, spec)`` for use inside a traced function.

    Inside a ``shard_map`` that is manual over some axes (the pipeline's ``stage``), JAX
    wants shardings on the context's abstract mesh, which marks those axes manual; the
    concrete mesh would be rejected. ``spec`` must not name a manual axis there.
    """
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context.manual_axes and context.shape_tuple == mesh.shape_tuple:
        return NamedSharding(context, spec)
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity when no rules are active.

    Args:
      x: an activation, e.g. ``x_BTD``.
      axes: its logical axes, e.g. ``("batch", "seq", "embed")``.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, mesh=mesh, shape=x.shape, what=f"activation {axes}")
    return jax.lax.with_sharding_constraint(x, traced_sharding(mesh, spec))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


# Metadata keys that name a variable's logical axes: jds's own ``axes=`` first, then Flax's
# (``nnx.with_partitioning`` / ``kernel_metadata={"out_sharding": ...}``; older Flax used
# ``sharding_names`` and ``sharding``).
AXES_METADATA: tuple[str, ...] = ("axes", "out_sharding", "sharding_names", "sharding")


def variable_axes(v: nnx.Variable, what: str = "parameter") -> tuple[str | None, ...]:
    """A variable's logical axes: its annotation, or ``None`` per dimension when it has none.

    An unannotated variable is legal: it follows no tensor-parallel rule, and ZeRO still
    splits it over the data-parallel group (``jds.partitioning.zero``).

    Raises:
      ValueError: the annotation is not one name (or None) per dimension, or names an axis
        outside the vocabulary (``jds.partitioning.axes``).
    """
    meta = v.get_metadata()
    ndim = len(getattr(v, "shape", ()) or ())
    for key in AXES_METADATA:
        names = meta.get(key)
        if names is None:
            continue
        if isinstance(names, str) or not all(n is None or isinstance(n, str) for n in names):
            raise ValueError(f"{what}: metadata {key}={names!r} must be one logical axis name "
                             "(or None) per dimension")
        names = tuple(names)
        if len(names) != ndim:
            raise ValueError(f"{what}: {len(names)} logical axes {names} ({key}=) for a "
                             f"{ndim}-d variable of shape {tuple(v.shape)}")
        check_axes(names, what=what)
        return names
    return (None,) * ndim


def tree_logical_axes(state: Any) -> Any:
    """Map an ``nnx.State`` (or pure tree of Variables) to each leaf's logical axes
    (``variable_axes``: ``None`` per dimension for an unannotated variable).

    Raises:
      ValueError: a malformed annotation (named).
    """

    def get(path, v):
        return variable_axes(v, "parameter " + "/".join(str(getattr(p, "key", p)) for p in path))

    return jax.tree_util.tree_map_with_path(get, state, is_leaf=_is_var)


def tree_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every Variable in ``state`` from its logical axes and the rules.

    Args:
      state: an ``nnx.State`` of Variables (abstract or concrete); unannotated ones are
        replicated.

    Returns:
      A tree of the same structure with ``NamedSharding`` leaves in place of Variables.
    """

    def one(path, v):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        axes = variable_axes(v, name)
        spec = logical_to_spec(axes, rules, mesh=mesh, shape=tuple(v.shape), what=name)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def axes_shardings(axes: Any, shapes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` per leaf of a pure tree from a same-shaped tree of logical axes
    (tuples; ``None`` entries replicate), e.g. a model's non-parameter variables."""
    return jax.tree.map(
        lambda a, x: NamedSharding(mesh, logical_to_spec(tuple(a), rules, mesh=mesh,
                                                         shape=tuple(x.shape))),
        axes, shapes, is_leaf=lambda a: isinstance(a, tuple))


__all__ = [
    "AXES_METADATA",
    "AXIS_LETTERS",
    "DEFAULT_RULES",
    "Rules",
    "active_rules",
    "axes_shardings",
    "constrain",
    "logical_to_spec",
    "tree_logical_axes",
    "tree_shardings",
    "use_rules",
    "variable_axes",
]
