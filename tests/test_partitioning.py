"""Mesh construction and the strict logical -> mesh rules."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jds.partitioning import constrain, logical_to_spec, make_mesh, use_rules
from jds.partitioning.mesh import resolve_mesh_shape

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
