"""The tenant registry as a service sees it: each tenant's record (``mesh_contracts.v1.tenants``),
signed by an operator, read when the tenant is first met and followed while it is known.

The trust bundle holds the mesh's own principals and the tenants minted with it; a tenant added
at runtime is one record of its own in KV ``tenants`` instead (issue 47), so adding one rewrites
nothing every service must re-read, and a service holds nothing for a tenant it has not met.
``TrustBundle.attach`` makes the bundle's lookups (a principal, an auditor's key, a data key) fall
back to the ``Directory``: every reader of the bundle sees registered tenants without knowing.
Each ``Verifier`` holds one (``verifier.tenants``); ``mesh_tenancy.registry`` reads and follows the records.

A record is believed only if an operator of the bundle in force signed it (``signed_record``): a
``tenant-record`` statement over the digest of everything else in the record. A record older than
the newest one this process accepted for the tenant is refused (a replayed ``active`` record does
not undo a suspension here).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh_contracts.base import CLIENT
from mesh_contracts.v1.tenants import TenantRecord
from mesh_identity.errors import IdentityError
from mesh_identity.keys import OPERATOR_ROLES, Principal, _load_public, body_digest

if TYPE_CHECKING:
    from mesh_identity.bundle import TrustBundle
    from mesh_identity.tokens import Signer

log = logging.getLogger("mesh.tenants")
RECORD_STATEMENT = "tenant-record"
STATEMENT_TTL_S = 10 * 365 * 86400.0
"""A record's statement does not expire: it stands until the operator writes the next record."""
UNKNOWN_KEPT = 4096
"""Tenants remembered as not registered (each for ``UNKNOWN_TTL_S``): a flood of made-up tenant
names costs one read each per that long, not one per message."""
UNKNOWN_TTL_S = 30.0


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in data.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()  # fmt: skip


def signed_record(record: TenantRecord, operator: Signer, now: float | None = None) -> bytes:
    """``record`` as an operator writes it to the registry: stamped ``updated_at``/``updated_by``
    and signed (a ``tenant-record`` statement over the digest of the rest)."""
    now = time.time() if now is None else now
    record.updated_at, record.updated_by, record.signature = now, operator.principal, ""
    data = json.loads(record.model_dump_json())
    record.signature = operator.statement(
        RECORD_STATEMENT, {"dig": body_digest(_canonical(data)), "ten": record.tenant}, now, STATEMENT_TTL_S
    )
    return record.to_bytes()


@dataclass(frozen=True)
class TenantEntry:
    """What a service holds of one registered tenant, from its verified record."""

    record: TenantRecord = field(repr=False)
    client: Principal | None
    auditor: bytes | None
    data_key: str | None


def accepted_record(bundle: TrustBundle, data: bytes, tenant: str, leeway_s: float) -> TenantEntry:
    """The entry of ``tenant``'s record ``data`` if an operator of ``bundle`` signed it; else
    ``IdentityError`` saying why."""
    from mesh_identity.tokens import Verifier

    try:
        raw = json.loads(data)
        record = TenantRecord.model_validate_json(data)
    except Exception as exc:  # noqa: BLE001 - any unreadable record is refused, with the reason
        raise IdentityError(f"tenant record of {tenant!r} unreadable: {str(exc)[:200]}") from None
    if record.tenant != tenant:
        raise IdentityError(f"the record under {tenant!r} is {record.tenant!r}'s")
    if not record.signature:
        raise IdentityError(f"tenant record of {tenant!r} is not signed")
    _, claims = Verifier(bundle, leeway_s).statement(
        record.signature, kind=RECORD_STATEMENT, roles=OPERATOR_ROLES, require=["dig", "ten"], at=record.updated_at
    )
    if claims["ten"] != tenant or claims["dig"] != body_digest(_canonical(raw)):
        raise IdentityError(f"tenant record of {tenant!r}: the signature does not cover this record")
    ident = record.identity
    client = auditor = None
    if ident is not None:
        key = _load_public(f"{CLIENT}.{tenant}", ident.client_key)
        client = Principal(f"{CLIENT}.{tenant}", CLIENT, tenant, key)
        auditor = base64.b64decode(ident.auditor_key) if ident.auditor_key else None  # none once erased
        if auditor is not None and len(auditor) != 32:
            raise IdentityError(f"tenant record of {tenant!r}: the auditor key is not a 32-byte X25519 key")
    return TenantEntry(record, client, auditor, (ident.data_key or None) if ident else None)


