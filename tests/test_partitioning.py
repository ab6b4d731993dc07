"""Mesh construction and the strict logical -> mesh rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jds.config import Config, ConfigError, MeshConfig
from jds.partitioning import constrain, logical_to_spec, make_mesh, use_rules
from jds.partitioning.mesh import hybrid_device_array, resolve_mesh_shape

RULES = {"batch": ("data", "fsdp"), "embed": ("fsdp",), "mlp": ("tensor",), "seq": (),
         "heads": ("tensor",), "vocab": ("tensor",)}


def test_mesh_default_all_data_and_fill():
    m = make_mesh()
    assert dict(m.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "stage": 1}
    assert resolve_mesh_shape({"tensor": 2, "data": -1}, 8) == {
        "data": 4, "fsdp": 1, "tensor": 2, "stage": 1}
    assert resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8)["fsdp"] == 4
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


@pytest.mark.parametrize("sizes, msg", [
    ({"data": 3}, "multiply to 3"),
    ({"data": -1, "fsdp": -1}, "only one axis"),
    ({"tensor": 3, "data": -1}, "does not divide"),
    ({"pipe": 2}, "unknown axis"),
    ({"data": 0}, "mesh.data=0"),
])
def test_mesh_errors_name_the_key(sizes, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_mesh_shape(sizes, 8)


def test_logical_to_spec_resolves_and_is_strict():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("batch", "seq", None), RULES) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), RULES, mesh=mesh, shape=(4, 6)) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="unknown logical axis"):
        logical_to_spec(("embd",), RULES, what="w_up")
    with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
        logical_to_spec(("heads", "mlp"), RULES, what="w")
    with pytest.raises(ValueError, match="w_down: dimension 1 .* does not divide"):
        logical_to_spec(("embed", "mlp"), RULES, mesh=mesh, shape=(4, 5), what="w_down")
    with pytest.raises(ValueError, match="no rule for logical axis"):
        logical_to_spec(("kv_heads",), RULES, what="wk")


def test_constrain_applies_inside_use_rules_only():
    mesh = make_mesh()
    x = jnp.ones((8, 4))
    assert constrain(x, ("batch", "seq")) is x

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", "seq"))

    with use_rules(mesh, RULES):
        y = f(x)
    assert y.sharding.spec == P(("data", "fsdp"), None) or len(y.addressable_shards) == 8
    assert {s.data.shape for s in y.addressable_shards} == {(1, 4)}


# --- hybrid DCN x ICI meshes --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What ``mesh_utils.create_hybrid_device_mesh`` reads of a device (no slice_index)."""

    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
    slice_index: int = 0
    coords: tuple[int, int, int] = (0, 0, 0)
    core_on_chip: int = 0


def _procs(arr):
    return np.vectorize(lambda d: d.process_index)(arr)


@pytest.mark.parametrize("sizes, dcn, msg", [
    ({"data": 8}, {"pipe": 2}, "mesh.dcn: unknown axis"),
    ({"data": 8}, {"data": 0}, "mesh.dcn.data=0: must be a positive integer"),
    ({"data": 2, "fsdp": 4}, {"data": 4}, "mesh.dcn.data=4 does not divide mesh.data=2"),
    ({"data": 8}, {"data": 2}, r"asks for 2 slices/hosts, but the 8 devices are in 1 process"),
])
def test_dcn_errors_name_the_key(sizes, dcn, msg):
    with pytest.raises(ValueError, match=msg):
        make_mesh({**sizes, "dcn": dcn})  # 8 real CPU devices, all in this one process


def test_mesh_config_dump_feeds_make_mesh():
    # The engine's call, make_mesh(cfg.mesh.model_dump(), devices); dcn of 1 is no DCN axis.
    dump = MeshConfig(tensor=2, dcn={"data": 1}).model_dump()
    assert "dcn" not in dump
    assert dict(make_mesh(dump).shape) == {"data": 4, "fsdp": 1, "tensor": 2, "stage": 1}
    assert MeshConfig(data=4, dcn={"data": 2}).model_dump()["dcn"] == {"data": 2}
    m = make_mesh({"data": 4, "tensor": 2, "dcn": {"data": 1, "tensor": 1}})
    assert m.devices.shape == (4, 1, 2, 1)
    with pytest.raises(ConfigError, match="mesh.dcn.tensor=4 does not divide mesh.tensor=2"):
        Config.load({"mesh": {"tensor": 2, "dcn": {"tensor": 4}}})
    with pytest.raises(ConfigError, match="mesh.dcn.pipe: unknown axis"):
        Config.load({"mesh": {"dcn": {"pipe": 2}}})


