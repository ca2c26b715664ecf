"""What the commands reach the mesh with: the mesh ``meshctl up`` runs, the admin's connection, a
KV bucket, a tenant's client, the approver, the budget service's answers; and the one-line way to
say that something is not there."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import nats
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from mesh_identity import Signer, TrustBundle, Verifier
from mesh_kit.settings import log_nats_error, nats_servers
from meshctl import options as opt
from meshctl.identity import Identities
from meshctl.local import MeshError, MeshState

if TYPE_CHECKING:
    from meshctl.approver import Approver
    from meshctl.client import TenantClient
    from meshctl.top import Asker


def running(home: Path) -> MeshState:
    state = MeshState.load(home)
    if state is None or not any(n.alive() for n in state.nats):
        raise MeshError(f"no mesh is running from {home} (start one with: meshctl up)")
    return state


def nats_url(args: argparse.Namespace, home: Path) -> str:
    if getattr(args, "nats_url", None):
        url: str = args.nats_url  # argparse's Namespace is untyped: --nats-url is a str
        return url
    return running(home).nats_url


CONNECT_WITHIN_S = 15.0
"""How long meshctl waits for the broker before it says why not."""


async def admin(args: argparse.Namespace) -> NATS:
    home = opt.home(args)
    ids = Identities(home)
    if not ids.creds("admin").exists():
        raise MeshError(f"no identities in {home} (run: meshctl init)")
    url = nats_url(args, home)
    seen: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        seen.append(exc)
        await log_nats_error(exc)

    try:
        # Bounded: nats-py never returns from a connect whose TLS handshake failed (a server
        # certificate this home's CA did not sign, or no CA at all), retries or not.
        return await asyncio.wait_for(
            nats.connect(
                nats_servers(url),
                name="meshctl",
                connect_timeout=5,
                max_reconnect_attempts=0,
                error_cb=on_error,
                **ids.connect_options("admin"),
            ),
            CONNECT_WITHIN_S,
        )
    except TimeoutError:
        why = f"{type(seen[-1]).__name__}: {seen[-1]}" if seen else f"no answer in {CONNECT_WITHIN_S:g} s"
        hint = "" if ids.tls_ca.exists() else f" (this home has no CA file at {ids.tls_ca})"
        raise MeshError(f"cannot connect to {url}: {why}{hint}") from None


async def audit_as_admin(
    args: argparse.Namespace, nc: NATS, tenant: str, kind: str, key: str, detail: dict[str, object]
) -> None:
    """An operator's action as a link of ``tenant``'s audit chain (tenant-wide), signed with the admin's key."""
    from mesh_contracts.v1.audit import TENANT_WIDE
    from mesh_durable.chain import AuditChain

    ids = Identities(opt.home(args))
    signer = Signer.from_file("admin", ids.signing_key("admin"))
    auditors = TrustBundle.from_file(ids.trust_bundle).auditors if ids.trust_bundle.exists() else {}
    await AuditChain(lambda: nc, lambda: signer, keys=auditors.get).append(
        tenant, TENANT_WIDE, kind, key, actor="admin", detail=detail
    )


async def bucket(nc: NATS, name: str) -> KeyValue:
    try:
        return await nc.jetstream().key_value(name)
    except nats.js.errors.BucketNotFoundError:
        raise MeshError(f"no {name!r} KV bucket on this mesh (create it with: meshctl provision)") from None


def absent(message: str) -> int:
    print(f"meshctl: {message}", file=sys.stderr)
    return 1


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def tenant_client(args: argparse.Namespace) -> TenantClient:
    """The client of ``--tenant`` with its own identity (not yet connected)."""
    from meshctl.client import TenantClient

    home = opt.home(args)
    ids = Identities(home)
    principal = f"client.{args.tenant}"
    if not ids.creds(principal).exists():
        raise MeshError(
            f"unknown tenant {args.tenant!r} (known: {', '.join(ids.tenants()) or 'none'}; "
            "add one with: meshctl tenant add NAME)"
        )
    return TenantClient.of(ids, nats_url(args, home), args.tenant)


def approver(args: argparse.Namespace) -> Approver:
    from meshctl.approver import ApprovalError, Approver

    home = opt.home(args)
    ids = Identities(home)
    if not ids.creds("approver").exists():
        raise MeshError(f"no approver identity in {home} (run: meshctl init)")
    try:
        return Approver.of(ids, nats_url(args, home), person=getattr(args, "as_", None))
    except ApprovalError as exc:
        raise MeshError(str(exc)) from None


def budget_asker(args: argparse.Namespace) -> Asker | None:
    """Ask the budget service what it sees (``budget.status``), signed with the home's admin key
    and its answer verified against the home's trust bundle; None without an admin key."""
    from meshctl.ask import budget_status

    ids = Identities(opt.home(args))
    if not ids.signing_key("admin").exists():
        return None
    signer = Signer.from_file("admin", ids.signing_key("admin"))
    verifier = Verifier(TrustBundle.from_file(ids.trust_bundle))
    return lambda nc: budget_status(nc, signer, verifier)