class Directory:
    """The registered tenants this process has met: each one's record, verified against the bundle
    in force (``bundle``), kept while the tenant is known and replaced as the operator changes it
    (``put``, ``drop``). It reads nothing itself: its ``reader`` (``mesh_tenancy.registry``) does."""

    def __init__(self, bundle: Callable[[], TrustBundle], leeway_s: float) -> None:
        self._bundle, self.leeway_s = bundle, leeway_s
        self.entries: dict[str, TenantEntry] = {}
        self.absent: OrderedDict[str, float] = OrderedDict()
        """Tenants found not registered, and when (monotonic): not read again for ``UNKNOWN_TTL_S``
        (a record written meanwhile reaches the follower's subscription)."""
        self.reader: Callable[[str], Awaitable[None]] | None = None
        """Reads a tenant's record into ``put`` (``know``); None: only what is put is known."""
        self.refused = 0
        """Records refused (unsigned, forged, older than the one held); each is also logged, with why."""

    async def know(self, tenant: str) -> None:
        """Hold ``tenant``'s record, if it has one, before a message of it is read (its client's key,
        auditor and data key are then known to every reader of the bundle): ``reader`` reads it
        once on first meeting (``mesh_tenancy.registry`` installs it; without one, nothing is read)."""
        bundle = self._bundle()
        if bundle.directory is not self:  # a bundle set from elsewhere (a test's, a rotation's)
            bundle.attach(self)
        if self.reader is not None and tenant and self.should_read(tenant):
            await self.reader(tenant)

    def put(self, tenant: str, data: bytes) -> TenantEntry | None:
        """Hold ``tenant``'s record ``data`` if it is signed and not older than the one held; the
        entry in force afterwards."""
        held = self.entries.get(tenant)
        try:
            entry = accepted_record(self._bundle(), data, tenant, self.leeway_s)
        except IdentityError as exc:
            self.refused += 1
            log.error("refused the registry's record of tenant %s: %s", tenant, exc)
            return held
        if held is not None and entry.record.updated_at < held.record.updated_at:
            self.refused += 1
            log.error("refused an older record of tenant %s (%.3f < %.3f)", tenant, entry.record.updated_at,
                      held.record.updated_at)  # fmt: skip
            return held
        self.absent.pop(tenant, None)
        self.entries[tenant] = entry
        return entry

    def drop(self, tenant: str) -> None:
        """The tenant's record was deleted (``meshctl tenant remove``): it is unknown from now."""
        self.entries.pop(tenant, None)
        self.not_registered(tenant)

    def not_registered(self, tenant: str) -> None:
        self.absent[tenant] = time.monotonic()
        self.absent.move_to_end(tenant)
        while len(self.absent) > UNKNOWN_KEPT:
            self.absent.popitem(last=False)

    def should_read(self, tenant: str) -> bool:
        """Whether ``tenant`` is worth a read of the registry: not held, and not found missing
        within ``UNKNOWN_TTL_S``."""
        if tenant in self.entries:
            return False
        at = self.absent.get(tenant)
        return at is None or time.monotonic() - at > UNKNOWN_TTL_S

    def status(self, tenant: str) -> str:
        rec = self.record(tenant)
        return rec.status if rec is not None else "active"

    def record(self, tenant: str) -> TenantRecord | None:
        """The tenant's record in force here (None: none held)."""
        entry = self.entries.get(tenant)
        return entry.record if entry is not None else None

    def admission(self, tenant: str) -> dict[str, float]:
        """The tenant's own admission limits ({}: none of its own)."""
        rec = self.record(tenant)
        return rec.admission if rec is not None else {}

    def budget(self, tenant: str) -> dict[str, float]:
        """The tenant's own tenant-day ceilings ({}: none of its own)."""
        rec = self.record(tenant)
        return rec.budget if rec is not None else {}

    def quotas(self, tenant: str) -> dict[str, dict[str, float]]:
        """The tenant's own quotas per stream ({}: none of its own)."""
        rec = self.record(tenant)
        return rec.quotas if rec is not None else {}

    def principal(self, name: str) -> Principal | None:
        role, _, tenant = name.partition(".")
        entry = self.entries.get(tenant) if role == CLIENT and tenant else None
        return entry.client if entry is not None else None

    def auditor(self, tenant: str) -> bytes | None:
        entry = self.entries.get(tenant)
        return entry.auditor if entry is not None else None

    def data_key(self, tenant: str) -> str | None:
        entry = self.entries.get(tenant)
        return entry.data_key if entry is not None else None


class Layered(dict[str, Any]):
    """A bundle's own entries, then the directory's (``TrustBundle.attach``). Only lookups fall
    back (``get``, ``[]``, ``in``); iterating sees the bundle's own entries, as a dump must."""

    def __init__(self, own: dict[str, Any], lookup: Callable[[str], Any]) -> None:
        super().__init__(own)
        self._lookup = lookup

    def get(self, key: str, default: Any = None) -> Any:
        value = dict.get(self, key)
        if value is None and isinstance(key, str):
            value = self._lookup(key)
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None
