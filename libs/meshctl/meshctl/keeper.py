"""The keeper: each tenant's data older than its retention, removed from the shared streams and
buckets (issue 42, retention per tenant and per data class).

A stream's ``max_age`` is one retention for every tenant. A tenant whose contract says "tool
arguments and results are kept three days" needs its own, shorter, in the same streams. The
operator sets it (``meshctl tenant retention``, a record in the ``tenants`` bucket); the keeper
enforces it, as its own identity (``keeper``: it may read stream states, read one message at a
time and purge; nothing else). For each tenant with a record and each data class it sets
(``mesh_contracts.lifecycle``), in every place of that class:

1. the cut is ``now - retention``, or earlier: **a task that has not ended keeps all of its
   data**, so the cut never passes the start of the tenant's oldest unended task (its admission
   record lists them; their status records give their starts). A workflow waiting three days on
   a timer is not cut from under itself by a one-day retention;
2. a direct get finds the first message of the tenant's subjects stored at or after the cut;
3. one purge removes the tenant's messages before it (``{"filter": <tenant's subjects>, "seq":
   <that message>}``): other tenants' messages in the same stream are untouched, and a message
   stored while the keeper works is after the cut and kept.

Each task's status record (content-free) is kept as long as the longest of the tenant's classes:
it is what stops a late redelivery of any message about the task. Approval records are keyed by
approval id, not by tenant, so the keeper reads them and removes the tenant's decided ones one key
at a time. The audit chain is not purged (its stream refuses purges): erasure shreds its payloads.

Runs as ``meshctl keeper`` (once, or every ``--every`` seconds): the supervisor of a local mesh
runs it every ``MESH_KEEPER_EVERY_S`` (15 minutes), and a Kubernetes CronJob does the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NATS

from mesh_contracts import lifecycle
from mesh_contracts.v1.audit import TENANT_WIDE
from mesh_contracts.v1.records import AdmissionRecord, StatusRecord
from mesh_contracts.v1.tenants import TenantRecord
from mesh_durable.chain import AuditChain
from mesh_durable.tail import DirectGetError, Reader, Stored
from mesh_identity import Signer
from mesh_kit.settings import log_nats_error, nats_servers
from meshctl.identity import Identities
from meshctl.local import MeshError
from meshctl.policy import KEEPER

log = logging.getLogger("meshctl.keeper")

EVERY_S = 900.0
"""How often the keeper runs by default (``MESH_KEEPER_EVERY_S``, ``meshctl keeper --every``)."""


class KeeperError(MeshError):
    """The keeper could not read or purge (one line, for the operator)."""


async def connect(ids: Identities, url: str, **options: Any) -> NATS:
    """A connection as the keeper: its credentials, its inbox."""
    if not ids.creds(KEEPER).exists():
        raise KeeperError(f"no keeper identity in {ids.home} (run: meshctl init)")
    return await nats.connect(nats_servers(url), name="keeper", error_cb=log_nats_error,
                              **{**ids.connect_options(KEEPER), **options})  # fmt: skip


def signer(ids: Identities) -> Signer:
    """The keeper's signing key (what it removed goes on each tenant's audit chain)."""
    path = ids.signing_key(KEEPER)
    if not path.exists():
        raise KeeperError(f"no signing key for the keeper at {path} (run: meshctl init)")
    return Signer.from_file(KEEPER, path)


@dataclass
class Removed:
    tenant: str
    data_class: str
    stream: str
    filter: str
    purged: int
    cut: float
    """Everything of the tenant here stored before this time is gone."""


@dataclass
class KeeperReport:
    at: float
    tenants: int = 0
    """Tenants with a retention of their own."""
    removed: list[Removed] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Tenant -> why nothing of it was removed this time (it is tried again next time)."""
    seconds: float = 0.0

    @property
    def purged(self) -> int:
        return sum(r.purged for r in self.removed)


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        msg = await nc.request(subject, json.dumps(body).encode() if body else b"", timeout=5.0)
    except Exception as exc:  # noqa: BLE001 - a timeout, no responders, a refused reply: one line
        raise KeeperError(f"{subject}: {type(exc).__name__}: {exc}") from None
    out: dict[str, Any] = json.loads(msg.data or b"{}")
    if "error" in out:
        raise KeeperError(f"{subject}: {out['error'].get('description', out['error'])}")
    return out


