"""Commands on a tenant's data (issue 42): its retention per data class (``tenant retention``),
what is kept and until when (``tenant show``), and the keeper that enforces it (``keeper``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import lifecycle
from mesh_identity import TrustBundle
from meshctl import keeper, local
from meshctl import options as opt
from meshctl.commands.common import admin, nats_url
from meshctl.identity import Identities
from meshctl.local import MeshError, MeshState
from meshctl.registry import LIMIT_NAMES, Registry, RegistryError, dumps, parse_limits, shown

SET = ("tasks", "tools", "usage")
"""The classes a tenant's retention may shorten (the audit chain's is the deployment's)."""


async def _registry(nc: NATS, args: argparse.Namespace) -> Registry:
    return await Registry.open(nc, Identities(opt.home(args)))


def _known_here(ids: Identities, tenant: str) -> None:
    """A tenant of this home: minted with the mesh, or added at runtime (its client's creds)."""
    if tenant not in ids.tenants() and not ids.creds(f"client.{tenant}").exists():
        raise MeshError(f"unknown tenant {tenant!r} (meshctl tenant list)")


def _registry_cmd(args: argparse.Namespace, body: Callable[[Registry], Awaitable[int]]) -> int:
    """Run ``body`` with the admin's registry (a refused change, ``RegistryError``, is a one-line error)."""

    async def run() -> int:
        nc = await admin(args)
        try:
            return await body(await _registry(nc, args))
        finally:
            await nc.close()

    return asyncio.run(run())


def cmd_add(args: argparse.Namespace) -> int:
    names = list(args.tenants)
    if args.from_file is not None:
        try:
            names += [opt.tenant(x) for x in args.from_file.read_text().split()]
        except (OSError, argparse.ArgumentTypeError) as exc:
            args.usage(f"--from-file {args.from_file}: {exc}")
    try:
        limits = {k: v for k, v in parse_limits(args.limit).items() if v is not None}
    except RegistryError as exc:
        args.usage(str(exc))
    if not names:
        args.usage("name at least one tenant (or --from-file)")

    async def body(reg: Registry) -> int:
        took = []
        for t in names:
            added = await reg.add(t, limits)
            took.append(added.seconds)
            if not args.quiet:
                print(f"added tenant {t} (record revision {added.revision}, {added.seconds * 1000:.0f} ms): its "
                      f"client's credentials are {reg.ids.creds('client.' + t)}")  # fmt: skip
        if len(took) > 1:
            took.sort()
            print(f"added {len(took)} tenants: p50 {took[len(took) // 2] * 1000:.1f} ms, "
                  f"p99 {took[min(len(took) - 1, int(len(took) * 0.99))] * 1000:.1f} ms each")  # fmt: skip
        return 0

    return _registry_cmd(args, body)


def cmd_list(args: argparse.Namespace) -> int:
    async def body(reg: Registry) -> int:
        records = await reg.list()
        if args.json:
            print(dumps(records))
            return 0
        print(f"{'TENANT':<24} {'STATUS':<10} {'KEYS':<10} {'OWN LIMITS':<30} UPDATED")
        for t, r in records.items():
            keys = "bundle" if r is None or r.identity is None else "registry"
            adm = shown(r)
            print(f"{t:<24} {(r.status if r else 'active'):<10} {keys:<10} {adm:<30} "
                  f"{when(r.updated_at) if r and r.updated_at else '-'}")  # fmt: skip
        print(f"{len(records)} tenants")
        return 0

    return _registry_cmd(args, body)


def cmd_status(args: argparse.Namespace) -> int:
    status = "suspended" if args.action == "suspend" else "active"

    async def body(reg: Registry) -> int:
        _, changed = await reg.set_status(args.tenant, status)
        what = ("no new work is taken (its data and history are kept; meshctl tenant resume)" if status == "suspended"
                else "it takes new work again")  # fmt: skip
        print(f"tenant {args.tenant}: {status}{'' if changed else ' already'}: {what}")
        return 0

    return _registry_cmd(args, body)


