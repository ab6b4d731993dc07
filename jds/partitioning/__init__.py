"""Partitioning: the logical axis vocabulary, meshes, and the logical -> mesh rules."""

from jds.partitioning.axes import AXIS_LETTERS, LOGICAL_AXES
from jds.partitioning.mesh import MESH_AXES, data_parallel_size, make_mesh
from jds.partitioning.rules import (
    DEFAULT_RULES,
    Rules,
    constrain,
    logical_to_spec,
    tree_shardings,
    use_rules,
)
from jds.partitioning.zero import ZeroLayout, ZeroPlan, layout_from_config, make_plan

__all__ = [
    "AXIS_LETTERS",
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "Rules",
    "ZeroLayout",
    "ZeroPlan",
    "constrain",
    "data_parallel_size",
    "layout_from_config",
    "logical_to_spec",
    "make_mesh",
    "make_plan",
    "tree_shardings",
    "use_rules",
]
