"""``meshctl``: the operator's and the tenant's command line.

Errors an operator can fix print as one line on stderr with a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx
import nats
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from mesh_contracts import SERVICES
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    DOCUMENT_TYPES,
    BudgetStatusReport,
    HeldCall,
    ProgressEvent,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    TaskRejected,
    TokenDelta,
    UsageRecorded,
)
from mesh_contracts.v1.records import AdmissionRecord, QuotaRecord
from mesh_durable.guard import CONTROL_BUCKET, GLOBAL_KEY, tenant_key
from mesh_identity import Signer, TrustBundle, Verifier
from mesh_kit.settings import log_nats_error, nats_servers
from mesh_tenancy.door import DoorRefused
from meshctl import budget as spend
from meshctl import local, release, review, workflow
from meshctl import options as opt
from meshctl.ask import AskError
from meshctl.identity import Identities, write_secret
from meshctl.local import MeshError, MeshState
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
    from meshctl.approver import Approver
    from meshctl.client import TenantClient
    from meshctl.top import Asker

DEFAULT_HOME = ".mesh"


def _running(home: Path) -> MeshState:
    state = MeshState.load(home)
    if state is None or not any(n.alive() for n in state.nats):
        raise MeshError(f"no mesh is running from {home} (start one with: meshctl up)")
    return state


def _nats_url(args: argparse.Namespace, home: Path) -> str:
    if getattr(args, "nats_url", None):
        url: str = args.nats_url  # argparse's Namespace is untyped: --nats-url is a str
        return url
    return _running(home).nats_url


async def _admin(args: argparse.Namespace) -> NATS:
    home = opt.home(args)
    ids = Identities(home)
    if not ids.creds("admin").exists():
        raise MeshError(f"no identities in {home} (run: meshctl init)")
    return await nats.connect(
        nats_servers(_nats_url(args, home)),
        name="meshctl",
        connect_timeout=5,
        max_reconnect_attempts=0,
        error_cb=log_nats_error,
        **ids.connect_options("admin"),
    )


async def _bucket(nc: NATS, name: str) -> KeyValue:
    try:
        return await nc.jetstream().key_value(name)
    except nats.js.errors.BucketNotFoundError:
        raise MeshError(f"no {name!r} KV bucket on this mesh (create it with: meshctl provision)") from None


def _absent(message: str) -> int:
    print(f"meshctl: {message}", file=sys.stderr)
    return 1


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def render_switches(switches: dict[str, dict[str, Any]], now: float) -> str:
    """``control`` bucket entries (``kill.global``, ``kill.tenant.<t>``) that are on, one line each."""
    if not switches:
        return "no kill switch is on"
    rows = []
    for key in sorted(switches, key=lambda k: (k != GLOBAL_KEY, k)):
        v = switches[key]
        scope = "global" if key == GLOBAL_KEY else f"tenant {key.removeprefix(tenant_key(''))}"
        try:
            age = _age(now - float(v.get("at", now)))
        except (TypeError, ValueError):
            age = "?"
        rows.append((scope, age, str(v.get("by", "?")), str(v.get("reason", ""))))
    w = max(len("SWITCH"), *(len(r[0]) for r in rows))
    lines = [f"{'SWITCH':<{w}}  {'AGE':>5}  {'BY':<8} REASON"]
    lines += [f"{scope:<{w}}  {age:>5}  {by:<8} {reason}" for scope, age, by, reason in rows]
    return "\n".join(lines)


# --- commands -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    ids = Identities(opt.home(args))
    ids.mint(args.tenants)
    print(f"identities for {len(policy(ids.tenants()))} principals in {ids.home} (secrets mode 0600)")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    tenants = args.tenants or Identities(opt.home(args)).tenants() or ["demo"]
    out = {
        name: {
            "role": p.role,
            "tenant": p.tenant,
            "publish": p.pub,
            "subscribe": p.sub,
            "allow_responses": p.allow_responses,
        }
        for name, p in policy(tenants).items()
    }
    print(json.dumps(out, indent=2))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    messages_days = args.retention_days or RETENTION_S / 86400
    if args.record_retention_days and args.record_retention_days < messages_days:
        args.usage(f"--record-retention-days {args.record_retention_days:g} is shorter than the {messages_days:g} days "
                   "task messages are kept: a task's status must outlive every message about it")  # fmt: skip

    async def run() -> None:
        nc = await _admin(args)
        try:
            days = {
                "retention_s": args.retention_days and args.retention_days * 86400.0,
                "audit_retention_s": args.audit_retention_days and args.audit_retention_days * 86400.0,
                "record_retention_s": args.record_retention_days and args.record_retention_days * 86400.0,
            }
            caps = Caps(args.stream_max_mib * MIB, args.audit_max_mib * MIB, args.stream_max_msgs)
            report = await provision(nc, replicas=args.replicas, caps=caps, **{k: v for k, v in days.items() if v})
        finally:
            await nc.close()
        print(
            f"provisioned {len(report.streams)} streams, {len(report.consumers)} durable consumers, "
            f"{len(report.buckets)} KV buckets"
        )

    asyncio.run(run())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    state = asyncio.run(
        local.up(
            opt.home(args),
            tenants=args.tenants,
            nats_port=args.nats_port,
            http_port=args.http_port,
            redis_port=args.redis_port,
            cluster=args.cluster,
        )
    )
    print(
        f"mesh up in {time.monotonic() - t0:.1f}s: nats {state.nats_url}, redis 127.0.0.1:{state.redis_port}, "
        f"{len(state.services)} services ({', '.join(state.services)})"
    )
    print(f"tenants: {', '.join(Identities(opt.home(args)).tenants())}; home: {opt.home(args)}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = local.down(opt.home(args))
    print(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else " (nothing was running)"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    home = opt.home(args)
    state = _running(home)

    asker = _budget_asker(args)

    async def run() -> tuple[
        dict[str, dict[str, Any]], dict[str, ConsumerLag], dict[str, dict[str, Any]], dict[str, dict[str, float]],
        BudgetStatusReport | None, list[Held],
    ]:  # fmt: skip
        health: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient(timeout=2.0) as client:
            for name, proc in state.services.items():
                if not proc.alive():
                    health[name] = {"ready": False, "reason": "process not running"}
                    continue
                try:
                    health[name] = (await client.get(f"http://127.0.0.1:{proc.http_port}/status")).json()
                except httpx.HTTPError as exc:
                    health[name] = {"ready": False, "reason": f"health endpoint: {exc}"}
        nc = await _admin(args)
        try:
            lag = await consumer_lag(nc)
            streams = await store_levels(nc)
            try:
                await _bucket(nc, AdmissionRecord.bucket)
                admission = await spend.scan(nc, AdmissionRecord.bucket, ">")
            except MeshError as exc:  # a mesh provisioned before admission existed
                admission = {"?": {"error": str(exc)}}
            try:
                await _bucket(nc, QuotaRecord.bucket)
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
        return health, lag, admission, streams, report, summarise(quota_records)

    health, lag, admission, streams, report, quotas = asyncio.run(run())
    if args.json:
        held = [vars(q) for q in quotas]
        print(json.dumps({"services": health, "consumers": lag, "tenants": admission, "streams": streams,
                          "quotas": held}, indent=2))  # fmt: skip
        return 0 if all(h.get("ready") for h in health.values()) else 1
    print(f"{'SERVICE':14} {'PID':>7} {'READY':6} {'LAG':>5}  DETAIL")
    for name, proc in state.services.items():
        h = health[name]
        mine = [v for v in lag.values() if v["service"] == name]
        svc_lag = "?" if any(v["pending"] < 0 for v in mine) else sum(v["pending"] + v["ack_pending"] for v in mine)
        detail = h.get("reason", "")
        counters = h.get("counters", {})
        if counters:
            detail += "  " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(counters.items()))
        print(f"{name:14} {proc.pid:>7} {'yes' if h.get('ready') else 'NO':6} {svc_lag:>5}  {detail}")
    for p in (*state.nats, state.redis):
        if p:
            print(f"{p.name:14} {p.pid:>7} {'yes' if p.alive() else 'NO':6} {'':>5}  port {p.port}")
    if any(v["pending"] < 0 for v in lag.values()):
        print("LAG ?: a consumer's leader did not answer in 2 s (a cluster electing leaders after a node died?)")
    if admission:
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
            running, queued, queued_s = (
                (f"{int(q['running'])}", f"{int(q['queued'])}", f"{q['queued_s']:.1f}") if q else ("-", "-", "-")
            )
            print(
                f"{tenant:14} {len(rec.get('in_flight', {})):>9} {running:>8} {len(rec.get('idle', {})):>5} {queued:>7} {queued_s:>8} "
                f"{rec.get('admitted', 0):>9} {sum(refused.values()):>8}  {rec.get('mean_task_s', 0.0):8.2f}s  {by_code}"
            )
    if quotas:
        # What each tenant holds of its share of the streams it writes to (mesh_tenancy.quota).
        print(f"\n{'TENANT':14} {'STREAM':8} {'HELD':>10} {'QUOTA':>10} {'MESSAGES':>9}  REFUSED BY CODE")
        for q in quotas:
            limit = _mib(q.limit_bytes) if q.limit_bytes else "none"
            msgs = f"{q.msgs}" + (f"/{q.limit_msgs}" if q.limit_msgs else "")
            by_code = " ".join(f"{k}={v}" for k, v in sorted(q.refused.items()))
            print(f"{q.tenant:14} {q.stream:8} {_mib(q.bytes):>10} {limit:>10} {msgs:>9}  {by_code}")
    if streams:
        print(f"\n{'STREAM':14} {'MESSAGES':>9} {'STORED':>10} {'CAP':>10} {'FULL':>6}")
        for name, v in streams.items():
            cap = _mib(v["max_bytes"]) if v["max_bytes"] > 0 else "none"
            if v["max_msgs"] > 0:
                cap += f", {int(v['max_msgs'])} msgs"
            flag = "  near its cap: new tasks are refused" if v["full"] >= 0.9 else ""
            print(f"{name:14} {int(v['messages']):>9} {_mib(v['bytes']):>10} {cap:>10} {v['full']:>6.1%}{flag}")
    return 0 if all(h.get("ready") for h in health.values()) else 1


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def _tenant_client(args: argparse.Namespace) -> TenantClient:
    """The client of ``--tenant`` with its own identity (not yet connected)."""
    from meshctl.client import TenantClient

    home = opt.home(args)
    ids = Identities(home)
    principal = f"client.{args.tenant}"
    if not ids.creds(principal).exists():
        raise MeshError(
            f"unknown tenant {args.tenant!r} (known: {', '.join(ids.tenants()) or 'none'}; "
            "add one with: meshctl init --tenants NAME)"
        )
    return TenantClient.of(ids, _nats_url(args, home), args.tenant)


def print_held(held: Sequence[HeldCall], file: TextIO = sys.stdout) -> None:
    """The calls the task went on without: not part of the answer, and, the task having ended,
    their approvals void (a decision now performs nothing)."""
    if not held:
        return
    print(f"\nheld for a human decision ({len(held)}), not performed; the answer does not include them, and "
          "their approvals are void now that the task has ended:", file=file)  # fmt: skip
    for h in held:
        where = f" -> {', '.join(h.destinations)}" if h.destinations else ""
        print(f"  {h.approval_id}  {h.tool}{where}  (step {h.step_id})", file=file)


def cmd_submit(args: argparse.Namespace) -> int:
    from meshctl.submission import Followed, Resubmit

    if args.goal is None and args.workflow is None:
        args.usage("a goal is needed (or --workflow NAME, whose nodes say what to do)")
    if args.inputs and args.workflow is None:
        args.usage("--input is for a workflow's inputs: name the workflow with --workflow")
    if args.goal is None:
        args.goal = f"run workflow {args.workflow}"
    client = _tenant_client(args)

    live = {"call": ""}  # the model call whose tokens are being printed, if a line is open
    calls: dict[str, tuple[int, float]] = {}  # model calls seen: call id -> (tokens, cost)

    def show(model: object) -> None:
        if args.json:
            return
        if isinstance(model, TokenDelta):
            if model.kind == "end":
                if live["call"] == model.call_id:
                    print(flush=True)
                    live["call"] = ""
                return
            if model.call_id != live["call"]:
                if live["call"]:
                    print(flush=True)
                live["call"] = model.call_id
                print(f"  [{'worker':>13}] {'streaming ' + model.step_id:<16} ", end="", flush=True)
            if model.kind == "delta":
                print(model.text, end="", flush=True)
            else:  # the text so far is void: a retry or a fallback model follows
                print(f"  <discarded: {model.text}>", flush=True)
                live["call"] = ""
            return
        if isinstance(model, (ProgressEvent, UsageRecorded)) and live["call"]:
            print(flush=True)
            live["call"] = ""
        if isinstance(model, ProgressEvent):
            print(f"  [{model.source:>13}] {model.stage:<16} {model.message}", flush=True)
        elif isinstance(model, UsageRecorded):
            tokens = model.input_tokens + model.output_tokens
            calls[model.call_id] = (tokens, model.cost_usd)
            failed = f" (failed: {model.error[:80]})" if model.error else ""
            total_t, total_c = sum(t for t, _ in calls.values()), sum(c for _, c in calls.values())
            print(f"  [{model.agent:>13}] {'usage':<16} {model.role or model.agent} {model.provider}/{model.model}: "
                  f"{tokens} tokens, ${model.cost_usd:.6f}{failed}; task so far {total_t} tokens, ${total_c:.6f}",
                  flush=True)  # fmt: skip

    async def run() -> int:
        async with client:
            if not args.json and args.follow:
                print(f"submitting to tenant {args.tenant}: {args.goal}", flush=True)
            limits = {k: v for k, v in (("deadline_s", args.deadline), ("max_queue_s", args.max_queue),
                                         ("stall_timeout_s", args.stall_timeout)) if v is not None}  # fmt: skip
            seen = await client.submit(
                args.goal, task_id=args.task_id, policy=args.policy, priority=args.priority, follow=args.follow,
                timeout=args.timeout, on_event=show if args.follow else None, labels=dict(args.label or ()),
                limits=TaskLimits(**limits) if limits else None,
                resubmit=Resubmit(args.retry, args.retry_max_wait) if args.retry else None,
                refusal_wait_s=0.0 if args.follow else args.refusal_wait,
                workflow=args.workflow, inputs=dict(args.inputs or ()),
            )  # fmt: skip
        out = seen.outcome
        if not args.follow:
            return submitted(seen)
        if args.json:
            print(json.dumps({"task_id": seen.task_id, "latency_s": round(seen.latency_s, 3),
                              "outcome": out.model_dump(mode="json") if out else None, "events": len(seen.events),
                              "attempts": seen.attempts}, indent=2))  # fmt: skip
        else:
            if seen.refusals:
                print(f"\n{resubmitted(seen)}", flush=True)
            show_outcome(seen)
        if out is None:
            print(f"meshctl: task {seen.task_id} did not finish within {args.timeout:.0f}s", file=sys.stderr)
            return 3
        if isinstance(out, TaskRejected) and out.retry_after_s is not None:
            return 4  # refused at the door: worth submitting again after retry_after_s
        return 0 if isinstance(out, TaskCompleted) else 1

    def show_outcome(seen: Followed) -> None:
        out = seen.outcome
        if isinstance(out, TaskCompleted):
            u = out.usage
            print(f"\ncompleted {seen.task_id} in {seen.latency_s:.2f}s ({out.steps} steps)\n\n{out.answer}\n")
            for c in out.citations:
                print(f"  cited: {c.doc_id} v{c.version[:8]} chunk {c.chunk_id} sha256:{c.chunk_hash[:12]}")
            print(
                f"\nusage: {u.input_tokens} input + {u.output_tokens} output tokens "
                f"in {u.calls} model calls, ${u.cost_usd:.6f}"
            )
            print_held(out.held)
        elif isinstance(out, TaskRejected) and out.retry_after_s is not None:
            print(
                f"\nrefused {seen.task_id} ({out.code}): {out.reason}; retry after {out.retry_after_s:g}s",
                file=sys.stderr,
            )
        elif isinstance(out, (TaskFailed, TaskRejected)):
            print(f"\n{out.type.split('.')[1]} {seen.task_id}: {out.reason}", file=sys.stderr)
            print_held(getattr(out, "held", ()), file=sys.stderr)

    def submitted(seen: Followed) -> int:
        """Without --follow: the id once stored and not refused within --refusal-wait; a refusal
        is said (on stderr, as with --follow) and exits 4 (1 if it is not worth retrying)."""
        out = seen.outcome
        refused = out if isinstance(out, TaskRejected) else None
        if args.json:
            print(json.dumps({"task_id": seen.task_id, "outcome": refused.model_dump(mode="json") if refused else None,
                              "taken_up": seen.taken_up, "attempts": seen.attempts}, indent=2))  # fmt: skip
        elif refused is None:
            print(seen.task_id)
        if seen.refusals and not args.json:
            print(resubmitted(seen), file=sys.stderr)
        if refused is not None:
            if not args.json:
                retry = f"; retry after {refused.retry_after_s:g}s" if refused.retry_after_s is not None else ""
                print(f"refused {seen.task_id} ({refused.code}): {refused.reason}{retry}", file=sys.stderr)
            return 4 if refused.retry_after_s is not None else 1
        if not seen.taken_up and args.refusal_wait > 0 and not args.json:
            print(f"meshctl: {seen.task_id} is stored; the planner has not decided on it within "
                  f"{args.refusal_wait:g}s (a backlog, or a run slot): it may still be refused "
                  "(--follow waits for the outcome)", file=sys.stderr)  # fmt: skip
        return 0

    def resubmitted(seen: Followed) -> str:
        codes = ", ".join(f"{r.code} (retry after {r.retry_after_s:g}s)" for r in seen.refusals)
        return f"submitted {seen.attempts} times, refused before: {codes}"

    return asyncio.run(run())


def cmd_signal(args: argparse.Namespace) -> int:
    """``meshctl signal TASK NAME [--payload JSON]``: as the tenant's client, and say what the
    planner made of it (taken by its node, kept until the node is reached, or refused and why)."""
    if args.payload is not None and args.payload_file is not None:
        return _absent("give the payload with --payload or --payload-file, not both")
    text = args.payload
    if args.payload_file is not None:
        try:
            text = Path(args.payload_file).read_text(encoding="utf-8")
        except OSError as exc:
            return _absent(f"--payload-file {args.payload_file}: {exc.strerror or exc}")
    try:
        payload = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        return _absent(f"the payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    client = _tenant_client(args)

    async def run() -> int:
        async with client:
            seen = await client.signal(args.task_id, args.name, payload, key=args.key, timeout=args.timeout)
        if isinstance(seen, ProgressEvent):
            print(f"{args.task_id}: {seen.message}")
            return 1 if seen.stage == "signal.refused" else 0
        if isinstance(seen, (TaskCompleted, TaskFailed, TaskRejected)):
            return _absent(f"task {args.task_id} has already finished ({seen.type}); no signal can reach it")
        return _absent(f"the planner said nothing of signal {args.name} to {args.task_id} within {args.timeout:g}s "
                       "(is the task id right, and the planner running?)")  # fmt: skip

    return asyncio.run(run())


def cmd_control(args: argparse.Namespace) -> int:
    """``meshctl halt|resume|cancel TASK``: as the tenant's client, and wait for the planner."""
    client = _tenant_client(args)
    reason = (args.reason or "").strip() or f"{args.command} from meshctl"

    async def run() -> int:
        async with client:
            seen = await client.control(args.command, args.task_id, reason, timeout=args.timeout)
        if isinstance(seen, ProgressEvent):
            print(f"{args.task_id}: {seen.message}")
            return 0
        if isinstance(seen, TaskFailed) and args.command == "cancel" and "cancelled" in seen.reason:
            print(f"{args.task_id}: {seen.reason}")
            return 0
        if isinstance(seen, (TaskCompleted, TaskFailed, TaskRejected)):
            return _absent(f"task {args.task_id} has already finished ({seen.type}); nothing to {args.command}")
        hint = " (is it halted?)" if args.command == "resume" else " (is the task id right, and the planner running?)"
        return _absent(f"the planner did not apply {args.command} to {args.task_id} within {args.timeout:g}s{hint}")

    return asyncio.run(run())


