"""The mesh itself: identities (``init``), every principal's permissions (``policy``), streams,
consumers and buckets (``provision``), a local mesh (``up``, ``down``) and its health (``status``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from mesh_contracts.v1 import BudgetStatusReport
from mesh_contracts.v1.records import AdmissionRecord, QuotaRecord
from meshctl import budget as spend
from meshctl import local
from meshctl import options as opt
from meshctl.ask import AskError
from meshctl.commands.common import admin, bucket, budget_asker, running
from meshctl.identity import Identities
from meshctl.local import MeshError, MeshState, Proc
from meshctl.policy import policy
from meshctl.provision import (
    AUDIT_MAX_BYTES,
    MIB,
    RETENTION_S,
    STREAM_MAX_BYTES,
    Caps,
    ConsumerLag,
    consumer_lag,
    provision,
    store_levels,
)
from meshctl.quotas import Held, summarise

if TYPE_CHECKING:
    from meshctl.top import Asker


def cmd_init(args: argparse.Namespace) -> int:
    ids = Identities(opt.home(args))
    ids.mint(args.tenants)
    print(f"identities for {len(policy(ids.tenants(), ids.pools()))} principals in {ids.home} (secrets mode 0600)")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    ids = Identities(opt.home(args))
    tenants = args.tenants or ids.tenants() or ["demo"]
    out = {
        name: {
            "role": p.role,
            "tenant": p.tenant,
            "publish": p.pub,
            "subscribe": p.sub,
            "allow_responses": p.allow_responses,
        }
        for name, p in policy(tenants, ids.pools()).items()
    }
    print(json.dumps(out, indent=2))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    messages_days = args.retention_days or RETENTION_S / 86400
    if args.record_retention_days and args.record_retention_days < messages_days:
        args.usage(f"--record-retention-days {args.record_retention_days:g} is shorter than the {messages_days:g} days "
                   "task messages are kept: a task's status must outlive every message about it")  # fmt: skip

    async def run() -> None:
        nc = await admin(args)
        try:
            days = {
                "retention_s": args.retention_days and args.retention_days * 86400.0,
                "audit_retention_s": args.audit_retention_days and args.audit_retention_days * 86400.0,
                "record_retention_s": args.record_retention_days and args.record_retention_days * 86400.0,
            }
            caps = Caps(args.stream_max_mib * MIB, args.audit_max_mib * MIB, args.stream_max_msgs)
            report = await provision(nc, replicas=args.replicas, caps=caps, pools=args.pool or (),
                                     **{k: v for k, v in days.items() if v})  # fmt: skip
        finally:
            await nc.close()
        print(
            f"provisioned {len(report.streams)} streams, {len(report.consumers)} durable consumers, "
            f"{len(report.buckets)} KV buckets"
        )
        for note in report.notes:
            print(f"note: {note}")

    asyncio.run(run())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    home = opt.home(args)
    up_args: dict[str, Any] = {"tenants": args.tenants, "nats_port": args.nats_port, "http_port": args.http_port,
               "redis_port": args.redis_port, "cluster": args.cluster, "replicas": args.replicas}  # fmt: skip
    if args.no_supervise:
        if args.standby:
            args.usage("--standby needs the supervisor (it starts the standbys): drop --no-supervise")
        state = asyncio.run(local.up(home, **up_args))
    else:
        from meshctl import supervisor

        state = supervisor.start(home, **up_args, standby=args.standby)
    print(
        f"mesh up in {time.monotonic() - t0:.1f}s: nats {state.nats_url}, redis 127.0.0.1:{state.redis_port}, "
        f"{len(state.services)} service processes ({', '.join(state.services)})"
    )
    minted = Identities(home).tenants()
    more = f" and {len(minted) - 10} more" if len(minted) > 10 else ""
    print(f"tenants: {', '.join(minted[:10])}{more} (more at runtime: meshctl tenant add); home: {home}")
    if state.supervisor is not None:
        print(f"supervisor: pid {state.supervisor.pid} restarts what exits (log: {state.supervisor.log})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = local.down(opt.home(args))
    print(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else " (nothing was running)"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    home = opt.home(args)
    state = running(home)

    asker = budget_asker(args)
    seen = asyncio.run(_look(args, state, asker))
    ready = 0 if all(h.get("ready") for h in seen.health.values()) else 1
    if args.json:
        held = [vars(q) for q in seen.quotas]
        print(json.dumps({"services": seen.health, "processes": _processes(state), "consumers": seen.lag,
                          "tenants": seen.admission, "streams": seen.streams, "quotas": held}, indent=2))  # fmt: skip
        return ready
    _print_services(state, seen.health, seen.lag)
    if seen.admission:
        _print_tenants(seen.admission, seen.health, seen.report)
    if seen.quotas:
        _print_quotas(seen.quotas)
    if seen.streams:
        _print_streams(seen.streams)
    return ready


@dataclass
class _Seen:
    """What ``status`` gathered: each service's ``/status``, the consumers' lag, the tenants'
    admission records, the streams' levels, the budget's answer and what each tenant holds."""

    health: dict[str, dict[str, Any]]
    lag: dict[str, ConsumerLag]
    admission: dict[str, dict[str, Any]]
    streams: dict[str, dict[str, float]]
    report: BudgetStatusReport | None
    quotas: list[Held]


async def _look(args: argparse.Namespace, state: MeshState, asker: Asker | None) -> _Seen:
    health = await _health(state)
    nc = await admin(args)
    try:
        lag = await consumer_lag(nc)
        streams = await store_levels(nc)
        try:
            await bucket(nc, AdmissionRecord.bucket)
            admission = await spend.scan(nc, AdmissionRecord.bucket, ">")
        except MeshError as exc:  # a mesh provisioned before admission existed
            admission = {"?": {"error": str(exc)}}
        try:
            await bucket(nc, QuotaRecord.bucket)
            quota_records = await spend.scan(nc, QuotaRecord.bucket, ">")
        except MeshError:  # a mesh provisioned before quotas existed
            quota_records = {}
        try:
            report = await asker(nc) if asker is not None else None
        except AskError as exc:  # an answer not believed: said once, the rest still shown
            print(f"note: {exc}", file=sys.stderr)
            report = None
    finally:
        await nc.close()
    return _Seen(health, lag, admission, streams, report, summarise(quota_records))


def _processes(state: MeshState) -> dict[str, dict[str, Any]]:
    """Every process of the mesh as the supervisor keeps it: pid, alive, state, restarts, last exit."""
    return {p.name: {"pid": p.pid, "alive": p.alive(), "state": p.state, "restarts": p.restarts,
                     "last_exit": p.last_exit} for p in state.procs(supervisor=True)}  # fmt: skip


def _down_reason(proc: Proc) -> str:
    if proc.state == "crash-looping":
        return f"crash-looping, not restarted any more (last: {proc.last_exit}); see {proc.log}"
    if proc.state == "restarting":
        return f"restarting (last: {proc.last_exit})"
    return "process not running"


async def _health(state: MeshState) -> dict[str, dict[str, Any]]:
    """Each service's ``/status``, or why there is none."""
    health: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(timeout=2.0) as client:
        for name, proc in state.services.items():
            if not proc.alive():
                health[name] = {"ready": False, "reason": _down_reason(proc)}
                continue
            try:
                health[name] = (await client.get(f"http://127.0.0.1:{proc.http_port}/status")).json()
            except httpx.HTTPError as exc:
                health[name] = {"ready": False, "reason": f"health endpoint: {exc}"}
    return health


