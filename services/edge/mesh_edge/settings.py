"""The edge's settings (``MESH_EDGE_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh_kit.settings import ServiceSettings


class EdgeSettings(BaseSettings):
    """Everything the edge reads. Its own NATS identity (``MESH_CREDS_FILE``, the mesh's CA) and
    the tenants it speaks for (their client keys and data keys, one file each in ``keys_dir``)."""

    model_config = SettingsConfigDict(
        env_prefix="MESH_EDGE_", extra="ignore", populate_by_name=True, use_attribute_docstrings=True
    )

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias="MESH_NATS_URL")
    """The broker (several, comma-separated, for a cluster)."""
    creds_file: Path | None = Field(None, validation_alias="MESH_CREDS_FILE")
    """The edge's own NATS credentials (principal ``edge``)."""
    tls_ca_file: Path | None = Field(None, validation_alias="MESH_TLS_CA_FILE")
    """The mesh's CA: the broker's certificate is verified against it."""
    trust_bundle_file: Path = Field(Path("trust-bundle.json"), validation_alias="MESH_TRUST_BUNDLE_FILE")
    """What every message the edge streams to a browser is verified against."""
    keys_dir: Path = Path("keys")
    """The tenants the edge speaks for: ``client.<tenant>.pem`` (the tenant client's signing key)
    and ``data.<tenant>.key`` (its data key, hex) for each; a tenant with no key here is refused."""
    host: str = "127.0.0.1"
    """The address HTTP is served on (``0.0.0.0`` in a container)."""
    port: int = Field(8088, ge=0, le=65535)
    """The HTTP port: the API, ``/healthz``, ``/readyz`` and the web app."""
    issuer: str = ""
    """The identity provider's ``iss``; required in every user token when set."""
    audience: str = "agentmesh-edge"
    """The ``aud`` every user token must carry."""
    issuer_keys_file: Path | None = None
    """The identity provider's public keys: a PEM file (one or more keys) or a JWKS JSON file."""
    jwks_url: str = ""
    """Or where the identity provider publishes its JWKS (OIDC ``jwks_uri``), fetched and cached."""
    tenant_claim: str = "tenant"
    """The user token's claim naming the tenant the person acts for."""
    leeway_s: float = 30.0
    """Clock skew allowed on ``exp``/``nbf``/``iat``."""
    static_dir: Path | None = None
    """A folder served at ``/`` (the example web app, ``examples/web``); none: no page."""
    cors_origins: list[str] = []
    """Origins allowed to call the API from another page (none: same origin only)."""
    max_goal_chars: int = Field(20_000, ge=1)
    """The longest goal a person may submit."""
    follow_timeout_s: float = Field(900.0, gt=0)
    """The longest one event stream stays open (a client resumes with ``Last-Event-ID``)."""
    max_streams_per_user: int = Field(16, ge=1)
    """Event streams one person may hold open at once; more are refused with 429 (a runaway tab
    or script cannot hold the edge's subscriptions)."""
    keepalive_s: float = Field(15.0, gt=0)
    """A comment line this often on an idle event stream, so proxies keep it open."""

    # The variables a field is read from, and a bad one as one line, as every service's settings say them.
    env_names: ClassVar[Any] = classmethod(ServiceSettings.env_names.__func__)  # type: ignore[attr-defined]
    error_line: ClassVar[Any] = classmethod(ServiceSettings.error_line.__func__)  # type: ignore[attr-defined]
