"""Device meshes, single-slice and hybrid DCN x ICI (multi-slice / multi-node).

jds uses one mesh with four named axes, always in this order: ``data`` (pure data
parallel), ``fsdp`` (data parallel with sharded states: ZeRO), ``tensor`` (Megatron-style
tensor parallel) and ``stage`` (pipeline). Sizes come from the config's ``mesh`` section;
one size may be ``-1`` to take the remaining devices. The default is every device on
``data``.

Axes are created as ``AxisType.Auto``: current JAX makes *Explicit* axes by default, which
would demand ``out_sharding=`` on every indexing and matmul of a sharded operand. jds instead
annotates inputs, outputs and key activations (``rules.constrain``) and lets XLA propagate.

**Hybrid meshes.** A cluster has two networks: the fast one inside a *granule* (ICI between
the chips of a TPU slice, NVLink between the GPUs of a node) and the slow data-centre network
(DCN: Ethernet/InfiniBand) between granules, typically 10-20x less bandwidth per device.
``mesh.dcn`` says how many granules each axis spans (``{"data": 2}``: two slices). The
``mesh`` sizes stay totals; each axis then has ``size / dcn`` devices per granule, and its
index is ``granule * (size / dcn) + position in granule``: the DCN part is the *outer*
(major) part of the axis, so every granule holds a contiguous block of it and collectives on
the inner part never leave the granule. Granules are TPU slices when the devices report more
than one ``slice_index``, else processes (multi-node GPU, multi-process CPU).

Put ``data`` on DCN and keep ``fsdp`` and ``tensor`` inside a granule. Pure data parallelism
crosses the network once per step (one gradient all-reduce, overlappable with the backward
pass), while ZeRO-3 (``fsdp``) all-gathers every layer's weights in forward and backward and
reduce-scatters its gradients, and tensor parallelism reduces activations inside every layer
on the critical path; over DCN those would stall every layer. ``stage`` is the next best
choice for DCN (point-to-point activations at stage boundaries only). ``data`` is also the
first mesh axis, so the slow axis is outermost in the device array as well.

Without ``mesh.dcn`` the mesh comes from ``jax.make_mesh``, which orders devices for the
ICI topology. A device list spanning several TPU slices without ``mesh.dcn`` is an error:
some axis would silently cross the slow network.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
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


def resolve_dcn_shape(dcn: Mapping[str, int] | None, shape: Mapping[str, int]) -> dict[str, int]:
    """Check the ``mesh.dcn`` sizes against the resolved (total) mesh shape.

    Args:
      dcn: axis -> number of granules (slices or processes) the axis spans; missing axes
        are 1. ``None`` = no DCN axis.
      shape: the resolved total sizes from ``resolve_mesh_shape``.

    Returns:
      ``{axis: dcn size}`` for every axis in ``MESH_AXES``.

    Raises:
      ValueError: naming ``mesh.dcn.<axis>`` for an unknown axis, a size below 1, or a size
        that does not divide the axis's total size.
    """
    dcn = dict(dcn or {})
    unknown = set(dcn) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh.dcn: unknown axis {sorted(unknown)}; allowed: {list(MESH_AXES)}")
    out = {a: dcn.get(a, 1) for a in MESH_AXES}
    for a, n in out.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"mesh.dcn.{a}={n!r}: must be a positive integer, the number of "
                             "slices (or hosts) the axis spans; 1 = within one")
        if shape[a] % n:
            raise ValueError(
                f"mesh.dcn.{a}={n} does not divide mesh.{a}={shape[a]}: each of the {n} "
                f"granules must hold an equal share of the axis; make mesh.{a} a multiple of "
                f"{n} or change mesh.dcn.{a}"
            )
    return out


def _granules(devices: Sequence[Any]) -> tuple[str, Counter]:
    """The DCN granule kind ("slice" or "process") and devices per granule."""
    if all(hasattr(d, "slice_index") for d in devices):
        slices = Counter(d.slice_index for d in devices)
        if len(slices) > 1:
            return "slice", slices
    return "process", Counter(d.process_index for d in devices)


def hybrid_device_array(
    shape: Mapping[str, int], dcn: Mapping[str, int], devices: Sequence[Any]
) -> np.ndarray:
    """Lay devices out for a DCN x ICI mesh: each granule is one block of the array.

    Args:
      shape: total size per axis (every axis of ``MESH_AXES``).
      dcn: granules per axis (every axis of ``MESH_AXES``), from ``resolve_dcn_shape``.
      devices: the devices; grouped into granules by ``slice_index`` when they report more
        than one slice, else by ``process_index``.

    Returns:
      An object array of devices of shape ``shape`` (axis order ``MESH_AXES``) whose index
      along each axis is ``granule_index * (size / dcn) + index within the granule``.

    Raises:
      ValueError: naming ``mesh.dcn`` when the granule count differs from the product of the
        dcn sizes, or when granules hold different numbers of devices.
    """
    kind, counts = _granules(devices)
    n_granules = math.prod(dcn[a] for a in MESH_AXES)
    spans = ", ".join(f"mesh.dcn.{a}={dcn[a]}" for a in MESH_AXES if dcn[a] > 1) or "all 1"
    if len(counts) != n_granules:
        raise ValueError(
            f"mesh.dcn ({spans}) asks for {n_granules} slices/hosts, but the {len(devices)} "
            f"devices are in {len(counts)} {kind}(s); set the mesh.dcn sizes to multiply to "
            f"{len(counts)}, or launch {n_granules} {kind}s"
        )
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"mesh.dcn: a hybrid mesh needs the same number of devices in every {kind}, got "
            f"{dict(sorted(counts.items()))} devices per {kind}; pass an equal number of "
            "devices from each or drop mesh.dcn"
        )
    ici = tuple(shape[a] // dcn[a] for a in MESH_AXES)
    return mesh_utils.create_hybrid_device_mesh(
        ici, tuple(dcn[a] for a in MESH_AXES), devices, process_is_granule=kind == "process"
    )


def make_mesh(
    sizes: Mapping[str, Any] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build the jds mesh (axes ``data, fsdp, tensor, stage``; all ``AxisType.Auto``).

    Args:
      sizes: axis sizes (see ``resolve_mesh_shape``) and optionally ``"dcn"``, a mapping
        axis -> number of slices/hosts it spans (``MeshConfig.model_dump()`` is accepted as
        it is); ``None`` = all devices on ``data``.
      devices: devices to use; default ``jax.devices()`` (every process's devices).

    Returns:
      A ``jax.sharding.Mesh``; with ``dcn`` sizes above 1 a hybrid mesh whose DCN part is
      the outer part of each axis.

    Raises:
      ValueError: naming the ``mesh`` / ``mesh.dcn`` key for sizes that do not fit the
        devices, or for devices spanning several slices without ``mesh.dcn``.
    """
    sizes = dict(sizes or {})
    sizes.pop("sequence_parallel", None)  # a layout flag of MeshConfig, not an axis
    dcn_sizes = sizes.pop("dcn", None)
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    dcn = resolve_dcn_shape(dcn_sizes, shape)
    dims = tuple(shape[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if any(n > 1 for n in dcn.values()):
        return Mesh(hybrid_device_array(shape, dcn, devices), MESH_AXES, axis_types=axis_types)
    kind, counts = _granules(devices)
    if kind == "slice":
        raise ValueError(
            f"mesh: the {len(devices)} devices span {len(counts)} slices but mesh.dcn is "
            "unset, so the slow network would land on whichever axis the device order puts "
            f'it; set mesh.dcn, usually {{"data": {len(counts)}}}'
        )
    if devices == list(jax.devices()):
        return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types)
    arr = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of data-parallel replicas: the product of the ``data`` and ``fsdp`` axes."""
    return int(math.prod(mesh.shape[a] for a in DATA_AXES if a in mesh.shape))