def cmd_limits(args: argparse.Namespace) -> int:
    try:
        limits = parse_limits(args.limit)
    except RegistryError as exc:
        args.usage(str(exc))
    if not limits:
        args.usage(f"name at least one limit: {LIMIT_NAMES} (NAME=default: back to the settings')")

    async def body(reg: Registry) -> int:
        rec = await reg.set_limits(args.tenant, limits)
        print(f"tenant {args.tenant}: own limits {shown(rec)} (over the services' settings; in force at its next "
              "submission, reservation or write)")  # fmt: skip
        return 0

    return _registry_cmd(args, body)


def _confirmed(args: argparse.Namespace, what: str) -> tuple[Identities, str]:
    """The home and the broker's URL for an act on ``args.tenant`` that cannot be undone, once the
    tenant is known here and its name was given again (``--confirm``)."""
    ids = Identities(opt.home(args))
    _known_here(ids, args.tenant)
    if args.confirm != args.tenant:
        args.usage(f"{what} {args.tenant} cannot be undone: confirm with --confirm {args.tenant}")
    return ids, nats_url(args, ids.home)


async def _erase(nc: NATS, args: argparse.Namespace, ids: Identities, url: str) -> Any:
    """The tenant's erasure (``meshctl.erase``) with the command's options; its report."""
    from meshctl import erase
    from meshctl.rotation import publish_bundle

    return await erase.erase(
        nc, ids, args.tenant, redis=erase.redis_url(ids, args.redis_url), even_running=args.even_running,
        publish=lambda bundle: publish_bundle(ids, bundle, url),
    )  # fmt: skip


def cmd_remove(args: argparse.Namespace) -> int:
    from meshctl import erase
    from meshctl.rotation import rewrite_server_configs

    ids, url = _confirmed(args, "removing (erasing)")
    state = MeshState.load(ids.home)

    async def body(reg: Registry) -> int:
        report: list[Any] = []

        async def erased() -> None:
            report.append(await _erase(reg.nc, args, ids, url))

        await reg.forget(args.tenant, erased)
        creds = ids.creds(f"client.{args.tenant}")
        ids.revoke_users({ids.user_of(f"client.{args.tenant}").public_key.decode(): int(time.time())})
        os.replace(creds, creds.with_name(creds.name + ".revoked"))
        rewrite_server_configs(ids)
        reloaded = local.reload_nats(state.nats) if state is not None else 0
        path = erase.store(ids, report[0])
        print(render_erasure(report[0], path))
        print(f"removed tenant {args.tenant}: its record is gone, so no service believes its client any more; its "
              "NATS user is revoked " + ("(the running broker re-read its config)" if reloaded else
                                        "in the server config: roll it out (infra/README.md, removing a tenant)"))  # fmt: skip
        return 0 if report[0].complete else 1

    return _registry_cmd(args, body)


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

    async def run() -> int:
        nc = await admin(args)
        streams = keeper.Streams(nc)
        try:
            reg = await _registry(nc, args)
            ceiling = await keeper.deployment_retention(streams)
            for c, keep in changes.items():
                if keep is not None and ceiling[c] and keep > ceiling[c]:
                    raise MeshError(f"--{c} {keep / 86400:g}: longer than the deployment keeps {c} data "
                                    f"({ceiling[c] / 86400:g} days, meshctl provision --retention-days)")  # fmt: skip
            rec = await reg.set_retention(args.tenant, changes)
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
            "status": rec.status if rec else "active", "admission": dict(rec.admission) if rec else {},
            "budget": dict(rec.budget) if rec else {}, "quotas": dict(rec.quotas) if rec else {},
            "own_limits": shown(rec),
            "keys": "registry" if rec and rec.identity else "bundle",
            "registry_data_key": rec.identity.data_key if rec and rec.identity else None,
            "kept_until_removed": {b: lifecycle.NOT_TASK_DATA[b] for b in ("rag", "notes", "workflows", "releases")},
        }  # fmt: skip
    finally:
        await streams.close()


def render(d: dict[str, Any]) -> str:
    head = f"tenant {d['tenant']}: what the mesh keeps, per data class"
    if d["updated_at"]:
        head += f" (retention set by {d['updated_by']} at {when(d['updated_at'])})"
    if "status" in d:
        adm = d["own_limits"] if d["own_limits"] != "-" else "the settings' (none of its own)"
        where = (
            "tenant registry (added at runtime)" if d["keys"] == "registry" else "trust bundle (minted with the mesh)"
        )
        head += f"\nstatus {d['status']}; keys in the {where}; limits {adm}"
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
        wrapped = d.pop("registry_data_key") or TrustBundle.from_file(
            Identities(opt.home(args)).trust_bundle
        ).data_keys.get(args.tenant)
        d["data_key"] = wrapped.split(".", 1)[0] if wrapped else None
        print(json.dumps(d, indent=2) if args.json else render(d))
        return 0

    return asyncio.run(run())


