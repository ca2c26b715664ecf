"""The A2A gateway's settings (``MESH_A2A_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh_edge.settings import EdgeSettings
from mesh_kit.settings import ServiceSettings


class A2aSettings(BaseSettings):
    """Everything the gateway reads. Its own NATS identity (``MESH_CREDS_FILE``, the mesh's CA),
    the tenants it speaks for (their client keys and data keys, one file each in ``keys_dir``) and
    the identity provider its callers sign in with, as the edge's."""

    model_config = SettingsConfigDict(
        env_prefix="MESH_A2A_", extra="ignore", populate_by_name=True, use_attribute_docstrings=True
    )

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias="MESH_NATS_URL")
    """The broker (several, comma-separated, for a cluster)."""
    creds_file: Path | None = Field(None, validation_alias="MESH_CREDS_FILE")
    """The gateway's own NATS credentials (principal ``a2a``)."""
    tls_ca_file: Path | None = Field(None, validation_alias="MESH_TLS_CA_FILE")
    """The mesh's CA: the broker's certificate is verified against it."""
    trust_bundle_file: Path = Field(Path("trust-bundle.json"), validation_alias="MESH_TRUST_BUNDLE_FILE")
    """What every message the gateway hands on to an A2A client is verified against."""
    keys_dir: Path = Path("keys")
    """The tenants the gateway speaks for: ``client.<tenant>.pem`` (the tenant client's signing key)
    and ``data.<tenant>.key`` (its data key, hex) for each, and ``approver.<tenant>.<person>.pem``
    for the people who may decide a held call over A2A; a tenant with no key here is refused."""
    host: str = "127.0.0.1"
    """The address HTTP is served on (``0.0.0.0`` in a container)."""
    port: int = Field(8089, ge=0, le=65535)
    """The HTTP port: the agent cards, the JSON-RPC endpoints, ``/healthz`` and ``/readyz``."""
    public_url: str = ""
    """The base URL the agent cards name (``https://agents.example.com``: what A2A clients reach
    through your ingress); empty: the URL each card request came in on."""
    issuer: str = ""
    """The identity provider's ``iss``; required in every caller's token when set."""
    audience: str = "agentmesh-a2a"
    """The ``aud`` every caller's token must carry."""
    issuer_keys_file: Path | None = None
    """The identity provider's public keys: a PEM file (one or more keys) or a JWKS JSON file."""
    jwks_url: str = ""
    """Or where the identity provider publishes its JWKS (OIDC ``jwks_uri``), fetched and cached."""
    tenant_claim: str = "tenant"
    """The token's claim naming the tenant the caller acts for (it must be the tenant in the path)."""
    leeway_s: float = 30.0
    """Clock skew allowed on ``exp``/``nbf``/``iat``."""
    max_tasks_per_user: int = Field(16, ge=1)
    """Tasks one caller may have this gateway replica follow at once (a new send beyond it is
    refused, and says so); a retried send of a task it already follows does not count again."""
    follow_timeout_s: float = Field(900.0, gt=0)
    """The longest the gateway follows one task for one request; the task runs on in the mesh and
    ``GetTask`` or ``SubscribeToTask`` see it end."""
    push_allowed_hosts: list[str] = []
    """Where push notifications may go: ``host``, ``host:port`` or ``*.domain`` (each trusted
    whatever it resolves to, a webhook inside your network); empty: any host whose every address
    is public (no loopback, private, link-local or cloud-metadata address: no SSRF)."""

    # The variables a field is read from, and a bad one as one line, as every service's settings say them.
    env_names: ClassVar[Any] = classmethod(ServiceSettings.env_names.__func__)  # type: ignore[attr-defined]
    error_line: ClassVar[Any] = classmethod(ServiceSettings.error_line.__func__)  # type: ignore[attr-defined]

    def as_edge(self) -> EdgeSettings:
        """The edge's view of these settings: its sign-in (``mesh_edge.users``) and tenant
        identities (``mesh_edge.tenants``) read them, and the gateway reuses both. Built without
        reading the environment (no ``MESH_EDGE_*`` variable leaks in)."""
        shared = set(EdgeSettings.model_fields) & set(type(self).model_fields)
        return EdgeSettings.model_construct(**{name: getattr(self, name) for name in shared})
