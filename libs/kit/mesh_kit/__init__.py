"""AgentMesh bus runtime: settings, signed envelopes, verified durable consumers, DLQ, health."""

from mesh_kit.bus import Delivery, Mesh, Park, PermissionViolation, Reject
from mesh_kit.identity import IdentityError, Signer, TrustBundle, Verifier
from mesh_kit.runtime import run_service, serve
from mesh_kit.settings import ServiceSettings

__all__ = [
    "Delivery",
    "IdentityError",
    "Mesh",
    "Park",
    "PermissionViolation",
    "Reject",
    "ServiceSettings",
    "Signer",
    "TrustBundle",
    "Verifier",
    "run_service",
    "serve",
]
