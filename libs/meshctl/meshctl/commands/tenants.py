"""Commands on a tenant's data (issue 42): its retention per data class (``tenant retention``),
what is kept and until when (``tenant show``), and the keeper that enforces it (``keeper``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import lifecycle
from mesh_contracts.v1.tenants import TenantRecord
from mesh_identity import TrustBundle
from meshctl import keeper
from meshctl import options as opt
from meshctl.commands.common import admin, audit_as_admin, bucket, nats_url
from meshctl.identity import Identities
from meshctl.local import MeshError

SET = ("tasks", "tools", "usage")
"""The classes a tenant's retention may shorten (the audit chain's is the deployment's)."""


def retention(value: str) -> float | None:
    """``--tasks 3`` (days, fractions allowed, at least an hour) or ``default`` (the deployment's)."""
    if value == "default":
        return None
    d = opt.days(value)
    if d * 86400 < lifecycle.MIN_RETENTION_S:
        raise argparse.ArgumentTypeError(f"{value!r}: a retention is at least an hour ({1 / 24:.4f} days)")
    return d * 86400


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def span(seconds: float) -> str:
    return "until deleted" if not seconds else f"{seconds / 86400:g} days"


def cmd_retention(args: argparse.Namespace) -> int:
    changes = {c: getattr(args, f"keep_{c}") for c in SET if getattr(args, f"keep_{c}") is not False}
    if not changes:
        args.usage("name at least one class: --tasks, --tools or --usage (days, or 'default')")
    known = Identities(opt.home(args)).tenants()
    if args.tenant not in known:
        raise MeshError(f"unknown tenant {args.tenant!r} (known: {', '.join(known) or 'none'})")

    async def run() -> int:
        nc = await admin(args)
        streams = keeper.Streams(nc)
        try:
            ceiling = await keeper.deployment_retention(streams)
            for c, keep in changes.items():
                if keep is not None and ceiling[c] and keep > ceiling[c]:
                    raise MeshError(f"--{c} {keep / 86400:g}: longer than the deployment keeps {c} data "
                                    f"({ceiling[c] / 86400:g} days, meshctl provision --retention-days)")  # fmt: skip
            kv = await bucket(nc, "tenants")
            was = (await keeper.tenant_records(streams, args.tenant)).get(args.tenant)
            rec = was or TenantRecord(tenant=args.tenant)
            for c, keep in changes.items():
                if keep is None:
                    rec.retention_s.pop(c, None)
                else:
                    rec.retention_s[c] = keep
            rec.updated_at, rec.updated_by = time.time(), "admin"
            rev = await kv.put(args.tenant, rec.to_bytes())
            await audit_as_admin(args, nc, rec.tenant, "control.retention-set", f"tenant-retention:{rec.tenant}:{rev}",
                                 {"retention_s": rec.retention_s, "revision": rev})  # fmt: skip
        finally:
            await streams.close()
            await nc.close()
        print(f"tenant {args.tenant}: " + ", ".join(
            f"{c} {span(rec.retention_s[c]) if c in rec.retention_s else 'as the deployment'}" for c in SET
        ) + " (the keeper removes older data at its next pass)")  # fmt: skip
        return 0

    return asyncio.run(run())


async def describe(nc: NATS, tenant: str, now: float) -> dict[str, Any]:
    """What the mesh keeps of ``tenant``, per data class, and until when."""
    streams = keeper.Streams(nc)
    try:
        rec = (await keeper.tenant_records(streams, tenant)).get(tenant)
        since = await keeper.unended_since(streams, tenant)
        classes = []
        for c in lifecycle.DATA_CLASSES:
            own = rec.retention_s.get(c.name) if rec and c.purgeable else None
            oldest: tuple[float, float] | None = None  # (stored at, removed at)
            for place in c.places():
                first = await streams.first(place.stream, place.of(tenant))
                if first is None:
                    continue
                keep = own if own is not None else await streams.max_age_s(place.stream)
                gone = first.time + keep if keep else float("inf")
                if oldest is None or first.time < oldest[0]:
                    oldest = (first.time, gone)
            classes.append({
                "class": c.name, "description": c.description,
                "retention_s": own if own is not None else await streams.max_age_s(c.places()[0].stream),
                "set_by": "tenant" if own is not None else "deployment",
                "oldest_at": oldest[0] if oldest else None,
                "oldest_removed_at": (None if not oldest or oldest[1] == float("inf") else oldest[1]),
            })  # fmt: skip
        return {
            "tenant": tenant, "at": now, "classes": classes, "unended_since": since,
            "updated_at": rec.updated_at if rec else None, "updated_by": rec.updated_by if rec else None,
            "kept_until_removed": {b: lifecycle.NOT_TASK_DATA[b] for b in ("rag", "notes", "workflows", "releases")},
        }  # fmt: skip
    finally:
        await streams.close()