def cmd_export(args: argparse.Namespace) -> int:
    from meshctl import export

    ids = Identities(opt.home(args))
    _known_here(ids, args.tenant)
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

    ids, url = _confirmed(args, "erasing")

    async def run() -> int:
        nc = await admin(args)
        try:
            r = await _erase(nc, args, ids, url)
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


def _irreversible(t: opt.Parser, what: str) -> None:
    """The arguments of an act on a tenant that cannot be undone (its erasure, its removal)."""
    t.add_argument("tenant", type=opt.tenant)
    t.add_argument("--confirm", default="", metavar="TENANT", help=f"the tenant's name again: {what} cannot be undone")
    t.add_argument("--even-running", action="store_true", help="even while some of its tasks are running")
    t.add_argument("--redis-url", default=None,
                   help="Redis as a user that may delete any key (default: MESH_REDIS_URL, else the home's admin user)")  # fmt: skip
    t.add_argument("--nats-url", default=None)


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """A tenant's data: its retention, what is kept, and the keeper."""
    s = sub.add_parser("tenant", help="tenants of a running mesh (add, suspend, resume, limits, remove) and their "
                       "data: retention per data class, what is kept and until when")  # fmt: skip
    tsub = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    t = tsub.add_parser("add", help="add tenants to the running mesh: credentials minted here, one signed record in "
                        "the registry, no restart (as the admin; on each tenant's audit chain)")  # fmt: skip
    t.add_argument("tenants", nargs="*", type=opt.tenant, metavar="TENANT")
    t.add_argument("--from-file", type=Path, default=None, help="more tenants, one per line (or space-separated)")
    t.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="a limit of each of them, over the settings: max_in_flight, rate_per_s, burst (admission), "
                   "daily_tokens, daily_cost_usd (tenant-day ceilings), quota.<STREAM>.mib|msgs|mib_per_min (repeatable)")  # fmt: skip
    t.add_argument("--quiet", action="store_true", help="one summary line, not one per tenant")
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_add, usage=t.error)
    t = tsub.add_parser("list", help="every tenant: status, where its keys are, its own limits (as the admin)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_list)
    for action, what in (("suspend", "refuse the tenant's new work at every door; its data and running tasks' "
                          "history are kept"), ("resume", "take the tenant's new work again")):  # fmt: skip
        t = tsub.add_parser(action, help=f"{what} (as the admin; on its audit chain)")
        t.add_argument("tenant", type=opt.tenant)
        t.add_argument("--nats-url", default=None)
        t.set_defaults(fn=cmd_status)
    t = tsub.add_parser("limits", help="the tenant's own limits over the settings: admission, tenant-day ceilings, "
                        "quotas; applied live (as the admin; on its audit chain)")  # fmt: skip
    t.add_argument("tenant", type=opt.tenant)
    t.add_argument("limit", nargs="*", metavar="NAME=VALUE",
                   help="max_in_flight=N, rate_per_s=R, burst=N, daily_tokens=N, daily_cost_usd=X, "
                   "quota.RAG.mib=N (msgs, mib_per_min; TASK, CONTROL, RAG, DLQ); NAME=default drops the tenant's own")  # fmt: skip
    t.add_argument("--nats-url", default=None)
    t.set_defaults(fn=cmd_limits, usage=t.error)
    t = tsub.add_parser("remove", help="remove a tenant added at runtime: suspended, erased (tenant erase), its record "
                        "and keys destroyed, its NATS user revoked (as the admin; cannot be undone)")  # fmt: skip
    _irreversible(t, "removal")
    t.set_defaults(fn=cmd_remove, usage=t.error)
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
    _irreversible(t, "erasure")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_erase, usage=t.error)

    s = sub.add_parser("keeper", help="remove each tenant's data older than its retention (as the keeper; once, or "
                       "every --every seconds)")  # fmt: skip
    s.add_argument("--every", type=opt.positive, default=None, help="run until stopped, a pass every this many seconds")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_keeper)
