"""AgentMesh bus runtime: settings, the connection, signed envelopes, verified durable consumers, DLQ."""

from mesh_identity import IdentityError, Signer, TrustBundle, Verifier
from mesh_kit.delivery import Delivery, Park, PermissionViolation, Reject, Retry
from mesh_kit.settings import ServiceSettings

__all__ = [
    "Delivery",
    "IdentityError",
    "Park",
    "PermissionViolation",
    "Reject",
    "Retry",
    "ServiceSettings",
    "Signer",
    "TrustBundle",
    "Verifier",
]
