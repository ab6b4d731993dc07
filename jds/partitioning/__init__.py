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

__all__ = [
    "AXIS_LETTERS",
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "Rules",
    "constrain",
    "data_parallel_size",
    "logical_to_spec",
    "make_mesh",
    "tree_shardings",
    "use_rules",
]
