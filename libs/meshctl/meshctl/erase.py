"""Erasing a tenant (``meshctl tenant erase``, issue 42 item 3; GDPR art. 17).

What can be deleted is deleted; what cannot is made unreadable. In order:

1. **The key.** The tenant's auditor key is taken out of the trust bundle (published to the
   ``trust`` bucket every service follows) and its private half is overwritten and removed from
   the operator's home. Every content field of the tenant's audit links was sealed to it
   (``mesh_contracts.v1.audit.SEALED_DETAIL``), so those fields are unreadable from now on; a link
   written later withholds them. The chain itself stays whole: its hashes are over the sealed
   bytes, so ``meshctl audit verify`` still proves it (crypto-shredding).
2. **The broker.** Every place of ``mesh_contracts.lifecycle.erasure_places`` is purged of the
   tenant's subjects (streams, their envelopes and dead letters, every bucket keyed by the tenant,
   the kill switch, timers, the side-effect sink); approval records (keyed by id) are found by
   their tenant field. Other tenants' messages in the same streams are untouched.
3. **Redis** (rebuildable state: spend counters, the retrieval cache, rate limits): every key
   with the tenant as one of its ``:``-separated parts, as the admin's Redis user.
4. **The report.** What was removed where, as a ``tenant.erased`` link of the tenant's chain (counts
   only) and a JSON file under the home's ``erasures/`` (0600), printed too.

It refuses a tenant with tasks still running unless told (``--even-running``): their services
would write again after the purge; ``meshctl tenant suspend`` stops its intake first (issue 47).
A tenant added at runtime has its keys in its registry record, not in the bundle: the record is
purged with the rest (every revision held its wrapped data key) and written again with a new
data key and no auditor key, so the tenant goes on, as one minted with the mesh does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import lifecycle
from mesh_contracts import topology as topo
from mesh_contracts.v1.audit import TENANT_WIDE
from mesh_contracts.v1.records import AdmissionRecord
from mesh_contracts.v1.tenants import TenantRecord
from mesh_durable.chain import AuditChain
from mesh_durable.tail import DirectGetError
from mesh_identity import Signer, TrustBundle
from mesh_identity.datakeys import new_data_key, read_key_file, unwrap, wrap
from mesh_identity.registry import signed_record
from meshctl.identity import Identities, _write_secret
from meshctl.keeper import KeeperError, Streams, purge_approvals
from meshctl.local import MeshError

REDIS_SCAN = 1000


class ErasureError(MeshError):
    """The erasure could not start, or a step of it failed (one line; what was done is reported)."""


@dataclass
class ErasureReport:
    tenant: str
    at: float
    by: str = "admin"
    key_destroyed: bool = False
    data_key_destroyed: bool = False
    """The tenant's data key left the trust bundle (a new one took its place) and every earlier
    revision of the bundle was purged: its content sealed anywhere (a stream's blocks on disk, a
    backup of its streams, a record) is unreadable for good."""
    bundle_revision: int = 0
    places: list[dict[str, Any]] = field(default_factory=list)
    """Each place purged: stream, filter, how many messages and records it held of the tenant."""
    approvals: int = 0
    redis_keys: int = 0
    redis: str = ""
    """Where Redis was reached (host:port), or why not."""
    kept: dict[str, str] = field(default_factory=lambda: dict(lifecycle.KEPT_ON_ERASURE))
    chain_link: int = 0
    """The ``tenant.erased`` link's position in the tenant's chain."""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every step reached its place (run the erasure again to finish one that is not: each
        step is idempotent)."""
        return not self.redis.startswith("not reached")

    @property
    def purged(self) -> int:
        return sum(int(p["purged"]) for p in self.places) + self.approvals

    def digest(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k not in ("chain_link", "seconds")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


async def running(streams: Streams, tenant: str) -> list[str]:
    """The tenant's tasks admitted and not ended (its admission record)."""
    try:
        adm = await streams.reader("KV_admission").current("admission", tenant)
    except DirectGetError as exc:
        raise ErasureError(f"which tasks of {tenant} are running: {exc}") from None
    if tenant not in adm or not adm[tenant].data:
        return []
    return sorted(AdmissionRecord.model_validate_json(adm[tenant].data).in_flight)


def shred(ids: Identities, tenant: str) -> tuple[TrustBundle | None, bool]:
    """The trust bundle without the tenant's auditor key and with a new data key for it in place of
    the one it had (None: it held neither), and whether a private key of the tenant's was destroyed
    (each file overwritten, synced, removed: the auditor's key and the tenant's own copy of its
    data key). What was sealed with the old data key stays sealed for good; the tenant goes on
    with the new one (an erasure is of its data, not of its access)."""
    bundle = TrustBundle.from_file(ids.trust_bundle)
    out = None
    if tenant in bundle.auditors:  # not erased yet (run again, it finds nothing more to destroy)
        data_keys = {t: w for t, w in bundle.data_keys.items() if t != tenant}
        fresh = new_data_key() if tenant in bundle.data_keys and ids.data_key.exists() else None
        if fresh is not None:
            data_keys[tenant] = wrap(read_key_file(ids.data_key), tenant, fresh)
        out = bundle.changed(auditors={t: k for t, k in bundle.auditors.items() if t != tenant}, data_keys=data_keys)
    destroyed = False
    for path in (ids.auditor_key(tenant), *((ids.tenant_data_key(tenant),) if out is not None else ())):
        if not path.exists():
            continue
        size = max(path.stat().st_size, 64)
        with path.open("r+b") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        destroyed = True
    if out is not None and tenant in out.data_keys:
        _write_secret(
            ids.tenant_data_key(tenant), unwrap(read_key_file(ids.data_key), tenant, out.data_keys[tenant]).hex()
        )
    return out, destroyed


async def purge(nc: NATS, stream: str, subjects: str, keep: int = 0) -> int | None:
    """Purge ``subjects`` of ``stream`` (but the newest ``keep``); how many were (None: no such stream here)."""
    request = {"filter": subjects, **({"keep": keep} if keep else {})}
    msg = await nc.request(f"$JS.API.STREAM.PURGE.{stream}", json.dumps(request).encode(), timeout=10)
    out = json.loads(msg.data or b"{}")
    if "error" in out:
        if out["error"].get("err_code") == 10059:  # stream not found
            return None
        raise ErasureError(f"purging {subjects} of {stream}: {out['error'].get('description', out['error'])}")
    return int(out.get("purged", 0))


async def purge_broker(nc: NATS, streams: Streams, tenant: str, report: ErasureReport) -> None:
    for place in lifecycle.erasure_places():
        n = await purge(nc, place.stream, place.of(tenant))
        if n is not None:
            report.places.append({"stream": place.stream, "filter": place.of(tenant), "purged": n})
    try:  # keyed by approval id, not by tenant: found by their tenant field, as the keeper does
        report.approvals = await purge_approvals(streams, tenant, float("inf"))
    except DirectGetError as exc:
        raise ErasureError(f"reading the approvals: {exc}") from None


async def purge_redis(url: str, tenant: str, report: ErasureReport) -> None:
    """Delete every Redis key with ``tenant`` as one of its ``:``-separated parts."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        report.redis = (
            f"{r.connection_pool.connection_kwargs.get('host')}:{r.connection_pool.connection_kwargs.get('port')}"
        )
        mine = []
        async for key in r.scan_iter(match=f"*{tenant}*", count=REDIS_SCAN):
            if tenant in key.decode(errors="replace").split(":"):
                mine.append(key)
        for i in range(0, len(mine), 500):
            report.redis_keys += int(await r.delete(*mine[i : i + 500]))
    except Exception as exc:  # noqa: BLE001 - unreachable, refused: said in the report and by the exit code
        raise ErasureError(f"Redis: {type(exc).__name__}: {exc}") from None
    finally:
        await r.aclose()


def redis_url(ids: Identities, given: str | None) -> str:
    if given:
        return given
    if os.environ.get("MESH_REDIS_URL"):
        return os.environ["MESH_REDIS_URL"]
    path = ids.secrets / "redis" / "admin.url"
    return path.read_text().strip() if path.exists() else ""


async def erase(
    nc: NATS, ids: Identities, tenant: str, *, publish: Callable[[TrustBundle], Awaitable[None]], redis: str = "",
    even_running: bool = False,
) -> ErasureReport:  # fmt: skip
    """Erase ``tenant`` (see the module's text); ``publish(bundle)`` publishes the trust bundle."""
    t0 = time.monotonic()
    report = ErasureReport(tenant=tenant, at=time.time())
    streams = Streams(nc)
    try:
        live = await running(streams, tenant)
        if live and not even_running:
            raise ErasureError(
                f"{tenant} has {len(live)} tasks running ({', '.join(live[:5])}{'…' if len(live) > 5 else ''}): "
                "stop its clients and cancel them first, or erase them too with --even-running"
            )
        held = TrustBundle.from_file(ids.trust_bundle).data_keys.get(tenant)
        registered = await _registered(nc, tenant)  # a tenant added at runtime: its keys are in its record
        bundle, report.key_destroyed = shred(ids, tenant)
        if bundle is not None:
            await publish(bundle)
            report.bundle_revision = bundle.revision
        # the bundle's earlier revisions hold the wrapped key: keep the newest only
        await purge(nc, f"KV_{topo.TRUST_BUCKET}", f"$KV.{topo.TRUST_BUCKET}.{topo.TRUST_KEY}", keep=1)
        report.data_key_destroyed = bundle is not None and held is not None and bundle.data_keys.get(tenant) != held
        await purge_broker(nc, streams, tenant, report)  # its record too, with every revision
        if registered is not None:
            await _rekeyed(nc, ids, registered)
            report.data_key_destroyed = True
    except KeeperError as exc:
        raise ErasureError(str(exc)) from None
    finally:
        await streams.close()
    if redis:
        try:
            await purge_redis(redis, tenant, report)
        except ErasureError as exc:  # the rest is done: report it, and that this part is not
            report.redis = f"not reached: {exc}"
    else:
        report.redis = "not reached: no Redis URL (--redis-url, MESH_REDIS_URL or the home's secrets/redis/admin.url)"
    signer = Signer.from_file("admin", ids.signing_key("admin"))
    report.seconds = time.monotonic() - t0
    report.chain_link = await AuditChain(lambda: nc, lambda: signer).append(
        tenant, TENANT_WIDE, "tenant.erased", f"erased:{tenant}:{report.at:.3f}", actor="admin",
        detail={"purged": report.purged, "places": sum(1 for p in report.places if p["purged"]), "complete": report.complete,
                "redis_keys": report.redis_keys, "key_destroyed": report.key_destroyed,
                "data_key_destroyed": report.data_key_destroyed, "report_sha256": report.digest()},
    )  # fmt: skip
    return report


async def _registered(nc: NATS, tenant: str) -> TenantRecord | None:
    """The tenant's registry record if it was added at runtime (it holds its keys), else None."""
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError

    try:
        entry = await (await nc.jetstream().key_value(TenantRecord.bucket)).get(tenant)
    except (KeyNotFoundError, BucketNotFoundError):
        return None
    rec = TenantRecord.model_validate_json(entry.value) if entry.value else None
    return rec if rec is not None and rec.identity is not None else None


async def _rekeyed(nc: NATS, ids: Identities, rec: TenantRecord) -> None:
    """A tenant added at runtime goes on after its erasure as one minted with the mesh does: its
    record (purged with every revision, each holding the old wrapped data key) written again with
    a new data key and no auditor key (the shredded one), its client's key unchanged."""
    assert rec.identity is not None
    fresh = new_data_key()
    rec.identity = rec.identity.model_copy(update={"data_key": wrap(read_key_file(ids.data_key), rec.tenant, fresh),
                                                   "auditor_key": ""})  # fmt: skip
    kv = await nc.jetstream().key_value(TenantRecord.bucket)
    await kv.put(rec.tenant, signed_record(rec, Signer.from_file("admin", ids.signing_key("admin"))))
    _write_secret(ids.tenant_data_key(rec.tenant), fresh.hex())


def store(ids: Identities, report: ErasureReport) -> Path:
    """The report as a file of the home (0600): ``erasures/<tenant>-<time>.json``."""
    path = ids.home / "erasures" / f"{report.tenant}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(report.at))}.json"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_secret(
        path,
        json.dumps(
            {**asdict(report), "purged": report.purged, "complete": report.complete, "sha256": report.digest()},
            indent=2,
        ),
    )
    return path