INGEST_TYPES = DOCUMENT_TYPES
INGEST_MAX_BYTES = 4_400_000  # what one ingest message carries, base64-encoded


def _documents(path: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """(doc id, file) for every supported file under ``path``, and the files skipped. The doc id
    is the path relative to the directory given (the file name for a single file)."""
    if not path.exists():
        raise MeshError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix.lower() not in INGEST_TYPES:
            raise MeshError(f"unsupported document type {path.suffix or '(none)'!r} for {path.name} "
                            f"(supported: {' '.join(sorted(INGEST_TYPES))})")  # fmt: skip
        return [(path.name, path)], []
    docs: list[Path] = []
    skipped: list[Path] = []
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        (docs if f.suffix.lower() in INGEST_TYPES else skipped).append(f)
    return [(f.relative_to(path).as_posix(), f) for f in docs], skipped


def cmd_ingest(args: argparse.Namespace) -> int:
    """``meshctl ingest PATH --tenant T``: add or replace documents in the tenant's index."""
    docs, skipped = _documents(Path(args.path))
    if not docs:
        raise MeshError(f"no documents to ingest under {args.path} (supported: {' '.join(sorted(INGEST_TYPES))})")
    too_big = [f for _, f in docs if f.stat().st_size > INGEST_MAX_BYTES]
    if too_big:
        raise MeshError(f"{too_big[0]} is {too_big[0].stat().st_size} bytes; one document may be at most "
                        f"{INGEST_MAX_BYTES} bytes (split it)")  # fmt: skip
    client = _tenant_client(args)

    async def run() -> int:
        failed = chunks = 0
        started = time.perf_counter()
        async with client:
            for doc_id, f in docs:
                got = await client.ingest(doc_id, f.read_bytes(), INGEST_TYPES[f.suffix.lower()], timeout=args.timeout)
                if got is None:
                    failed += 1
                    print(f"  {doc_id}: no answer within {args.timeout:g}s (is the rag service running?)")
                elif not got.ok:
                    failed += 1
                    print(f"  {doc_id}: refused: {got.error}")
                else:
                    chunks += got.chunks
                    what = ("unchanged" if got.replaced == got.version else
                            f"replaced v{got.replaced[:8]}" if got.replaced else "new")  # fmt: skip
                    print(f"  {doc_id}: {got.chunks} chunks, v{got.version[:8]} ({what}), index {got.index_version}")
        took = time.perf_counter() - started
        for f in skipped:
            print(f"  skipped {f} (unsupported type)")
        print(f"ingested {len(docs) - failed}/{len(docs)} document(s), {chunks} chunks in {took:.1f}s "
              f"into tenant {args.tenant}")  # fmt: skip
        return 1 if failed else 0

    return asyncio.run(run())


def _approver(args: argparse.Namespace) -> Approver:
    from meshctl.approver import ApprovalError, Approver

    home = opt.home(args)
    ids = Identities(home)
    if not ids.creds("approver").exists():
        raise MeshError(f"no approver identity in {home} (run: meshctl init)")
    try:
        return Approver.of(ids, _nats_url(args, home), person=getattr(args, "as_", None))
    except ApprovalError as exc:
        raise MeshError(str(exc)) from None


def cmd_approvers(args: argparse.Namespace) -> int:
    """``meshctl approvers|authors add|remove NAME --tenant T`` and ``... list``: the people who
    decide a tenant's approvals, or author its workflows, each with a key of their own in the
    trust bundle."""
    from mesh_identity import TrustBundle
    from meshctl import approvers

    role = getattr(args, "role", "approver")
    ids = Identities(opt.home(args))
    if not ids.exists():
        raise MeshError(f"no identities in {ids.home} (run: meshctl init)")
    if args.action == "list":
        found = approvers.people(TrustBundle.from_file(ids.trust_bundle), args.tenant, role)
        if args.json:
            print(json.dumps([{"principal": p.name, "tenant": p.tenant} for p in found], indent=2))
        elif not found:
            where = f" for {args.tenant}" if args.tenant else ""
            print(f"no {role}s{where} (add one: meshctl {role}s add NAME --tenant T)")
        else:
            print("\n".join(f"{p.name}  tenant {p.tenant}" for p in found))
        return 0
    if not args.name or not args.tenant:
        raise MeshError(f"{role}s {args.action} needs a NAME and --tenant")
    act = approvers.add if args.action == "add" else approvers.remove

    async def run() -> int:
        try:
            name, revision = await act(ids, args.tenant, args.name, nats_servers(_nats_url(args, ids.home)), role)
        except approvers.ApproverError as exc:
            raise MeshError(str(exc)) from None
        if role == "author":
            if args.action == "add":
                print(f"{name} authors {args.tenant}'s workflows (trust bundle revision {revision}); key "
                      f"{ids.signing_key(name)}: give it to them. Publish with: meshctl workflow publish FILE "
                      f"--as {name}")  # fmt: skip
            else:
                print(f"{name} removed: the planner refuses their next change (trust bundle revision {revision})")
            return 0
        named = TrustBundle.from_file(ids.trust_bundle).approvers(args.tenant)
        if args.action == "add":
            print(f"{name} approves for {args.tenant} (trust bundle revision {revision}); key "
                  f"{ids.signing_key(name)}: give it to them. Decide with: meshctl approve ID --as {name}")  # fmt: skip
            if len(named) == 1:
                print(f"{args.tenant}'s held calls are now decided by its named approvers alone: the console's "
                      "approver may no longer decide them")  # fmt: skip
        else:
            print(f"{name} removed: nothing it signs is believed any more (trust bundle revision {revision})")
            if not named:
                print(f"{args.tenant} names no approver any more: the console's approver decides its held calls again")
        return 0

    return asyncio.run(run())


def cmd_approvals(args: argparse.Namespace) -> int:
    """``meshctl approvals``: the tool calls waiting for a human."""

    async def run() -> int:
        async with _approver(args) as ap:
            records = await ap.list(everything=args.all)
        if args.json:
            print(json.dumps(records, indent=2))
            return 0
        if not records:
            print("no approval is waiting" if not args.all else "no approvals")
            return 0
        now = time.time()
        for r in records:
            req = r["request"]
            left = f"expires in {_age(r['deadline'] - now)}" if r["status"] == "pending" else r["status"]
            if r.get("void"):
                left += f" ({r['void']}" + (f"; {r['decided']} too late" if r.get("decided") else "") + ")"
            by = f" by {r['decided_by']}" if r.get("decided_by") else ""
            named = ap.named(r["tenant"]) if ap.tenant is None and r["status"] == "pending" else []
            by += f"  [decided by {r['tenant']}'s approvers: {', '.join(named)}]" if named else ""
            print(f"{r['approval_id']}  {r['tenant']}/{r['task_id']} step {r['step_id']}  {left}{by}")
            print(f"    {r['tool']}({json.dumps(req.get('arguments', {}))[:200]})")
            for reason in r.get("reasons", [])[:3]:
                print(f"    - {reason}")
        return 0

    return asyncio.run(run())


def cmd_decide(args: argparse.Namespace) -> int:
    """``meshctl approve|deny ID``: decide one waiting tool call, as the approver."""
    from meshctl.approver import ApprovalError

    async def run() -> int:
        async with _approver(args) as ap:
            try:
                rec = await ap.decide(args.approval_id, args.command == "approve", args.comment or "")
            except ApprovalError as exc:
                raise MeshError(str(exc)) from None
        print(f"{rec['approval_id']}: {rec['status']} by {rec['decided_by']} ({rec['tool']} for "
              f"{rec['tenant']}/{rec['task_id']})")  # fmt: skip
        return 0

    return asyncio.run(run())


def cmd_audit(args: argparse.Namespace) -> int:
    from meshctl import audit

    if args.action in ("verify", "chain"):
        return _audit_chain(args)
    box = audit.opener(args.auditor_key or Identities(opt.home(args)).auditor_key(args.tenant))
    if args.to and box is None:
        raise MeshError(f"--to needs the auditor key of {args.tenant} (values are sealed to it)")

    async def run() -> int:
        nc = await _admin(args)
        try:
            rows = audit.effects(await audit.audited(nc, args.tenant, args.task or ""), box, args.to)
        finally:
            await nc.close()
        print(json.dumps(rows, indent=2) if args.json else audit.render(rows))
        return 0

    return asyncio.run(run())


def cmd_history(args: argparse.Namespace) -> int:
    from meshctl import history

    verifier = Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle))

    async def run() -> int:
        nc = await _admin(args)
        try:
            stored = await history.collect(nc, args.tenant, args.task_id, events=not args.no_events)
        finally:
            await nc.close()
        h = history.build(args.tenant, args.task_id, stored, verifier)
        if args.json:
            print(json.dumps(history.as_json(h), indent=2, default=str))
        else:
            print(history.render(h))
        return 0 if h.entries else _absent(f"no stored message about {args.tenant}/{args.task_id}")

    return asyncio.run(run())