class Streams:
    """Stream states and one reader per stream, over one connection."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._readers: dict[str, Reader] = {}
        self._max_age: dict[str, float] = {}

    def reader(self, stream: str) -> Reader:
        if stream not in self._readers:
            self._readers[stream] = Reader(self.nc, stream, batch=1, timeout=5.0)
        return self._readers[stream]

    async def close(self) -> None:
        for r in self._readers.values():
            await r.close()

    async def info(self, stream: str) -> dict[str, Any]:
        return await _api(self.nc, f"$JS.API.STREAM.INFO.{stream}")

    async def max_age_s(self, stream: str) -> float:
        """The stream's own retention (0: none)."""
        if stream not in self._max_age:
            self._max_age[stream] = float((await self.info(stream))["config"].get("max_age", 0)) / 1e9
        return self._max_age[stream]

    async def first(self, stream: str, subjects: str, at: float | None = None) -> Stored | None:
        """The first stored message on ``subjects`` (at or after ``at``, if given)."""
        r = self.reader(stream)
        try:
            b = await (
                r.read(start_time=at, subject=subjects, batch=1) if at else r.read(seq=1, subject=subjects, batch=1)
            )
        except DirectGetError as exc:
            raise KeeperError(str(exc)) from None
        return b.messages[0] if b.messages else None

    async def purge_before(self, stream: str, subjects: str, cut: float) -> int:
        """Purge the messages on ``subjects`` stored before ``cut``; how many were."""
        oldest = await self.first(stream, subjects)
        if oldest is None or oldest.time >= cut:
            return 0  # the steady state: one read, nothing to do
        last = int((await self.info(stream))["state"].get("last_seq", 0))
        kept = await self.first(stream, subjects, cut)
        seq = kept.seq if kept is not None else last + 1
        if seq <= 1:
            return 0
        out = await _api(self.nc, f"$JS.API.STREAM.PURGE.{stream}", {"filter": subjects, "seq": seq})
        return int(out.get("purged", 0))


async def tenant_records(streams: Streams, tenant: str | None = None) -> dict[str, TenantRecord]:
    """The tenants' settings records (one tenant's, or all)."""
    try:
        entries = await streams.reader("KV_tenants").current("tenants", tenant or "*")
    except DirectGetError as exc:
        raise KeeperError(str(exc)) from None
    out = {}
    for key, e in entries.items():
        try:
            out[key] = TenantRecord.model_validate_json(e.data)
        except ValueError as exc:
            log.warning("tenant record %s unreadable, skipped: %s", key, exc)
    return out


async def unended_since(streams: Streams, tenant: str) -> float | None:
    """When the tenant's oldest task that has not ended started (None: every task ended)."""
    try:
        adm = await streams.reader("KV_admission").current("admission", tenant)
        if tenant not in adm:
            return None
        in_flight = AdmissionRecord.model_validate_json(adm[tenant].data).in_flight
        if not in_flight:
            return None
        starts = []
        status = streams.reader("KV_status")
        for task in in_flight:
            # Its data begins with its submission (stored before its status record's start).
            first = await streams.first("TASK", f"task.*.{tenant}.{task}.>")
            e = await status.last(f"$KV.status.{tenant}.{task}")
            # Admitted, nothing of it found (or unreadable): as old as it can be.
            began = StatusRecord.model_validate_json(e.data).created_at if e is not None else 0.0
            starts.append(min(first.time, began or first.time) if first is not None else began)
        # A millisecond before: a time is asked for in microseconds, and may round up past it.
        return min(starts) - 0.001
    except (DirectGetError, ValueError) as exc:
        raise KeeperError(f"which tasks of {tenant} have not ended: {exc}") from None


async def deployment_retention(streams: Streams) -> dict[str, float]:
    """Each data class's retention when a tenant sets none: its first stream's max_age (0: none)."""
    out = {}
    for c in lifecycle.DATA_CLASSES:
        out[c.name] = await streams.max_age_s(c.places()[0].stream)
    return out


