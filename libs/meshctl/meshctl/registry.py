"""Tenants as a runtime resource (issue 47): add, suspend, resume and remove a tenant of a running
mesh, with no restart and no re-render anywhere.

Adding a tenant mints, in the operator's home, its client's NATS credentials (a user of the mesh
account signed by the account's signing key: the broker accepts it as it is, no server change),
its signing key, its auditor's key and its data key (wrapped by the deployment's), and writes one
record to KV ``tenants``, signed by the admin. Every service reads that record when it first
meets the tenant (``mesh_tenancy.registry``), so nothing else is rewritten and nothing restarts: the
cost of a tenant does not grow with the number of tenants. Each change is a link of the tenant's
audit chain (``tenant.added``, ``tenant.suspended``, ``tenant.resumed``, ``tenant.limits-set``,
``tenant.removed``), signed by the admin.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.js.errors
import nkeys
from nacl.public import PrivateKey
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from mesh_contracts.v1.audit import TENANT_WIDE
from mesh_contracts.v1.tenants import TenantIdentity, TenantRecord
from mesh_durable.chain import AuditChain
from mesh_identity import (
    Signer,
    TrustBundle,
    Verifier,
    load_private_key,
    new_signing_key,
    private_pem,
    public_pem,
)
from mesh_identity.datakeys import new_data_key, read_key_file, wrap
from mesh_identity.registry import signed_record
from meshctl.identity import ACCOUNT, Identities, _load_or_new, creds_text, new_keypair, user_jwt, write_secret
from meshctl.local import MeshError
from meshctl.policy import client_permissions

ADMISSION_KEYS = ("max_in_flight", "rate_per_s", "burst")
BUDGET_KEYS = ("daily_tokens", "daily_cost_usd")
QUOTA_KEYS = ("mib", "msgs", "mib_per_min")
LIMIT_NAMES = (f"{', '.join(ADMISSION_KEYS)} (admission), {', '.join(BUDGET_KEYS)} (the budget's tenant-day ceilings), "
               f"quota.<STREAM>.{{{','.join(QUOTA_KEYS)}}} (a stream with a door, or DLQ)")  # fmt: skip


class RegistryError(MeshError):
    """A registry change that cannot be made, and why (one line: meshctl prints it and exits 2)."""


@dataclass
class Added:
    tenant: str
    seconds: float
    """From the first key minted to the record stored and the audit link written."""
    revision: int


class Minter:
    """Mints tenants' identities in one home: the account's keys are read once."""

    def __init__(self, ids: Identities) -> None:
        if not ids.exists():
            raise RegistryError(f"no identities in {ids.home} (run: meshctl init)")
        self.ids = ids
        self.account = _load_or_new(ids.secrets / f"account-{ACCOUNT}.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        self.signing = _load_or_new(ids.secrets / f"account-{ACCOUNT}-signing.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        self.kek = read_key_file(ids.data_key)

    def mint(self, tenant: str) -> TenantIdentity:
        """The tenant's client credentials, signing key, auditor key and data key, written to the
        home (0600); what the services need of them (public, or wrapped). What a previous add that
        did not finish (no record was written) left here is reused, not made twice."""
        ids, name = self.ids, f"client.{tenant}"
        if not ids.creds(name).exists():
            user = new_keypair(nkeys.PREFIX_BYTE_USER)
            write_secret(ids.creds(name), creds_text(user_jwt(self.account, self.signing, user,
                                                              client_permissions(tenant)), user))  # fmt: skip
        if ids.signing_key(name).exists():
            key = load_private_key(ids.signing_key(name))
        else:
            key = new_signing_key()
            write_secret(ids.signing_key(name), private_pem(key))
        if ids.auditor_key(tenant).exists():
            auditor = PrivateKey(base64.b64decode(ids.auditor_key(tenant).read_text().strip()))
        else:
            auditor = PrivateKey.generate()
            write_secret(ids.auditor_key(tenant), base64.b64encode(bytes(auditor)).decode())
        if ids.tenant_data_key(tenant).exists():
            data_key = bytes.fromhex(ids.tenant_data_key(tenant).read_text().strip())
        else:
            data_key = new_data_key()
            write_secret(ids.tenant_data_key(tenant), data_key.hex())
        return TenantIdentity(
            client_key=public_pem(key.public_key()),
            auditor_key=base64.b64encode(bytes(auditor.public_key)).decode(),
            data_key=wrap(self.kek, tenant, data_key),
        )


class Registry:
    """The admin's side of the tenant registry, over one connection."""

    def __init__(self, nc: NATS, ids: Identities, kv: KeyValue) -> None:
        self.nc, self.ids, self.kv = nc, ids, kv
        self.signer = Signer.from_file("admin", ids.signing_key("admin"))
        self._minter: Minter | None = None

    @classmethod
    async def open(cls, nc: NATS, ids: Identities) -> Registry:
        from meshctl.commands.common import bucket

        return cls(nc, ids, await bucket(nc, TenantRecord.bucket))

    def bundle_tenants(self) -> set[str]:
        """Tenants whose keys are in the trust bundle (minted with the mesh)."""
        bundle = TrustBundle.from_file(self.ids.trust_bundle)
        return {p.tenant for p in bundle.principals.values() if p.tenant and p.role == "client"}

    async def record(self, tenant: str) -> tuple[TenantRecord | None, int]:
        try:
            entry = await self.kv.get(tenant)
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, 0
        return TenantRecord.model_validate_json(entry.value), entry.revision or 0

    async def known(self, tenant: str) -> TenantRecord:
        """The tenant's record (a bundle tenant without one gets a fresh one), or ``RegistryError``."""
        rec, _ = await self.record(tenant)
        if rec is not None:
            return rec
        if tenant in self.bundle_tenants():
            return TenantRecord(tenant=tenant)
        raise RegistryError(f"unknown tenant {tenant!r} (meshctl tenant list; add one with: meshctl tenant add)")

    async def _write(self, rec: TenantRecord, kind: str, detail: dict[str, object], last: int | None) -> int:
        """Sign and store the record (compare-and-set on ``last``; None: create), then its audit link."""
        body = signed_record(rec, self.signer)
        rev = await (self.kv.create(rec.tenant, body) if last is None else self.kv.update(rec.tenant, body, last))
        await AuditChain(lambda: self.nc, lambda: self.signer, keys=self._auditor).append(
            rec.tenant,
            TENANT_WIDE,
            kind,
            f"{kind}:{rec.tenant}:{rev}",
            actor="admin",
            detail={**detail, "revision": rev},
        )
        return rev

    def _auditor(self, tenant: str) -> bytes | None:
        path = self.ids.auditor_key(tenant)
        if not path.exists():
            return TrustBundle.from_file(self.ids.trust_bundle).auditors.get(tenant)
        return bytes(PrivateKey(base64.b64decode(path.read_text().strip())).public_key)

    async def add(self, tenant: str, limits: dict[str, float] | None = None) -> Added:
        t0 = time.perf_counter()
        if tenant in self.bundle_tenants() or (await self.record(tenant))[0] is not None:
            raise RegistryError(f"tenant {tenant!r} exists already")
        if self._minter is None:
            self._minter = Minter(self.ids)
        rec = TenantRecord(tenant=tenant, identity=self._minter.mint(tenant))
        for name, value in (limits or {}).items():
            where, key = _place(rec, name)
            where[key] = value
        rev = await self._write(rec, "tenant.added", {"admission": rec.admission, "budget": rec.budget,
                                                      "quotas": rec.quotas}, None)  # fmt: skip
        return Added(tenant, time.perf_counter() - t0, rev)

    async def set_status(self, tenant: str, status: str) -> tuple[TenantRecord, bool]:
        """Suspend or resume; whether anything changed."""
        rec, rev = await self.record(tenant)
        rec = rec or await self.known(tenant)
        if rec.status == status:
            return rec, False
        rec.status = status  # type: ignore[assignment]
        await self._write(rec, f"tenant.{'suspended' if status == 'suspended' else 'resumed'}", {}, rev or None)
        return rec, True

    async def set_limits(self, tenant: str, limits: dict[str, float | None]) -> TenantRecord:
        """The tenant's own limits (``parse_limits``; None: back to the settings'), read live by the
        planner (admission), the budget (tenant-day ceilings) and every service (quotas)."""
        rec, rev = await self.record(tenant)
        rec = rec or await self.known(tenant)
        for name, value in limits.items():
            where, key = _place(rec, name)
            if value is None:
                where.pop(key, None)
            else:
                where[key] = value
        rec.quotas = {stream: q for stream, q in rec.quotas.items() if q}
        await self._write(rec, "tenant.limits-set", {"admission": rec.admission, "budget": rec.budget,
                                                     "quotas": rec.quotas}, rev or None)  # fmt: skip
        return rec

    async def set_retention(self, tenant: str, changes: dict[str, float | None]) -> TenantRecord:
        """The tenant's retention per data class (None: the deployment's), on its audit chain as
        ``control.retention-set`` (its name since issue 42)."""
        rec, rev = await self.record(tenant)
        rec = rec or await self.known(tenant)
        for c, keep in changes.items():
            if keep is None:
                rec.retention_s.pop(c, None)
            else:
                rec.retention_s[c] = keep
        await self._write(rec, "control.retention-set", {"retention_s": rec.retention_s}, rev or None)
        return rec

    async def list(self) -> dict[str, TenantRecord | None]:
        """Every tenant: those with a record, and the bundle's without one (None)."""
        from meshctl import keeper

        streams = keeper.Streams(self.nc)
        try:
            records: dict[str, TenantRecord | None] = dict(await keeper.tenant_records(streams))
        finally:
            await streams.close()
        for t in self.bundle_tenants():
            records.setdefault(t, None)
        return dict(sorted(records.items()))

    async def forget(self, tenant: str, erased: Callable[[], Awaitable[object]]) -> None:
        """Remove the tenant: suspended first (no new work while its data goes), ``erased()`` (issue
        42's erasure), then its record with every earlier revision (they hold its wrapped data key),
        and its keys in this home. Its NATS user is revoked by the caller (``revoke``)."""
        rec, _ = await self.record(tenant)
        if rec is None or rec.identity is None:
            raise RegistryError(f"{tenant!r} was not added at runtime (its keys are in the trust bundle): erase it "
                                "with meshctl tenant erase, and revoke client." + tenant)  # fmt: skip
        await self.set_status(tenant, "suspended")
        await erased()
        await AuditChain(lambda: self.nc, lambda: self.signer).append(
            tenant, TENANT_WIDE, "tenant.removed", f"tenant.removed:{tenant}:{time.time():.3f}", actor="admin",
            detail={"record_revisions_purged": True},
        )  # fmt: skip
        await self.kv.purge(tenant)
        for path in (self.ids.tenant_data_key(tenant), self.ids.signing_key(f"client.{tenant}")):
            _shred(path)