def cmd_replay(args: argparse.Namespace) -> int:
    from mesh_guardrails.redact import redact_value
    from meshctl import replay as rp

    verifier = Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle))
    client = _tenant_client(args)

    async def stories(*task_ids: str) -> list[rp.Story]:
        nc = await _admin(args)
        try:
            return [await rp.load(nc, args.tenant, t, verifier) for t in task_ids]
        finally:
            await nc.close()

    async def run() -> int:
        (original,) = await stories(args.task_id)
        try:
            # A route or a prompt version without --from means "this task on that model/prompt":
            # every call live.
            live = args.live or ((args.model is not None or bool(args.prompt_version)) and args.from_step is None)
            how = rp.replay_of(original, from_step=args.from_step, live=live, route=args.model or "",
                               prompts=dict(args.prompt_version or ()))  # fmt: skip
        except rp.ReplayError as exc:
            raise MeshError(str(exc)) from None
        task_id = args.new_task_id or f"{args.task_id[:48]}-r{uuid.uuid4().hex[:8]}"
        if not args.json:
            print(f"replaying {args.tenant}/{args.task_id} as {task_id} ...", flush=True)
        async with client:
            seen = await client.submit(**rp.resubmission(original), task_id=task_id, replay=how, progress=False,
                                       timeout=args.timeout)  # fmt: skip
        if seen.outcome is None:
            print(f"meshctl: replay {task_id} did not finish within {args.timeout:.0f}s", file=sys.stderr)
            return 3
        (again,) = await stories(task_id)
        diff = rp.compare(original, again)
        same = rp.behaves_the_same(diff)
        if args.json:
            report = {"replay": how.model_dump(mode="json"), "task_id": task_id, "same_behaviour": same,
                      "original": original.summary(), "replayed": again.summary(), "diff": redact_value(diff)}  # fmt: skip
            print(json.dumps(report, indent=2, default=str))
        else:
            print(rp.render(original, again, how, diff))
        if isinstance(seen.outcome, TaskRejected):
            print(f"meshctl: the replay was refused: {seen.outcome.reason}", file=sys.stderr)
            return 4 if seen.outcome.retry_after_s is not None else 1
        return 1 if args.fail_on_change and not same else 0

    return asyncio.run(run())


