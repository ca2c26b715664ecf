"""Version 1 of a tenant's record in the registry (bucket ``tenants``, key ``<tenant>``).

Written by an operator (``meshctl tenant add | suspend | resume | retention | remove``, the admin
identity), signed by an operator's key; read by every service (whom it trusts, whether it takes
new work, its admission limits), by the keeper (its retention) and by ``meshctl tenant show``.

A tenant minted with the mesh (``meshctl up --tenants``) has its keys in the trust bundle and a
record only once an operator set something for it; a tenant added at runtime (issue 47) has its
keys here (``identity``), so adding one rewrites nothing but its own record.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh_contracts.v1.records import Record

TenantStatus = Literal["active", "suspended"]


class TenantIdentity(BaseModel):
    """The public half of a tenant added at runtime: what the services judge its client's tokens
    by, seal its audit destinations to and open its content with."""

    model_config = ConfigDict(extra="allow")

    client_key: str = Field(max_length=512)
    """The Ed25519 public key (PEM) of its client principal ``client.<tenant>``."""
    auditor_key: str = Field(max_length=128)
    """Its auditor's X25519 public key (base64): what is sealed to it only the tenant's auditor opens;
    '' once erased (the key was destroyed: a later link withholds its sealed fields)."""
    data_key: str = Field("", max_length=512)
    """Its data key wrapped by the deployment's data key (``mesh_identity.datakeys.wrap``); '' once
    erased."""


class TenantRecord(Record):
    """One tenant's record, as the operator last set it."""

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
    status: TenantStatus = "active"
    """``suspended``: every door refuses the tenant's new work (``tenant_suspended``); its data,
    running tasks' records and history are kept, and a resume takes new work again."""
    identity: TenantIdentity | None = None
    """Its keys, for a tenant added at runtime; None for one whose keys are in the trust bundle."""
    admission: dict[str, float] = {}
    """Its own admission limits (``max_in_flight``, ``rate_per_s``, ``burst``), over its
    ``MESH_ADMISSION_TENANTS`` entry and the planner's defaults: the planner reads them live."""
    budget: dict[str, float] = {}
    """Its own tenant-day ceilings (``daily_tokens``, ``daily_cost_usd``), over its
    ``MESH_BUDGET_TENANT_LIMITS`` entry: the budget service reads them live at each reservation."""
    quotas: dict[str, dict[str, float]] = {}
    """Its own quotas per stream with a door or the DLQ (``{"RAG": {"mib": 2048, "msgs": 0,
    "mib_per_min": 256}}``), over its ``MESH_QUOTA_TENANTS`` entry: every service reads them live at
    each charge (``mesh_tenancy.quota``)."""
    signature: str = Field("", max_length=4096)
    """An operator's signed statement (``tenant-record``) over the digest of the rest of the
    record: a service believes no record, and no key in it, that an operator did not sign."""
