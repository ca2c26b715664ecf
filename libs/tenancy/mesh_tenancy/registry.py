"""The tenants added at runtime, as one service meets them (issue 47): above the bus, like the
rest of the tenants' policy; the bus itself only asks and looks up (``verifier.tenants``).

A service reads a tenant's record (KV ``tenants``, ``mesh_contracts.v1.tenants``) the first time a
message of the tenant reaches it (``know``), holds it while it runs, and follows every later write
of it on a core subscription to the bucket's subjects (no consumer: a service holds no consumer
rights). It holds nothing for a tenant it has not met, so its start and its memory do not grow
with the number of tenants registered; one read per tenant met is the whole cost.

Each record is believed only if an operator signed it (``mesh_identity.registry``); the bundle in
force falls back to what is held here, so the tenant's client, auditor and data key are known to
every reader of the bundle as soon as the record is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from mesh_contracts.v1.tenants import TenantRecord
from mesh_identity.registry import Directory
from mesh_kit.state import KV, bind
from mesh_kit.trust import Trust

log = logging.getLogger("mesh.tenants")
BUCKET = TenantRecord.bucket
READ_TIMEOUT_S = 2.0


class Registry:
    """Reads and follows the records of the tenants this service meets, into its verifier's
    directory (``verifier.tenants``, whose ``know`` asks for a record before a message is read)."""

    def __init__(self, trust: Trust, nc: Callable[[], Any]) -> None:
        self.trust = trust
        self._nc = nc
        self._kv: KV | None = None
        self._sub: Any = None
        self._reads: dict[str, asyncio.Future[None]] = {}

    @property
    def directory(self) -> Directory:
        return self.trust.verifier.tenants

    async def follow(self) -> None:
        """Bind the bucket and take every write of it as it happens (only those of tenants met
        are kept), and read a tenant's record when it is first met (``Directory.know``). Without
        the bucket (an older provisioning) the bundle alone stands."""
        self.directory.reader = self.know
        try:
            self._kv = bind(self._nc(), BUCKET)
            self._sub = await self._nc().subscribe(f"$KV.{BUCKET}.>", cb=self._on_write)
        except Exception as exc:  # noqa: BLE001 - no permission (an older policy): the bundle stands
            log.warning("cannot follow the tenant registry (%s): only the trust bundle's tenants are known", exc)
            self._kv = None

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_write(self, msg: Msg) -> None:
        tenant = msg.subject[len(f"$KV.{BUCKET}.") :]
        d = self.directory
        if tenant not in d.entries and tenant not in d.absent:
            return  # not met here: nothing held, nothing to change
        if not msg.data or (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            d.drop(tenant)
            log.info("tenant %s left the registry", tenant)
            return
        before = d.entries.get(tenant)
        entry = d.put(tenant, msg.data)
        if entry is not None and entry is not before:
            log.info("tenant %s: record of %.3f in force (%s)", tenant, entry.record.updated_at, entry.record.status)

    async def know(self, tenant: str) -> None:
        """Read ``tenant``'s record once on first meeting (concurrent callers share the read). A
        tenant found without a record is not read again while the subscription runs (a later
        write reaches it there)."""
        if self._kv is None or not self.directory.should_read(tenant):
            return
        pending = self._reads.get(tenant)
        if pending is None:
            pending = self._reads[tenant] = asyncio.ensure_future(self._read(tenant))
            pending.add_done_callback(lambda _f: self._reads.pop(tenant, None))
        await asyncio.shield(pending)

    async def _read(self, tenant: str) -> None:
        assert self._kv is not None
        try:
            entry = await asyncio.wait_for(self._kv.get(tenant), READ_TIMEOUT_S)
        except KeyNotFoundError:
            self.directory.not_registered(tenant)
            return
        except Exception as exc:  # noqa: BLE001 - the broker is away: the caller goes on with what is known
            log.debug("tenant registry read of %s failed (%s)", tenant, exc)
            return
        if entry.value:
            self.directory.put(tenant, entry.value)
        else:
            self.directory.not_registered(tenant)