def cmd_trace(args: argparse.Namespace) -> int:
    from meshctl import history
    from meshctl import trace as tr

    verifier = Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle))

    async def run() -> int:
        nc = await _admin(args)
        try:
            stored = await history.collect(nc, args.tenant, args.task_id)
        finally:
            await nc.close()
        h = history.build(args.tenant, args.task_id, stored, verifier)
        t = tr.from_history(h, {(stream, s.seq): s.headers for stream, s in stored})
        if not t.hops:
            return _absent(f"no traced message about {args.tenant}/{args.task_id}")
        if args.jaeger:
            spans: list[tr.Span] = []
            for trace_id in t.trace_ids:
                spans += await asyncio.to_thread(tr.fetch_jaeger, args.jaeger, trace_id)
            if args.json:
                print(json.dumps(tr.spans_json(args.tenant, args.task_id, t.trace_ids, spans), indent=2))
            else:
                print(tr.render_spans(args.tenant, args.task_id, t.trace_ids, spans))
            return 0 if spans else 1
        if args.json:
            print(json.dumps(tr.messages_json(t), indent=2, default=str))
        else:
            print(tr.render_messages(t))
        return 0

    try:
        return asyncio.run(run())
    except tr.BackendError as exc:
        print(f"meshctl trace: {exc}", file=sys.stderr)
        return 1