def render(d: dict[str, Any]) -> str:
    head = f"tenant {d['tenant']}: what the mesh keeps, per data class"
    if d["updated_at"]:
        head += f" (retention set by {d['updated_by']} at {when(d['updated_at'])})"
    lines = [head, f"{'CLASS':<9} {'KEPT':<14} {'SET BY':<10} {'OLDEST KEPT':<21} REMOVED"]
    for c in d["classes"]:
        oldest = when(c["oldest_at"]) if c["oldest_at"] else "nothing stored"
        gone = when(c["oldest_removed_at"]) if c["oldest_removed_at"] else ("-" if not c["oldest_at"] else "never")
        lines.append(f"{c['class']:<9} {span(c['retention_s']):<14} {c['set_by']:<10} {oldest:<21} {gone}"
                     + ("  (the chain refuses purges)" if c["class"] == "audit" else ""))  # fmt: skip
    if d["unended_since"] is not None:
        lines.append(f"tasks not ended yet: everything of the tenant since {when(d['unended_since'])} is kept until "
                     "they end")  # fmt: skip
    lines += [f"{what}: {why}" for what, why in d["kept_until_removed"].items()]
    if "data_key" in d:
        lines.append(f"content sealed at rest with data key {d['data_key']}" if d["data_key"] else
                     "no data key: its content is not written (erased and not re-keyed, or not provisioned)")  # fmt: skip
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    async def run() -> int:
        nc = await admin(args)
        try:
            d = await describe(nc, args.tenant, time.time())
        finally:
            await nc.close()
        wrapped = TrustBundle.from_file(Identities(opt.home(args)).trust_bundle).data_keys.get(args.tenant)
        d["data_key"] = wrapped.split(".", 1)[0] if wrapped else None
        print(json.dumps(d, indent=2) if args.json else render(d))
        return 0

    return asyncio.run(run())


def cmd_export(args: argparse.Namespace) -> int:
    from meshctl import export

    ids = Identities(opt.home(args))
    if args.tenant not in ids.tenants():
        raise MeshError(f"unknown tenant {args.tenant!r} (known: {', '.join(ids.tenants()) or 'none'})")
    out: Path = args.out or Path(f"{args.tenant}-export-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz")

    async def run() -> int:
        nc = await admin(args)
        try:
            manifest = await export.export(nc, args.tenant, out, ids.trust_bundle.read_text())
        finally:
            await nc.close()
        items = sum(n for name, n in manifest["counts"].items() if name.startswith("places/"))
        print(f"wrote {out}: {items} messages and records of {args.tenant} in {len(manifest['sha256'])} files "
              f"(check it offline: meshctl audit verify --archive {out})")  # fmt: skip
        return 0

    return asyncio.run(run())


def cmd_erase(args: argparse.Namespace) -> int:
    from meshctl import erase
    from meshctl.rotation import publish_bundle

    ids = Identities(opt.home(args))
    if args.tenant not in ids.tenants():
        raise MeshError(f"unknown tenant {args.tenant!r} (known: {', '.join(ids.tenants()) or 'none'})")
    if args.confirm != args.tenant:
        args.usage(f"erasing {args.tenant} cannot be undone: confirm with --confirm {args.tenant}")
    url = nats_url(args, ids.home)

    async def run() -> int:
        nc = await admin(args)
        try:
            r = await erase.erase(
                nc, ids, args.tenant, redis=erase.redis_url(ids, args.redis_url), even_running=args.even_running,
                publish=lambda bundle: publish_bundle(ids, bundle, url),
            )  # fmt: skip
        finally:
            await nc.close()
        path = erase.store(ids, r)
        if args.json:
            print(json.dumps({**asdict(r), "purged": r.purged, "complete": r.complete, "sha256": r.digest(),
                              "report": str(path)}, indent=2))  # fmt: skip
        else:
            print(render_erasure(r, path))
        if not r.complete:
            print(f"meshctl: the erasure of {r.tenant} is not complete: Redis {r.redis}; run it again to finish "
                  "(what was done stays done)", file=sys.stderr)  # fmt: skip
            return 1
        return 0

    return asyncio.run(run())