def _print_services(state: MeshState, health: dict[str, dict[str, Any]], lag: dict[str, ConsumerLag]) -> None:
    # RESTARTS: how often the supervisor started it again (`meshctl up`; none with --no-supervise).
    print(f"{'SERVICE':14} {'PID':>7} {'READY':6} {'RESTARTS':>8} {'LAG':>5}  DETAIL")
    for name, proc in state.services.items():
        h = health[name]
        mine = [v for v in lag.values() if v["service"] == name]
        svc_lag = "?" if any(v["pending"] < 0 for v in mine) else sum(v["pending"] + v["ack_pending"] for v in mine)
        detail = h.get("reason", "")
        counters = h.get("counters", {})
        if counters:
            detail += "  " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(counters.items()))
        print(
            f"{name:14} {proc.pid:>7} {'yes' if h.get('ready') else 'NO':6} {proc.restarts:>8} {svc_lag:>5}  {detail}"
        )
    for p in (*state.nats, state.redis):
        if p:
            detail = f"port {p.port}" + ("" if p.alive() else f"; {_down_reason(p)}")
            print(f"{p.name:14} {p.pid:>7} {'yes' if p.alive() else 'NO':6} {p.restarts:>8} {'':>5}  {detail}")
    if state.supervisor is not None:
        boss = state.supervisor
        detail = f"log {boss.log}" if boss.alive() else "not running: nothing is restarted (meshctl down, then up)"
        print(f"{boss.name:14} {boss.pid:>7} {'yes' if boss.alive() else 'NO':6} {'':>8} {'':>5}  {detail}")
    if any(v["pending"] < 0 for v in lag.values()):
        print("LAG ?: a consumer's leader did not answer in 2 s (a cluster electing leaders after a node died?)")