def _unspecified(host: str) -> bool:
    """An address meaning every interface (the URL then names the loopback one)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def cmd_dashboard(args: argparse.Namespace) -> int:
    from meshctl.dashboard import Dashboard, sign_in

    home = opt.home(args)
    ids = Identities(home)
    if not ids.signing_key("admin").exists():
        raise MeshError(f"no operator identity in {home} (run: meshctl init)")
    state = MeshState.load(home)
    health = (
        {n: f"http://127.0.0.1:{p.http_port}/status" for n, p in state.services.items() if p.http_port} if state else {}
    )

    async def connect() -> NATS:
        return await nats.connect(nats_servers(_nats_url(args, home)), name="meshctl-dashboard", connect_timeout=5,
                                  error_cb=log_nats_error, **ids.connect_options("admin"))  # fmt: skip

    async def run() -> int:
        reviewer = _approver(args) if args.as_ else None  # decides as that person: their key, on this machine
        async with reviewer if reviewer is not None else contextlib.nullcontext():
            return await serve(reviewer)

    async def serve(reviewer: Any) -> int:
        board = Dashboard(connect, Verifier(TrustBundle.from_file(ids.trust_bundle)), health=health,
                          budget=_budget_asker(args), interval_s=args.interval, host=args.host,
                          port=args.port, reviewer=reviewer)  # fmt: skip
        port = await board.start()
        token = sign_in(Signer.from_file("admin", ids.signing_key("admin")), ttl_s=args.hours * 3600)
        host = "127.0.0.1" if _unspecified(args.host) else args.host
        url = f"http://{host}:{port}/?token={token}"
        if args.url_file:
            write_secret(args.url_file, url + "\n")
            print(f"dashboard on http://{host}:{port}/ (sign-in URL in {args.url_file}); Ctrl-C stops it", flush=True)
        else:
            mode = f"reviews as {args.as_}: anyone with the link decides as them" if args.as_ else "read-only"
            print(f"dashboard: {url}\n({mode}; the link signs you in for {args.hours:g} h; Ctrl-C stops it)",
                  flush=True)  # fmt: skip
        try:
            await asyncio.Event().wait()
        finally:
            await board.stop()
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def _budget_asker(args: argparse.Namespace) -> Asker | None:
    """Ask the budget service what it sees (``budget.status``), signed with the home's admin key
    and its answer verified against the home's trust bundle; None without an admin key."""
    from meshctl.ask import budget_status

    ids = Identities(opt.home(args))
    if not ids.signing_key("admin").exists():
        return None
    signer = Signer.from_file("admin", ids.signing_key("admin"))
    verifier = Verifier(TrustBundle.from_file(ids.trust_bundle))
    return lambda nc: budget_status(nc, signer, verifier)


