"""AgentMesh service host: one service process on the mesh, put together from the bus runtime's parts."""

from mesh_host.deps import Dependency
from mesh_host.mesh import Mesh
from mesh_host.runtime import run_service, serve

__all__ = ["Dependency", "Mesh", "run_service", "serve"]