def _print_tenants(
    admission: dict[str, dict[str, Any]], health: dict[str, dict[str, Any]], report: BudgetStatusReport | None
) -> None:
    # Running / queued as the budget sees them: its answer to budget.status, or else the
    # replicas' /status (each follows every task: the max). IDLE from the admission record: started
    # tasks that wait only for the world (a timer, signal, approval, retry or review), holding no run slot.
    queue: dict[str, dict[str, float]] = {}
    reported = report is not None or any("tenants" in h for h in health.values())
    if report is not None:
        queue = {t: v.model_dump() for t, v in report.tenants.items()}
    for h in health.values() if report is None else ():
        for tenant, q in (h.get("tenants") or {}).items():
            seen = queue.setdefault(tenant, {"running": 0, "queued": 0, "queued_s": 0.0})
            for k in seen:
                seen[k] = max(seen[k], q.get(k, 0))
    print(f"\n{'TENANT':14} {'IN FLIGHT':>9} {'RUNNING':>8} {'IDLE':>5} {'QUEUED':>7} {'QUEUE S':>8} {'ADMITTED':>9} "
          f"{'REFUSED':>8}  MEAN TASK  REFUSED BY CODE")  # fmt: skip
    for tenant, rec in sorted(admission.items()):
        refused = rec.get("refused", {}) or {}
        by_code = " ".join(f"{k}={v}" for k, v in sorted(refused.items())) or rec.get("error", "")
        q = queue.get(tenant) or ({"running": 0, "queued": 0, "queued_s": 0.0} if reported else None)
        runs, queued, queued_s = (
            (f"{int(q['running'])}", f"{int(q['queued'])}", f"{q['queued_s']:.1f}") if q else ("-", "-", "-")
        )
        print(
            f"{tenant:14} {len(rec.get('in_flight', {})):>9} {runs:>8} {len(rec.get('idle', {})):>5} {queued:>7} {queued_s:>8} "
            f"{rec.get('admitted', 0):>9} {sum(refused.values()):>8}  {rec.get('mean_task_s', 0.0):8.2f}s  {by_code}"
        )


def _print_quotas(quotas: list[Held]) -> None:
    # What each tenant holds of its share of the streams it writes to (mesh_tenancy.quota).
    print(f"\n{'TENANT':14} {'STREAM':8} {'HELD':>10} {'QUOTA':>10} {'MESSAGES':>9}  REFUSED BY CODE")
    for q in quotas:
        limit = _mib(q.limit_bytes) if q.limit_bytes else "none"
        msgs = f"{q.msgs}" + (f"/{q.limit_msgs}" if q.limit_msgs else "")
        by_code = " ".join(f"{k}={v}" for k, v in sorted(q.refused.items()))
        print(f"{q.tenant:14} {q.stream:8} {_mib(q.bytes):>10} {limit:>10} {msgs:>9}  {by_code}")