def cmd_top(args: argparse.Namespace) -> int:
    from meshctl import top

    state = MeshState.load(opt.home(args))  # a mesh of ``meshctl up``: its services' /status too
    health = (
        {n: f"http://127.0.0.1:{p.http_port}/status" for n, p in state.services.items() if p.http_port}
        if (state)
        else {}
    )
    try:
        frame = asyncio.run(
            top.run(
                lambda: _admin(args), args.interval, args.once or args.json, health, sys.stdout, _budget_asker(args)
            )
        )
    except KeyboardInterrupt:
        return 0
    if args.json:
        print(json.dumps(frame.as_json(), indent=2))
    else:
        print(top.render(frame))
    return 0


def _audit_chain(args: argparse.Namespace) -> int:
    """``audit chain`` lists a tenant's chain; ``audit verify`` proves it whole or names the first
    break (exit 1), against the trust bundle of the mesh home and the budget's anchors."""
    from mesh_durable.chain import verify
    from meshctl import audit

    expect: tuple[int, str] | None = None
    if getattr(args, "anchor", None):
        n, _, h = args.anchor.partition(":")
        if not n.isdigit() or len(h) != 64:
            args.usage(f"--anchor wants N:SHA256 (a head 'audit verify' printed), not {args.anchor!r}")
        expect = (int(n), h.lower())

    async def run() -> int:
        nc = await _admin(args)
        try:
            records = await audit.chain(nc, args.tenant)
            if args.action == "chain":
                if args.json:
                    print(
                        json.dumps(
                            [
                                {"seq": r.seq, "time": r.time, **json.loads(r.data)}
                                for r in records
                                if not args.task or json.loads(r.data).get("task_id") == args.task
                            ],
                            indent=2,
                        )
                    )
                else:
                    print(audit.render_chain(records, args.task or ""))
                return 0
            anchors = await audit.anchors(nc, args.tenant)
            first_seq: int | None = None
            created: float | None = None
            try:
                info = await nc.jetstream().stream_info(topo.STREAMS["audit"])
                protected = bool(info.config.deny_delete and info.config.deny_purge)
                first_seq = info.state.first_seq
                created = info.created.timestamp() if info.created else None
            except nats.js.errors.NotFoundError:
                protected = None
        finally:
            await nc.close()
        verdict = verify(args.tenant, records, Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle)),
                         anchors, stream_first_seq=first_seq, pinned=expect, stream_created=created)  # fmt: skip
        if args.json:
            print(json.dumps({"tenant": verdict.tenant, "whole": verdict.ok, "broken_at": verdict.broken_at,
                              "reason": verdict.reason, "records": verdict.records, "first": verdict.first,
                              "head": verdict.head.__dict__ if verdict.head else None, "anchors": verdict.anchors,
                              "kinds": verdict.kinds, "notes": verdict.notes, "stream_protected": protected},
                             indent=2))  # fmt: skip
        else:
            print(audit.render_verdict(verdict, protected))
        return 0 if verdict.ok else 1

    return asyncio.run(run())


def cmd_rotate(args: argparse.Namespace) -> int:
    from meshctl.rotation import RotationError, rotate

    if bool(args.principal) == args.all:
        args.usage("name one principal, or --all for the six services")
    ids = Identities(opt.home(args))
    state = _running(ids.home)
    principals = list(SERVICES) if args.all else [args.principal]

    async def run() -> int:
        try:
            report = await rotate(ids, principals, nats_servers(_nats_url(args, ids.home)), grace_s=args.grace,
                                  reload=lambda: local.reload_nats(state.nats))  # fmt: skip
        except RotationError as exc:
            raise MeshError(str(exc)) from None
        print(json.dumps(asdict(report), indent=2) if args.json else f"done in {report.seconds:.1f}s")
        return 0

    return asyncio.run(run())


