"""Device meshes.

jds uses one mesh with four named axes, always in this order: ``data`` (pure data
parallel), ``fsdp`` (data parallel with sharded states: ZeRO), ``tensor`` (Megatron-style
tensor parallel) and ``stage`` (pipeline). Sizes come from the config's ``mesh`` section;
one size may be ``-1`` to take the remaining devices. The default is every device on
``data``.

Axes are created as ``AxisType.Auto``: current JAX makes *Explicit* axes by default, which
would demand ``out_sharding=`` on every indexing and matmul of a sharded operand. jds instead
annotates inputs, outputs and key activations (``rules.constrain``) and lets XLA propagate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "stage")
DATA_AXES: tuple[str, ...] = ("data", "fsdp")


def resolve_mesh_shape(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolve mesh axis sizes against the device count.

    Args:
      sizes: axis -> size; missing axes are 1 except ``data``, which fills (-1) when no
        axis is -1.
      n_devices: number of devices the mesh must cover exactly.

    Returns:
      ``{axis: size}`` for every axis in ``MESH_AXES``.

    Raises:
      ValueError: naming ``mesh.<axis>`` when sizes are unknown, invalid, or do not multiply
        to ``n_devices``.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; allowed: {list(MESH_AXES)}")
    shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    if "data" not in sizes and all(v != -1 for v in shape.values()):
        shape["data"] = -1
    fill = [a for a, v in shape.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {fill}")
    for a, v in shape.items():
        if v == 0 or v < -1:
            raise ValueError(f"mesh.{a}={v}: sizes must be positive or -1 (fill)")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if fill:
        if n_devices % fixed:
            raise ValueError(
                f"mesh: fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices; change the mesh sizes in the config's 'mesh' section"
            )
        shape[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(
            f"mesh: axis sizes {shape} multiply to {fixed} but {n_devices} devices are "
            "visible; make them multiply to the device count or set one axis to -1"
        )
    return shape


def make_mesh(
    sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build the jds mesh (axes ``data, fsdp, tensor, stage``; all ``AxisType.Auto``).

    Args:
      sizes: axis sizes (see ``resolve_mesh_shape``); ``None`` = all devices on ``data``.
      devices: devices to use; default ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes or {}, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    arr = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of data-parallel replicas: the product of the ``data`` and ``fsdp`` axes."""
    return int(math.prod(mesh.shape[a] for a in DATA_AXES if a in mesh.shape))