async def purge_approvals(streams: Streams, tenant: str, cut: float) -> int:
    """Remove the tenant's approval records last written before ``cut`` (keyed by approval id)."""
    entries = await streams.reader("KV_approvals").current("approvals")
    n = 0
    for key, e in entries.items():
        try:
            owner = json.loads(e.data).get("tenant")
        except ValueError:
            continue
        if owner == tenant and e.time < cut:
            n += await streams.purge_before("KV_approvals", f"$KV.approvals.{key}", cut)
    return n


async def keep_tenant(streams: Streams, rec: TenantRecord, now: float, report: KeeperReport) -> None:
    since = await unended_since(streams, rec.tenant)
    longest = 0.0
    for c in lifecycle.DATA_CLASSES:
        keep = rec.retention_s.get(c.name)
        if not c.purgeable or keep is None:
            longest = float("inf") if c.purgeable else longest
            continue
        longest = max(longest, keep)
        cut = now - keep if since is None else min(now - keep, since)
        for place in c.places():
            n = await streams.purge_before(place.stream, place.of(rec.tenant), cut)
            report.removed.append(Removed(rec.tenant, c.name, place.stream, place.of(rec.tenant), n, cut))
        if c.name == "tools":
            n = await purge_approvals(streams, rec.tenant, cut)
            report.removed.append(Removed(rec.tenant, c.name, "KV_approvals", "(decided approvals)", n, cut))
    if longest != float("inf"):
        cut = now - longest if since is None else min(now - longest, since)
        place = lifecycle.STATUS
        n = await streams.purge_before(place.stream, place.of(rec.tenant), cut)
        report.removed.append(Removed(rec.tenant, "status", place.stream, place.of(rec.tenant), n, cut))


async def _record(nc: NATS, signer: Signer, rec: TenantRecord, removed: list[Removed], at: float) -> None:
    """What this pass removed of the tenant, as a link of its audit chain (``retention.removed``)."""
    by_class: dict[str, int] = {}
    for r in removed:
        by_class[r.data_class] = by_class.get(r.data_class, 0) + r.purged
    cuts = {r.data_class: r.cut for r in removed}
    await AuditChain(lambda: nc, lambda: signer).append(
        rec.tenant, TENANT_WIDE, "retention.removed", f"retention:{rec.tenant}:{at:.3f}", actor=signer.principal,
        detail={"removed": by_class, "before": cuts, "retention_s": rec.retention_s},
    )  # fmt: skip


async def enforce(nc: NATS, *, now: float | None = None, signer: Signer | None = None) -> KeeperReport:
    """One pass over every tenant with a retention of its own; with ``signer`` (the keeper's key),
    what it removed of a tenant is recorded on the tenant's audit chain."""
    t0 = time.monotonic()
    report = KeeperReport(at=time.time() if now is None else now)
    streams = Streams(nc)
    try:
        records = await tenant_records(streams)
        report.tenants = sum(1 for r in records.values() if r.retention_s)
        for rec in records.values():
            if not rec.retention_s:
                continue
            try:
                mark = len(report.removed)
                await keep_tenant(streams, rec, report.at, report)
                mine = report.removed[mark:]
                if signer is not None and any(r.purged for r in mine):
                    try:
                        await _record(nc, signer, rec, mine, report.at)
                    except Exception as exc:  # noqa: BLE001 - removed but not recorded: say so, try next time
                        raise KeeperError(f"removed, but not recorded on the audit chain: {exc}") from None
            except KeeperError as exc:
                report.skipped[rec.tenant] = str(exc)
                log.warning("keeper: tenant %s skipped this time: %s", rec.tenant, exc)
    finally:
        await streams.close()
    report.seconds = time.monotonic() - t0
    return report


async def run(nc: NATS, every_s: float, stop: asyncio.Event | None = None, signer: Signer | None = None) -> None:
    """``enforce`` every ``every_s`` seconds until ``stop`` (a failed pass is logged, not fatal)."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            r = await enforce(nc, signer=signer)
            if r.purged or r.skipped:
                log.info("keeper: %d messages and records removed for %d tenants in %.2f s; skipped %s",
                         r.purged, r.tenants, r.seconds, sorted(r.skipped) or "none")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a broker away, a stream missing: next time
            log.warning("keeper pass failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