def cmd_revoke(args: argparse.Namespace) -> int:
    from meshctl.rotation import RotationError, revoke

    ids = Identities(opt.home(args))
    state = _running(ids.home)

    async def run() -> int:
        try:
            bundle = await revoke(ids, args.principal, nats_servers(_nats_url(args, ids.home)),
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
        nc = await _admin(args)
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
        nc = await _admin(args)
        try:
            kv = await _bucket(nc, spend.BUCKET)
            if args.task:
                task = await spend.get(kv, spend.usage_key(args.tenant, args.task))
                if task is None:
                    return _absent(f"no usage recorded for task {args.tenant}/{args.task}")
                print(json.dumps(task, indent=2) if args.json else spend.render_task(task))
            elif args.tenant:
                record = await spend.get(kv, spend.day_key(args.tenant, day))
                tasks = sorted(
                    (await spend.scan(nc, spend.BUCKET, spend.usage_key(args.tenant, ">"))).values(),
                    key=lambda t: (-spend.cost_of(t), str(t.get("task_id", ""))),
                )
                if record is None and not tasks:
                    return _absent(f"no usage recorded for tenant {args.tenant} (on {day} or any retained task)")
                if args.json:
                    print(json.dumps({"day": record, "tasks": tasks[: spend.TOP_TASKS]}, indent=2))
                else:
                    print(spend.render_day(record or {"tenant": args.tenant, "day": day}, tasks))
            else:
                days = list((await spend.scan(nc, spend.BUCKET, spend.day_key("*", day))).values())
                if not days:
                    return _absent(f"no usage recorded on {day}")
                print(json.dumps(days, indent=2) if args.json else spend.render_days(day, days))
            return 0
        except spend.BadRecord as exc:
            raise MeshError(str(exc)) from None
        finally:
            await nc.close()

    return asyncio.run(run())


async def _audit_switch(args: argparse.Namespace, nc: NATS, action: str, revision: int | None, reason: str) -> None:
    """The operator's switch as a link of the audit chain: the tenant's, or the mesh-wide one."""
    from mesh_contracts.v1.audit import MESH_WIDE, TENANT_WIDE
    from mesh_durable.chain import AuditChain

    ids = Identities(opt.home(args))
    signer = Signer.from_file("admin", ids.signing_key("admin"))
    await AuditChain(lambda: nc, lambda: signer).append(
            args.tenant or MESH_WIDE, TENANT_WIDE, f"control.kill-switch-{action}",
            f"kill-switch:{args.tenant or 'global'}:{action}:{revision or time.time_ns()}",
        actor="admin", detail={"scope": args.tenant or "global", "reason": reason, "revision": revision},
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
        nc = await _admin(args)
        try:
            kv = await _bucket(nc, CONTROL_BUCKET)
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


# ``eval DATASET`` and ``eval calibrate [FILE]`` share one parser; an option of the other mode
# is a usage error. Mode options default to "absent" so a misplaced one can be told apart.
def _mesh_commands(sub: argparse._SubParsersAction[opt.Parser]) -> None:
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
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("down", help="stop everything `up` started, and only that")
    s.set_defaults(fn=cmd_down)

    s = sub.add_parser("status", help="health of each service and its consumer lag")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_status)


def _task_commands(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands as a tenant's client: submit and follow a task, control it, ingest documents."""
    s = sub.add_parser("submit", help="submit a task as a tenant's client")
    s.add_argument("goal", nargs="?", default=None, help="what you want done (with --workflow: optional)")
    s.add_argument("--tenant", type=opt.tenant, default="demo")
    s.add_argument("--task-id", type=opt.tenant, default=None, help="defaults to a random id")
    s.add_argument(
        "--priority", type=opt.priority, default=5, help="0 (lowest) to 9 (highest): first within the tenant's turn"
    )
    s.add_argument("--follow", action="store_true", help="print progress live and wait for the result")
    s.add_argument("--timeout", type=opt.positive, default=120.0, help="seconds to wait with --follow")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.add_argument("--retry", type=opt.whole, default=0, metavar="N",
                   help="refused for a while (too many in flight, over the rate, the mesh near full...), wait its "
                        "retry-after and resubmit, at most N times; the same task id, so never a second task")  # fmt: skip
    s.add_argument("--retry-max-wait", type=opt.at_least_zero, default=60.0, metavar="S",
                   help="with --retry: at most S seconds of waiting in all (default 60)")  # fmt: skip
    s.add_argument("--refusal-wait", type=opt.at_least_zero, default=5.0, metavar="S",
                   help="without --follow: wait up to S seconds for the planner to refuse or take up the task "
                        "(default 5; 0: print the id once stored)")  # fmt: skip
    s.add_argument(
        "--policy",
        type=opt.policy,
        default=None,
        help='what the checker holds the answer to, as JSON or @FILE: {"forbidden_terms": [...], '
        '"require_citations": true, "rubric": "...", "output_schema": {...}, ...}',
    )
    s.add_argument("--label", type=opt.label, action="append", metavar="KEY=VALUE",
                   help="charge the task to a team, a user...: its spend records carry it (repeatable)")  # fmt: skip
    s.add_argument("--deadline", type=opt.positive, default=None, metavar="S",
                   help="seconds from submission after which the task fails (default 300)")  # fmt: skip
    s.add_argument("--max-queue", type=opt.positive, default=None, metavar="S",
                   help="most seconds the task may wait in queues in all before it is cancelled (default: no limit)")  # fmt: skip
    s.add_argument("--stall-timeout", type=opt.positive, default=None, metavar="S",
                   help="seconds without progress, queue time excluded, before it counts as stalled (default 120)")  # fmt: skip
    s.add_argument("--workflow", type=opt.workflow_ref, default=None, metavar="NAME[@VERSION]",
                   help="run the tenant's registered workflow: NAME (its latest version), NAME@latest or "
                        "NAME@VERSION; the task keeps that version to the end (meshctl workflow list)")  # fmt: skip
    s.add_argument("--input", type=opt.workflow_input, action="append", metavar="KEY=VALUE", dest="inputs",
                   help="an input of the workflow (a JSON value, or else text; repeatable)")  # fmt: skip
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_submit, usage=s.error)

    for verb, text in (
        ("halt", "pause a task: every service refuses its next model or tool call until resume"),
        ("resume", "resume a halted task: its halted steps run again"),
        ("cancel", "cancel a task: it fails with your reason, its dependents are not run"),
    ):
        s = sub.add_parser(verb, help=text)
        s.add_argument("task_id", type=opt.task_id, metavar="TASK_ID")
        s.add_argument("--tenant", type=opt.tenant, default="demo")
        s.add_argument("--reason", default=None, help="recorded on the task and quoted by every service that refuses")
        s.add_argument("--timeout", type=opt.positive, default=10.0, help="seconds to wait for the planner to apply it")
        s.add_argument("--nats-url", default=None)
        s.set_defaults(fn=cmd_control)

    s = sub.add_parser("signal", help="send a named signal to a workflow task (its signal node takes it)")
    s.add_argument("task_id", type=opt.task_id, metavar="TASK_ID")
    s.add_argument("name", type=opt.signal_name, metavar="NAME", help="the signal's name (what the node waits for)")
    s.add_argument("--payload", default=None, help="the signal's payload, a JSON value (the node's output)")
    s.add_argument("--payload-file", default=None, help="read the JSON payload from this file")
    s.add_argument(
        "--key",
        type=opt.signal_key,
        default=None,
        help="the signal's id: sent again with the same key, it is stored once (default: a new one)",
    )
    s.add_argument("--tenant", type=opt.tenant, default="demo")
    s.add_argument("--timeout", type=opt.positive, default=10.0, help="seconds to wait for the planner's answer")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_signal)

    s = sub.add_parser("ingest", help="add or replace documents (md, txt, html, pdf) in a tenant's retrieval index")
    s.add_argument("path", help="a file, or a directory (every supported file under it)")
    s.add_argument("--tenant", type=opt.tenant, default="demo")
    s.add_argument("--timeout", type=opt.positive, default=120.0, help="seconds to wait for each document")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_ingest)


