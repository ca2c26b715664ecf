"""AgentMesh bus runtime: settings, signed envelopes, verified durable consumers, DLQ, health."""

from mesh_identity import IdentityError, Signer, TrustBundle, Verifier
from mesh_kit.bus import Mesh
from mesh_kit.delivery import Delivery, Park, PermissionViolation, Reject, Retry
from mesh_kit.runtime import run_service, serve
from mesh_kit.settings import ServiceSettings

__all__ = [
    "Delivery",
    "IdentityError",
    "Mesh",
    "Park",
    "PermissionViolation",
    "Reject",
    "Retry",
    "ServiceSettings",
    "Signer",
    "TrustBundle",
    "Verifier",
    "run_service",
    "serve",
]
