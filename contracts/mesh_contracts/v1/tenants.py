"""Version 1 of a tenant's own settings record (bucket ``tenants``, key ``<tenant>``).

Written by an operator (``meshctl tenant retention``, the admin identity); read by the keeper
(``meshctl keeper``) and by ``meshctl tenant show``. Today it holds the tenant's retention per
data class (issue 42); a tenant registry (issue 47) adds its other settings as optional fields.
"""

from __future__ import annotations

from typing import ClassVar

from mesh_contracts.v1.records import Record


class TenantRecord(Record):
    """One tenant's settings, as the operator last set them."""

    bucket: ClassVar[str] = "tenants"
    name: ClassVar[str] = "tenant"
    key_format: ClassVar[str] = "<tenant>"

    tenant: str
    retention_s: dict[str, float] = {}
    """Data class (``mesh_contracts.lifecycle.DATA_CLASSES``: tasks, tools, usage) -> how long the
    mesh keeps the tenant's data of that class, in seconds. A class not named here is kept for the
    deployment's retention (the streams' max_age); a retention can only shorten that."""
    updated_at: float = 0.0
    updated_by: str = ""
    """Who set it (the operator's principal)."""