def test_hybrid_data_axis_separates_processes():
    # 2 processes x 4 devices, listed interleaved: the DCN part of `data` is its outer part.
    devs = [FakeDevice(i, process_index=i % 2) for i in range(8)]
    arr = hybrid_device_array({"data": 4, "fsdp": 2, "tensor": 1, "stage": 1},
                              {"data": 2, "fsdp": 1, "tensor": 1, "stage": 1}, devs)
    assert arr.shape == (4, 2, 1, 1)
    assert (_procs(arr[:2]) == 0).all() and (_procs(arr[2:]) == 1).all()
    assert [d.id for d in arr[:2].flat] == [0, 2, 4, 6]  # ICI order within the granule kept
    # DCN on fsdp instead: each process owns one half of every fsdp row.
    arr = hybrid_device_array({"data": 2, "fsdp": 4, "tensor": 1, "stage": 1},
                              {"data": 1, "fsdp": 2, "tensor": 1, "stage": 1}, devs)
    assert (_procs(arr[:, :2]) == 0).all() and (_procs(arr[:, 2:]) == 1).all()


def test_hybrid_prefers_slices_over_processes():
    # 2 slices of 2 hosts x 2 GPUs: granules are the slices (4 processes would not fit dcn=2),
    # and within a slice GPUs are ordered by id.
    devs = [FakeSliceDevice(i, process_index=i // 2, slice_index=i // 4, platform="gpu",
                            device_kind="NVIDIA H100") for i in reversed(range(8))]
    arr = hybrid_device_array({"data": 2, "fsdp": 2, "tensor": 2, "stage": 1},
                              {"data": 2, "fsdp": 1, "tensor": 1, "stage": 1}, devs)
    assert [d.id for d in arr.flat] == list(range(8))
    assert [{d.slice_index for d in arr[i].flat} for i in (0, 1)] == [{0}, {1}]


def test_hybrid_tpu_slices_keep_ici_neighbours():
    # Two TPU v4 slices of 2x2 chips; tensor pairs must be physical neighbours in one slice.
    devs = [FakeSliceDevice(4 * s + i, process_index=s, slice_index=s, platform="tpu",
                            device_kind="TPU v4", coords=(i % 2, i // 2, 0))
            for s in (1, 0) for i in (0, 3, 1, 2)]  # neither slice nor chip order
    arr = hybrid_device_array({"data": 4, "fsdp": 1, "tensor": 2, "stage": 1},
                              {"data": 2, "fsdp": 1, "tensor": 1, "stage": 1}, devs)
    assert [d.slice_index for d in arr[:, 0, 0, 0]] == [0, 0, 1, 1]
    for a, b in arr[:, 0, :, 0]:
        assert a.slice_index == b.slice_index
        assert sum(abs(x - y) for x, y in zip(a.coords, b.coords, strict=True)) == 1


def test_hybrid_granule_errors():
    uneven = [FakeDevice(i, process_index=int(i >= 3)) for i in range(8)]  # 3 + 5 devices
    with pytest.raises(ValueError, match=r"same number of devices in every process.*0: 3, 1: 5"):
        hybrid_device_array({"data": 8, "fsdp": 1, "tensor": 1, "stage": 1},
                            {"data": 2, "fsdp": 1, "tensor": 1, "stage": 1}, uneven)
    four = [FakeDevice(i, process_index=i // 2) for i in range(8)]
    with pytest.raises(ValueError, match=r"mesh.dcn \(mesh.dcn.data=2\) asks for 2 .* 4 "
                                         r"process\(s\); set the mesh.dcn sizes to multiply to 4"):
        make_mesh({"data": 8, "dcn": {"data": 2}}, four)
    two_slices = [FakeSliceDevice(i, process_index=i // 4, slice_index=i // 4) for i in range(8)]
    with pytest.raises(ValueError, match=r'span 2 slices but mesh.dcn is unset.*"data": 2'):
        make_mesh({"data": 8}, two_slices)