def _approver_commands(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands as the approver: list waiting tool calls, approve or deny."""
    as_help = ("decide as this person (approver.<tenant>.<name>, see meshctl approvers), not the console's approver; "
               "a tenant that names approvers is decided by them alone")  # fmt: skip
    s = sub.add_parser("approvals", help="tool calls waiting for a human decision (as the approver)")
    s.add_argument("--all", action="store_true", help="decided, expired and void ones too")
    s.add_argument("--json", action="store_true")
    s.add_argument("--as", dest="as_", default=None, metavar="PRINCIPAL", help="only this person's tenant")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_approvals)

    for verb, text in (("approve", "let a waiting tool call run"), ("deny", "refuse a waiting tool call")):
        s = sub.add_parser(verb, help=f"{text} (as the approver; the decision is signed and recorded; after the "
                                      "call's task ended it is void: recorded, nothing performed, exit 2)")  # fmt: skip
        s.add_argument("approval_id", type=opt.identifier("approval id"), metavar="ID")
        s.add_argument("--comment", default=None, help="recorded with the decision")
        s.add_argument("--as", dest="as_", default=None, metavar="PRINCIPAL", help=as_help)
        s.add_argument("--nats-url", default=None)
        s.set_defaults(fn=cmd_decide)

    s = sub.add_parser("approvers", help="the people who approve a tenant's tool calls, each with their own key")
    s.add_argument("action", choices=("add", "list", "remove"))
    s.add_argument("name", nargs="?", default="", help="the person (add, remove), e.g. alice")
    s.add_argument("--tenant", default=None, help="the tenant they approve for (list: only this tenant's)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_approvers, role="approver")

    s = sub.add_parser("authors", help="the people who publish a tenant's workflows, each with their own key")
    s.add_argument("action", choices=("add", "list", "remove"))
    s.add_argument("name", nargs="?", default="", help="the person (add, remove), e.g. alice")
    s.add_argument("--tenant", default=None, help="the tenant whose workflows they author (list: only this tenant's)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_approvers, role="author")


def _operator_commands(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands as an operator: audit, credentials, dead letters, spend, kill switches."""
    s = sub.add_parser("audit", help="where a tenant's tool effects went (as the admin, opened with its auditor key)")
    asub = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    a = asub.add_parser("effects", help="every audited tool call that names a destination (recipient, URL)")
    a.add_argument("--tenant", type=opt.tenant, required=True)
    a.add_argument("--task", type=opt.tenant, default=None, help="one task only")
    a.add_argument("--to", default="", help="only effects that went to this value (needs the auditor key)")
    a.add_argument("--auditor-key", type=Path, default=None,
                   help="the tenant auditor's key (default: the mesh home's secrets/keys/auditor.<tenant>.key)")  # fmt: skip
    a.add_argument("--json", action="store_true")
    a.add_argument("--nats-url", default=None)
    a = asub.add_parser("chain", help="a tenant's tamper-evident audit chain, record by record")
    a.add_argument("--tenant", type=opt.tenant, required=True, help="a tenant, or _mesh (mesh-wide actions)")
    a.add_argument("--task", type=opt.task_id, default=None, help="one task's records only")
    a.add_argument("--json", action="store_true")
    a.add_argument("--nats-url", default=None)
    a = asub.add_parser("verify", help="prove a tenant's audit chain whole, or name its first break (exit 1)")
    a.add_argument("--tenant", type=opt.tenant, required=True, help="a tenant, or _mesh (mesh-wide actions)")
    a.add_argument("--anchor", default=None, metavar="N:SHA256",
                   help="also hold the chain to a head kept outside the mesh (what an earlier verify printed)")  # fmt: skip
    a.add_argument("--json", action="store_true")
    a.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_audit, usage=s.error)

    s = sub.add_parser("top", help="a live view: tenants, services, spend, approvals, dead letters (as the admin)")
    s.add_argument("--interval", type=opt.positive, default=2.0, help="seconds between refreshes")
    s.add_argument("--once", action="store_true", help="print one frame and exit (rates over one second)")
    s.add_argument("--json", action="store_true", help="one frame as JSON")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_top)

    s = sub.add_parser("history", help="every stored message about one task, in causal order, with its totals")
    s.add_argument("task_id", type=opt.task_id)
    s.add_argument("--tenant", type=opt.tenant, required=True)
    s.add_argument("--no-events", action="store_true", help="leave out the progress feed")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_history)

    s = sub.add_parser("replay", help="re-run a finished task into a new one (recorded model answers, tools dry-run), "
                       "and diff plan, tool calls, answer, verdict and cost")  # fmt: skip
    s.add_argument("task_id", type=opt.task_id)
    s.add_argument("--tenant", type=opt.tenant, required=True)
    s.add_argument("--from", dest="from_step", type=opt.step_id, default=None, metavar="STEP",
                   help="answer the plan and the steps before STEP from the recordings; STEP, later steps and "
                   "the judge call the model")  # fmt: skip
    s.add_argument("--live", action="store_true", help="call the model for every call (no recorded answers)")
    s.add_argument("--model", type=opt.route, default=None, metavar="ROUTE",
                   help="the model gateway route every live call takes (e.g. another model's route)")  # fmt: skip
    s.add_argument("--prompt-version", type=opt.prompt_version, action="append", metavar="ID@VERSION",
                   help="a prompt version the live calls use (repeatable; a service that serves another reads "
                   "ID/VERSION.md under its MESH_PROMPTS_DIR)")  # fmt: skip
    s.add_argument("--task-id", dest="new_task_id", type=opt.task_id, default=None,
                   help="the replay's task id (default: TASK-r<random>)")  # fmt: skip
    s.add_argument("--timeout", type=opt.positive, default=120.0, help="seconds to wait for the replay's outcome")
    s.add_argument("--fail-on-change", action="store_true",
                   help="exit 1 when the plan, a tool call, the answer or the verdict changed (a regression gate)")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_replay)

    s = sub.add_parser("trace", help="one task's trace as a span tree (from Jaeger, or from its messages)")
    s.add_argument("task_id", type=opt.task_id)
    s.add_argument("--tenant", type=opt.tenant, required=True)
    s.add_argument("--jaeger", type=opt.http_url, default=os.environ.get("MESH_JAEGER_URL") or None,
                   help="a Jaeger query service (e.g. http://jaeger:16686; default $MESH_JAEGER_URL): every "
                   "span with its duration; without it the tree comes from the trace context the messages carry")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_trace)

    s = sub.add_parser("dashboard", help="the live view and task timelines in a browser (operator sign-in; read-only "
                                         "unless --as an approver)")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=opt.port, default=8470, help="port (default 8470; 0 picks a free one)")
    s.add_argument("--interval", type=opt.positive, default=2.0, help="seconds between frames (default 2)")
    s.add_argument("--hours", type=opt.positive, default=8.0, help="how long the sign-in link is valid (default 8)")
    s.add_argument("--url-file", type=Path, default=None,
                   help="write the sign-in URL to this file (mode 0600) instead of printing it")  # fmt: skip
    s.add_argument("--as", dest="as_", default=None, metavar="PRINCIPAL",
                   help="review from the page as this person (approver.<tenant>.<name>): drafts and approval nodes "
                        "of their tenant get approve / reject, signed with their key; without it, read-only")  # fmt: skip
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_dashboard)

    s = sub.add_parser("rotate", help="new NATS credentials and signing keys for a principal, without downtime")
    s.add_argument("principal", nargs="?", default="", help="e.g. worker, client.acme, approver")
    s.add_argument("--all", action="store_true", help="every service")
    s.add_argument("--grace", type=opt.positive, default=30.0,
                   help="seconds old and new credentials both work before the old are revoked (default 30)")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_rotate)

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


def build_parser() -> argparse.ArgumentParser:
    p = opt.Parser(prog="meshctl", description="Run and operate an AgentMesh.")
    p.add_argument(
        "--home",
        default=os.environ.get("MESH_HOME", DEFAULT_HOME),
        help="mesh home with identities, data and logs (default: .mesh, env MESH_HOME)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=opt.Parser)

    _mesh_commands(sub)
    _task_commands(sub)
    _approver_commands(sub)
    _operator_commands(sub)
    workflow.register(sub)
    release.register(sub)
    review.register(sub)
    for command in entry_points(group="meshctl.commands"):  # e.g. `eval`, from the mesh-eval package
        command.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except MeshError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    except DoorRefused as exc:  # the door did not take a tenant's message (its quota, a bad message)
        print(f"meshctl: refused at the door: {exc}", file=sys.stderr)
        return 4
    except nats.js.errors.ServiceUnavailableError as exc:
        # A cluster electing leaders after a node died, or one that lost its quorum: try again.
        print(f"meshctl: JetStream did not answer (a cluster electing leaders?): {exc}", file=sys.stderr)
        return 1
    except (nats.errors.NoServersError, ConnectionRefusedError, OSError) as exc:
        print(f"meshctl: cannot reach NATS: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
