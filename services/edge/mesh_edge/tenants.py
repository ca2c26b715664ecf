"""The tenants the edge speaks for: each one's client (the door, its retries, believing what the
mesh says) over the edge's one connection, and the tenant's data key to seal and open its content."""

from __future__ import annotations

import os
from pathlib import Path

from nats.aio.client import Client as NATS

from mesh_contracts import sealing
from mesh_edge.settings import EdgeSettings
from mesh_edge.users import TENANT, Forbidden
from mesh_identity.datakeys import Keyring, wrap
from mesh_kit.state import bind
from meshctl.approver import Approver
from meshctl.client import TenantClient


class Tenants:
    """A ``TenantClient`` per tenant the edge holds keys for, made on first use and kept. The
    keys are read from ``keys_dir`` when a tenant is first asked for, so a tenant added at runtime
    (``meshctl tenant add``, its keys mounted) is served without a restart."""

    def __init__(self, settings: EdgeSettings, nc: NATS) -> None:
        self.settings, self.nc = settings, nc
        self.clients: dict[str, TenantClient] = {}
        self._kek = os.urandom(32)  # wraps the tenants' keys in this process's keyring only
        self._wrapped: dict[str, str] = {}
        sealing.install(Keyring(self._kek, lambda: self._wrapped))

    def _paths(self, tenant: str) -> tuple[Path, Path]:
        d = self.settings.keys_dir
        return d / f"client.{tenant}.pem", d / f"data.{tenant}.key"

    def client(self, tenant: str) -> TenantClient:
        """The tenant's client, or ``Forbidden`` when the edge holds no identity for it."""
        got = self.clients.get(tenant)
        if got is not None:
            return got
        signing, data = self._paths(tenant)
        if not signing.exists() or not data.exists():
            raise Forbidden(f"this edge does not serve tenant {tenant!r}")
        self._wrapped[tenant] = wrap(self._kek, tenant, bytes.fromhex(data.read_text().strip()))
        client = TenantClient(
            self.settings.nats_url, tenant, Path(os.devnull), signing, self.settings.trust_bundle_file,
            self.settings.tls_ca_file,
        )  # fmt: skip
        client.nc = self.nc  # the edge's own connection: its rights cover every tenant's door and events
        self.clients[tenant] = client
        return client

    def approver(self, tenant: str, person: str) -> Approver:
        """``person`` of ``tenant`` deciding approvals with their own key (``approver.<tenant>.<person>.pem``
        in ``keys_dir``: the people a tenant has named, ``meshctl approvers add``, and given to the
        edge), or ``Forbidden``. The tool-executor believes the decision for that tenant only."""
        principal = f"approver.{tenant}.{person}"
        key = self.settings.keys_dir / f"{principal}.pem"
        if not TENANT.match(person) or not key.exists():
            raise Forbidden(f"{person} does not approve {tenant}'s calls here (no key of {principal} at this edge)")
        self.client(tenant)  # the tenant's data key: the approval's arguments open with it
        approver = Approver(
            self.settings.nats_url, Path(os.devnull), key, principal, self.settings.tls_ca_file, tenant,
            self.settings.trust_bundle_file,
        )  # fmt: skip
        approver.nc, approver.kv = self.nc, bind(self.nc, "approvals")
        return approver