async def attach_tenant(nc: NATS, verifier: Verifier, tenant: str) -> None:
    """Make ``verifier`` know ``tenant`` if it was added at runtime (its record, verified, read
    once): what ``meshctl history``, ``trace`` and ``replay`` judge its client's messages by."""
    try:
        entry = await (await nc.jetstream().key_value(TenantRecord.bucket)).get(tenant)
    except (KeyNotFoundError, nats.js.errors.BucketNotFoundError):
        return
    if entry.value:
        verifier.tenants.put(tenant, entry.value)


def _shred(path: os.PathLike[str] | str) -> None:
    try:
        size = max(os.stat(path).st_size, 64)
    except FileNotFoundError:
        return
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    os.unlink(path)


def _place(rec: TenantRecord, name: str) -> tuple[dict[str, float], str]:
    """Where limit ``name`` lives in the record, and under which key."""
    if name in ADMISSION_KEYS:
        return rec.admission, name
    if name in BUDGET_KEYS:
        return rec.budget, name
    _, stream, key = name.split(".")
    return rec.quotas.setdefault(stream, {}), key


def parse_limits(pairs: list[str]) -> dict[str, float | None]:
    """``max_in_flight=4 daily_cost_usd=5 quota.RAG.mib=2048 burst=default`` -> limits by name
    (None: back to the settings'), or ``RegistryError`` naming the first bad pair."""
    from mesh_contracts import topology as topo

    streams = {*topo.door_streams(), topo.DLQ_STREAM}
    out: dict[str, float | None] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        parts = name.split(".")
        quota = len(parts) == 3 and parts[0] == "quota" and parts[1] in streams and parts[2] in QUOTA_KEYS
        if not eq or not (name in ADMISSION_KEYS or name in BUDGET_KEYS or quota):
            raise RegistryError(f"{pair!r}: want NAME=VALUE, NAME one of {LIMIT_NAMES}")
        if value == "default":
            out[name] = None
            continue
        try:
            number = float(value)
        except ValueError:
            raise RegistryError(f"{pair!r}: {value!r} is not a number (or 'default')") from None
        if not number >= 0 or number == float("inf"):
            raise RegistryError(f"{pair!r}: a limit is a number at least 0")
        if name == "daily_tokens" and number < 1:
            raise RegistryError(f"{pair!r}: a tenant-day token ceiling is at least 1 (or 'default')")
        out[name] = number
    return out


def shown(rec: TenantRecord | None) -> str:
    """The tenant's own limits in one line ('-': none)."""
    if rec is None:
        return "-"
    items = [*rec.admission.items(), *rec.budget.items()]
    items += [(f"quota.{s}.{k}", v) for s, q in rec.quotas.items() for k, v in q.items()]
    return ",".join(f"{k}={v:g}" for k, v in items) or "-"


def dumps(records: dict[str, TenantRecord | None]) -> str:
    return json.dumps({t: (r.model_dump(exclude={"signature"}) if r else {"tenant": t, "status": "active",
                                                                          "minted_with_mesh": True})
                       for t, r in records.items()}, indent=2)  # fmt: skip
