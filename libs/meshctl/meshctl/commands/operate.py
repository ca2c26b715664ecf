"""Commands as an operator that act on the mesh: new credentials (``rotate``), a principal taken
out (``revoke``), dead letters inspected and re-driven (``dlq``), settled spend (``budget``) and the
kill switches (``kill-switch``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import SERVICES
from mesh_durable.guard import CONTROL_BUCKET, GLOBAL_KEY, tenant_key
from mesh_identity import Signer
from mesh_kit.settings import nats_servers
from meshctl import budget as spend
from meshctl import local
from meshctl import options as opt
from meshctl.commands.common import absent, admin, age, audit_as_admin, bucket, nats_url, running
from meshctl.identity import Identities
from meshctl.local import MeshError


def render_switches(switches: dict[str, dict[str, Any]], now: float) -> str:
    """``control`` bucket entries (``kill.global``, ``kill.tenant.<t>``) that are on, one line each."""
    if not switches:
        return "no kill switch is on"
    rows = []
    for key in sorted(switches, key=lambda k: (k != GLOBAL_KEY, k)):
        v = switches[key]
        scope = "global" if key == GLOBAL_KEY else f"tenant {key.removeprefix(tenant_key(''))}"
        try:
            ago = age(now - float(v.get("at", now)))
        except (TypeError, ValueError):
            ago = "?"
        rows.append((scope, ago, str(v.get("by", "?")), str(v.get("reason", ""))))
    w = max(len("SWITCH"), *(len(r[0]) for r in rows))
    lines = [f"{'SWITCH':<{w}}  {'AGE':>5}  {'BY':<8} REASON"]
    lines += [f"{scope:<{w}}  {ago:>5}  {by:<8} {reason}" for scope, ago, by, reason in rows]
    return "\n".join(lines)


def cmd_rotate(args: argparse.Namespace) -> int:
    from meshctl.rotation import RotationError, rotate

    if bool(args.principal) == args.all:
        args.usage("name one principal, or --all for the six services")
    ids = Identities(opt.home(args))
    state = running(ids.home)
    principals = list(SERVICES) if args.all else [args.principal]

    async def run() -> int:
        try:
            report = await rotate(ids, principals, nats_servers(nats_url(args, ids.home)), grace_s=args.grace,
                                  reload=lambda: local.reload_nats(state.nats))  # fmt: skip
        except RotationError as exc:
            raise MeshError(str(exc)) from None
        print(json.dumps(asdict(report), indent=2) if args.json else f"done in {report.seconds:.1f}s")
        return 0

    return asyncio.run(run())


def cmd_revoke(args: argparse.Namespace) -> int:
    from meshctl.rotation import RotationError, revoke

    ids = Identities(opt.home(args))
    state = running(ids.home)

    async def run() -> int:
        try:
            bundle = await revoke(ids, args.principal, nats_servers(nats_url(args, ids.home)),
                                  reload=lambda: local.reload_nats(state.nats))  # fmt: skip
        except RotationError as exc:
            raise MeshError(str(exc)) from None
        print(f"revoked {args.principal}: its NATS user is refused and nothing it signs is believed "
              f"(trust bundle revision {bundle.revision})")  # fmt: skip
        return 0

    return asyncio.run(run())


def cmd_dlq(args: argparse.Namespace) -> int:
    from meshctl.dlq import DeadLetterError, entries, entry, redrive

    async def run() -> None:
        nc = await admin(args)
        js = nc.jetstream()
        try:
            if args.action == "retry":
                key = Identities(opt.home(args)).signing_key("admin")
                if not key.exists():
                    raise MeshError(f"no admin signing key at {key}: re-drives are signed by it (run: meshctl init)")
                operator = Signer.from_file("admin", key)
                for seq in args.seq:
                    print(await redrive(nc, seq, operator))
            elif args.action == "show":
                m = await entry(js, args.seq)
                body = (m.data or b"").decode(errors="replace")
                print(
                    json.dumps(
                        {"seq": args.seq, "subject": m.subject, "headers": m.headers or {}, "body": body}, indent=2
                    )
                )
            else:
                async for seq, m in entries(js, newest=args.limit):
                    h = m.headers or {}
                    reason = h.get("Mesh-Dlq-Reason") or "server advisory: consumer exhausted max_deliver"
                    print(
                        f"{seq:>6} {h.get('Mesh-Dlq-Service', '-'):14} {h.get('Mesh-Dlq-Subject', m.subject)}\n"
                        f"       {reason}"
                    )
                print(f"({(await js.stream_info('DLQ')).state.messages} dead letter(s) in total)")
        except DeadLetterError as exc:
            raise MeshError(str(exc)) from None
        finally:
            await nc.close()

    asyncio.run(run())
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    if args.task and not args.tenant:
        args.usage("--task needs --tenant (task ids are per tenant)")
    day = args.day or spend.today()

    async def run() -> int:
        nc = await admin(args)
        try:
            kv = await bucket(nc, spend.BUCKET)
            if args.task:
                task = await spend.get(kv, spend.usage_key(args.tenant, args.task))
                if task is None:
                    return absent(f"no usage recorded for task {args.tenant}/{args.task}")
                print(json.dumps(task, indent=2) if args.json else spend.render_task(task))
            elif args.tenant:
                record = await spend.get(kv, spend.day_key(args.tenant, day))
                tasks = sorted(
                    (await spend.scan(nc, spend.BUCKET, spend.usage_key(args.tenant, ">"))).values(),
                    key=lambda t: (-spend.cost_of(t), str(t.get("task_id", ""))),
                )
                if record is None and not tasks:
                    return absent(f"no usage recorded for tenant {args.tenant} (on {day} or any retained task)")
                if args.json:
                    print(json.dumps({"day": record, "tasks": tasks[: spend.TOP_TASKS]}, indent=2))
                else:
                    print(spend.render_day(record or {"tenant": args.tenant, "day": day}, tasks))
            else:
                days = list((await spend.scan(nc, spend.BUCKET, spend.day_key("*", day))).values())
                if not days:
                    return absent(f"no usage recorded on {day}")
                print(json.dumps(days, indent=2) if args.json else spend.render_days(day, days))
            return 0
        except spend.BadRecord as exc:
            raise MeshError(str(exc)) from None
        finally:
            await nc.close()

    return asyncio.run(run())


async def _audit_switch(args: argparse.Namespace, nc: NATS, action: str, revision: int | None, reason: str) -> None:
    """The operator's switch as a link of the audit chain: the tenant's, or the mesh-wide one."""
    from mesh_contracts.v1.audit import MESH_WIDE

    await audit_as_admin(
        args, nc, args.tenant or MESH_WIDE, f"control.kill-switch-{action}",
        f"kill-switch:{args.tenant or 'global'}:{action}:{revision or time.time_ns()}",
        {"scope": args.tenant or "global", "reason": reason, "revision": revision},
    )  # fmt: skip


def cmd_kill_switch(args: argparse.Namespace) -> int:
    if args.action == "on" and not (args.reason or "").strip():
        args.usage("'on' needs --reason TEXT (services quote it when they refuse a call)")
    if args.action == "status" and args.reason is not None:
        args.usage("--reason is for 'on' (required) and 'off' (optional), not 'status'")
    if args.action == "on" and args.tenant:
        known = Identities(opt.home(args)).tenants()
        if args.tenant not in known:
            raise MeshError(f"unknown tenant {args.tenant!r} (known: {', '.join(known) or 'none'})")
    key = tenant_key(args.tenant) if args.tenant else GLOBAL_KEY
    scope = f"tenant {args.tenant}" if args.tenant else "global"

    async def run() -> None:
        nc = await admin(args)
        try:
            kv = await bucket(nc, CONTROL_BUCKET)
            if args.action == "on":
                value = {"reason": args.reason.strip(), "by": "admin", "at": time.time()}
                rev = await kv.put(key, json.dumps(value).encode())
                await _audit_switch(args, nc, "on", rev, value["reason"])
                which = f"every task of tenant {args.tenant}" if args.tenant else "every task"
                print(f"kill switch ({scope}) on: services refuse the next model or tool call of {which}")
            elif args.action == "off":
                was = await spend.get(kv, key)
                await kv.delete(key)
                await _audit_switch(args, nc, "off", None, (args.reason or "").strip())
                print(f"kill switch ({scope}) off" + ("" if was else " (it was not on)"))
            else:
                switches = await spend.scan(nc, CONTROL_BUCKET, "kill.>")
                if args.tenant:
                    switches = {k: v for k, v in switches.items() if k in (GLOBAL_KEY, key)}
                print(render_switches(switches, time.time()))
        except spend.BadRecord as exc:
            raise MeshError(str(exc)) from None
        finally:
            await nc.close()

    asyncio.run(run())
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands as an operator that act: credentials, dead letters, spend, kill switches."""
    s = sub.add_parser("rotate", help="new NATS credentials and signing keys for a principal, without downtime")
    s.add_argument("principal", nargs="?", default="", help="e.g. worker, client.acme, approver")
    s.add_argument("--all", action="store_true", help="every service")
    s.add_argument("--grace", type=opt.positive, default=30.0,
                   help="seconds old and new credentials both work before the old are revoked (default 30)")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_rotate, usage=s.error)

    s = sub.add_parser("revoke", help="take a principal out of the mesh now (its NATS user and its signing keys)")
    s.add_argument("principal", help="e.g. client.acme")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_revoke)

    s = sub.add_parser("dlq", help="inspect the dead-letter stream")
    dsub = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    d = dsub.add_parser("list", help="most recent dead letters with their reasons")
    d.add_argument("--limit", type=int, default=20)
    d.add_argument("--nats-url", default=None)
    d = dsub.add_parser("show", help="one dead letter in full")
    d.add_argument("seq", type=int)
    d.add_argument("--nats-url", default=None)
    d = dsub.add_parser("retry", help="re-drive dead letters to their original subject (after a fix)")
    d.add_argument("seq", type=int, nargs="+")
    d.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_dlq)

    s = sub.add_parser("budget", help="settled spend: a task's, a tenant's day, or every tenant's day")
    s.add_argument("--tenant", type=opt.tenant, default=None, help="one tenant: its day by agent and model, its tasks")
    s.add_argument("--task", type=opt.tenant, default=None, help="one task (with --tenant): by agent, step and model")
    s.add_argument("--day", type=opt.day, default=None, help="UTC day YYYYMMDD (default: today)")
    s.add_argument("--json", action="store_true", help="print the stored records as JSON")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_budget, usage=s.error)

    s = sub.add_parser("kill-switch", help="stop every model and tool call, globally or for one tenant")
    s.add_argument("action", choices=("on", "off", "status"))
    s.add_argument("--tenant", type=opt.tenant, default=None, help="only this tenant (default: global)")
    s.add_argument("--reason", default=None,
                   help="why: required for on (services quote it), optional for off (kept in the audit chain)")  # fmt: skip
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_kill_switch, usage=s.error)