def render_erasure(r: Any, path: Path) -> str:
    held = [p for p in r.places if p["purged"]]
    lines = [
        f"erased {r.tenant}: {r.purged} messages and records removed from {len(held)} places "
        f"(of {len(r.places)} looked in), {r.approvals} approval records, {r.redis_keys} Redis keys ({r.redis})",
        f"auditor key {'destroyed' if r.key_destroyed else 'not in this home'}; trust bundle revision "
        f"{r.bundle_revision or 'unchanged'}: the content fields of {r.tenant}'s audit links are unreadable for good",
        f"data key {'destroyed (a new one took its place)' if r.data_key_destroyed else 'destroyed before'}: what was "
        f"sealed with it anywhere (blocks on disk, backups) stays sealed",
    ]
    lines += [f"  {p['stream']:14} {p['filter']:44} {p['purged']}" for p in held]
    lines += [f"kept: {place}: {why}" for place, why in r.kept.items()]
    lines.append(f"report: {path} (sha256 {r.digest()}), and link {r.chain_link} of {r.tenant}'s audit chain")
    return "\n".join(lines)


def cmd_keeper(args: argparse.Namespace) -> int:
    ids = Identities(opt.home(args))
    signer = keeper.signer(ids)

    async def run() -> int:
        nc = await keeper.connect(ids, nats_url(args, ids.home), connect_timeout=5, max_reconnect_attempts=0)
        try:
            if args.every:
                await keeper.run(nc, args.every, signer=signer)
                return 0
            r = await keeper.enforce(nc, signer=signer)
        finally:
            await nc.close()
        if args.json:
            print(json.dumps(asdict(r), indent=2))
        else:
            print(
                f"{r.purged} messages and records removed for {r.tenants} tenants with a retention of their own "
                f"in {r.seconds:.2f} s" + "".join(f"\nskipped {t}: {why}" for t, why in sorted(r.skipped.items()))
            )
        return 1 if r.skipped else 0

    return asyncio.run(run())


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """A tenant's data: its retention, what is kept, and the keeper."""
    s = sub.add_parser("tenant", help="a tenant's data: its retention per data class, what is kept and until when")
    tsub = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    t = tsub.add_parser("retention", help="how long the mesh keeps the tenant's data of each class (as the admin; on "
                        "its audit chain)")  # fmt: skip
    t.add_argument("tenant", type=opt.tenant)
    for c in SET:
        t.add_argument(f"--{c}", dest=f"keep_{c}", type=retention, default=False, metavar="DAYS",
                       help=f"{lifecycle.CLASSES[c].description}: days (at least 1/24), or 'default'")  # fmt: skip
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_retention, usage=t.error)
    t = tsub.add_parser("show", help="what the mesh keeps of the tenant, per data class, and until when (as the admin)")
    t.add_argument("tenant", type=opt.tenant)
    t.add_argument("--json", action="store_true")
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_show)

    t = tsub.add_parser("export", help="the tenant's data as a portable archive: tasks with their history, documents, "
                        "the audit chain with its anchors, usage (as the admin)")  # fmt: skip
    t.add_argument("tenant", type=opt.tenant)
    t.add_argument(
        "--out", type=Path, default=None, help="the archive to write (default: <tenant>-export-<time>.tar.gz)"
    )
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_export)

    t = tsub.add_parser("erase", help="erase the tenant: delete its data everywhere the mesh keeps it and destroy its "
                        "key, so its audit chain stays whole but unreadable (as the admin; cannot be undone)")  # fmt: skip
    t.add_argument("tenant", type=opt.tenant)
    t.add_argument("--confirm", default="", metavar="TENANT", help="the tenant's name again: erasure cannot be undone")
    t.add_argument("--even-running", action="store_true", help="erase even while some of its tasks are running")
    t.add_argument("--redis-url", default=None,
                   help="Redis as a user that may delete any key (default: MESH_REDIS_URL, else the home's admin user)")  # fmt: skip
    t.add_argument("--json", action="store_true")
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_erase, usage=t.error)

    s = sub.add_parser("keeper", help="remove each tenant's data older than its retention (as the keeper; once, or "
                       "every --every seconds)")  # fmt: skip
    s.add_argument("--every", type=opt.positive, default=None, help="run until stopped, a pass every this many seconds")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_keeper)
