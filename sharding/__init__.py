"""Device meshes from `--mesh` specs, logical-axis rules, and the memory planner."""

from .context import ShardingContext, constrain
from .mesh import MeshSpec, MeshSpecError, check_against_config, make_mesh, parse_mesh_spec
from .rules import LOGICAL_TO_VIEW, partition_spec

__all__ = ["MeshSpec", "MeshSpecError", "ShardingContext", "constrain", "check_against_config",
           "make_mesh", "parse_mesh_spec", "partition_spec", "LOGICAL_TO_VIEW"]