def _print_streams(streams: dict[str, dict[str, float]]) -> None:
    print(f"\n{'STREAM':14} {'MESSAGES':>9} {'STORED':>10} {'CAP':>10} {'FULL':>6}")
    for name, v in streams.items():
        cap = _mib(v["max_bytes"]) if v["max_bytes"] > 0 else "none"
        if v["max_msgs"] > 0:
            cap += f", {int(v['max_msgs'])} msgs"
        flag = "  near its cap: new tasks are refused" if v["full"] >= 0.9 else ""
        print(f"{name:14} {int(v['messages']):>9} {_mib(v['bytes']):>10} {cap:>10} {v['full']:>6.1%}{flag}")


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands the mesh itself: identities, permissions, provisioning, a local mesh and its health."""
    s = sub.add_parser("init", help="mint identities (NATS creds, signing keys, trust bundle)")
    s.add_argument("--tenants", type=opt.tenants, default=["demo"], help="comma-separated tenant ids")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("policy", help="print every principal's NATS permissions")
    s.add_argument("--tenants", type=opt.tenants, default=None)
    s.set_defaults(fn=cmd_policy)

    s = sub.add_parser("provision", help="create streams, durable consumers and KV buckets (admin)")
    s.add_argument("--nats-url", default=None)
    s.add_argument("--replicas", type=int, choices=(1, 3), default=1)
    s.add_argument("--retention-days", type=opt.days, default=None,
                   help="how long task messages are kept (default 7); the audit chain has its own")  # fmt: skip
    s.add_argument("--audit-retention-days", type=opt.days, default=None,
                   help="how long the tamper-evident audit chain is kept (default 365)")  # fmt: skip
    s.add_argument("--record-retention-days", type=opt.days, default=None,
                   help="how long task records, step checkpoints and task statuses are kept (default: until "
                        "deleted); at least --retention-days")  # fmt: skip
    s.add_argument("--stream-max-mib", type=opt.cap("MiB"), default=STREAM_MAX_BYTES // MIB,
                   help="cap on each work stream and the DLQ (default 512; 0: none); full refuses new messages")  # fmt: skip
    s.add_argument("--audit-max-mib", type=opt.cap("MiB"), default=AUDIT_MAX_BYTES // MIB,
                   help="cap on the audit chain (default 1024; 0: none)")  # fmt: skip
    s.add_argument("--stream-max-msgs", type=opt.cap("messages"), default=0,
                   help="cap on each stream's messages (default 0: none)")  # fmt: skip
    s.add_argument("--pool", action="append", type=opt.pool_name, metavar="POOL",
                   help="a worker pool whose own durables are made too (repeat; meshctl pool)")  # fmt: skip
    s.set_defaults(fn=cmd_provision, usage=s.error)

    s = sub.add_parser("up", help="start nats-server, redis-server and the six services locally")
    s.add_argument("--tenants", type=opt.tenants, default=["demo"])
    s.add_argument("--nats-port", type=opt.port, default=4222, help="0 picks a free port")
    s.add_argument("--http-port", type=opt.port, default=8222, help="NATS monitoring port")
    s.add_argument("--redis-port", type=opt.port, default=6390)
    s.add_argument(
        "--cluster",
        type=int,
        choices=(1, 3),
        default=1,
        help="3: a 3-node JetStream cluster on loopback (node i on --nats-port + i), every stream and bucket R3",
    )
    s.add_argument("--replicas", type=opt.replicas, default={}, metavar="N|SERVICE=N,...",
                   help="processes per service: N for every service, or e.g. worker=2,tool-executor=2 (others 1); "
                   "replicas share their service's identity and consumers, so a killed one's work goes on "
                   "on the other within ack_wait")  # fmt: skip
    s.add_argument("--standby", action="store_true",
                   help="keep a warm standby of each service (imported, not connected): a killed process is "
                   "replaced by it, ready in a fraction of a cold start, at the cost of an idle process per service")  # fmt: skip
    s.add_argument("--no-supervise", action="store_true",
                   help="start everything and exit, with no supervisor restarting what exits")  # fmt: skip
    s.set_defaults(fn=cmd_up, usage=s.error)

    s = sub.add_parser("down", help="stop everything `up` started, and only that")
    s.set_defaults(fn=cmd_down)

    s = sub.add_parser("status", help="health of each service and its consumer lag")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_status)
