"""Commands as an operator that look at the mesh: where a tenant's tool effects went and its audit
chain (``audit``), the live view (``top``, ``dashboard``), and one task's stored messages
(``history``), re-run (``replay``) and trace (``trace``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from mesh_contracts import topology as topo
from mesh_contracts.v1 import TaskRejected
from mesh_identity import Signer, TrustBundle, Verifier
from mesh_kit.settings import log_nats_error, nats_servers
from meshctl import options as opt
from meshctl.commands.common import absent, admin, approver, budget_asker, nats_url, tenant_client
from meshctl.identity import Identities, write_secret
from meshctl.local import MeshError, MeshState
from meshctl.registry import attach_tenant


def cmd_audit(args: argparse.Namespace) -> int:
    from meshctl import audit

    if args.action == "verify" and args.archive:
        return _audit_archive(args)
    if args.action in ("verify", "chain"):
        if not args.tenant:
            args.usage(f"audit {args.action} needs --tenant (or, for verify, --archive)")
        return _audit_chain(args)
    box = audit.opener(args.auditor_key or Identities(opt.home(args)).auditor_key(args.tenant))
    if args.to and box is None:
        raise MeshError(f"--to needs the auditor key of {args.tenant} (values are sealed to it)")

    async def run() -> int:
        nc = await admin(args)
        try:
            rows = audit.effects(await audit.audited(nc, args.tenant, args.task or ""), box, args.to)
        finally:
            await nc.close()
        print(json.dumps(rows, indent=2) if args.json else audit.render(rows))
        return 0

    return asyncio.run(run())


def _audit_archive(args: argparse.Namespace) -> int:
    """``audit verify --archive``: a tenant export's files against its manifest, then its chain."""
    from meshctl import audit, export

    if args.tenant or args.anchor:
        args.usage("--archive takes neither --tenant (the archive names it) nor --anchor")
    try:
        bundle = args.trust_bundle.read_text() if args.trust_bundle else None
        manifest, verdict = export.verify_archive(args.archive, bundle)
    except (export.ArchiveError, OSError) as exc:
        raise MeshError(str(exc)) from None
    if args.json:
        print(json.dumps({"archive": str(args.archive), "tenant": verdict.tenant, "files": len(manifest["sha256"]),
                          "whole": verdict.ok, "broken_at": verdict.broken_at, "reason": verdict.reason,
                          "records": verdict.records, "anchors": verdict.anchors}, indent=2))  # fmt: skip
    else:
        print(
            f"archive {args.archive}: {len(manifest['sha256'])} files match its manifest (tenant "
            f"{manifest['tenant']}, exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(manifest['exported_at']))})"
        )
        print(audit.render_verdict(verdict, None))
    return 0 if verdict.ok else 1


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
        nc = await admin(args)
        try:
            records = await audit.chain(nc, args.tenant)
            if args.action == "chain":
                if args.json:
                    box = audit.chain_opener(args.auditor_key or Identities(opt.home(args)).auditor_key(args.tenant))
                    print(
                        json.dumps(
                            [
                                audit.opened({"seq": r.seq, "time": r.time, **json.loads(r.data)}, box)
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
            statement = await audit.restored_statement(nc)
        finally:
            await nc.close()
        verifier = Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle))
        created, restored = audit.created_vouched(created, statement, verifier)
        verdict = verify(args.tenant, records, verifier, anchors, stream_first_seq=first_seq, pinned=expect,
                         stream_created=created)  # fmt: skip
        if restored:
            verdict.notes.append(restored)
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


def cmd_top(args: argparse.Namespace) -> int:
    from meshctl import top

    home = opt.home(args)
    state = MeshState.load(home)  # a mesh of ``meshctl up``: its services' /status too
    health = (
        {n: f"http://127.0.0.1:{p.http_port}/status" for n, p in state.services.items() if p.http_port}
        if (state)
        else {}
    )

    def restarts() -> dict[str, tuple[int, str]]:  # the supervisor's count, as of this frame
        now = MeshState.load(home)
        return {n: (p.restarts, p.state) for n, p in now.services.items()} if now else {}

    watch = restarts if state and state.supervisor else None
    try:
        once = args.once or args.json
        frame = asyncio.run(
            top.run(lambda: admin(args), args.interval, once, health, sys.stdout, budget_asker(args), watch)
        )
    except KeyboardInterrupt:
        return 0
    if args.json:
        print(json.dumps(frame.as_json(), indent=2))
    else:
        print(top.render(frame))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from meshctl import history

    verifier = Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle))

    async def run() -> int:
        nc = await admin(args)
        try:
            await attach_tenant(nc, verifier, args.tenant)  # a tenant added at runtime: its client's key
            stored = await history.collect(nc, args.tenant, args.task_id, events=not args.no_events)
        finally:
            await nc.close()
        h = history.build(args.tenant, args.task_id, stored, verifier)
        if args.json:
            print(json.dumps(history.as_json(h), indent=2, default=str))
        else:
            print(history.render(h))
        return 0 if h.entries else absent(f"no stored message about {args.tenant}/{args.task_id}")

    return asyncio.run(run())


def cmd_replay(args: argparse.Namespace) -> int:
    from mesh_guardrails.redact import redact_value
    from meshctl import replay as rp

    verifier = Verifier(TrustBundle.from_file(Identities(opt.home(args)).trust_bundle))
    client = tenant_client(args)

    async def stories(*task_ids: str) -> list[rp.Story]:
        nc = await admin(args)
        try:
            await attach_tenant(nc, verifier, args.tenant)
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
        nc = await admin(args)
        try:
            await attach_tenant(nc, verifier, args.tenant)
            stored = await history.collect(nc, args.tenant, args.task_id)
        finally:
            await nc.close()
        h = history.build(args.tenant, args.task_id, stored, verifier)
        t = tr.from_history(h, {(stream, s.seq): s.headers for stream, s in stored})
        if not t.hops:
            return absent(f"no traced message about {args.tenant}/{args.task_id}")
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
        return await nats.connect(nats_servers(nats_url(args, home)), name="meshctl-dashboard", connect_timeout=5,
                                  error_cb=log_nats_error, **ids.connect_options("admin"))  # fmt: skip

    async def run() -> int:
        reviewer = approver(args) if args.as_ else None  # decides as that person: their key, on this machine
        async with reviewer if reviewer is not None else contextlib.nullcontext():
            return await serve(reviewer)

    async def serve(reviewer: Any) -> int:
        board = Dashboard(connect, Verifier(TrustBundle.from_file(ids.trust_bundle)), health=health,
                          budget=budget_asker(args), interval_s=args.interval, host=args.host,
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


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands as an operator that look: the audit, the live view, a task's history, replay and
    trace, the dashboard."""
    _audit_parser(sub)

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


def _audit_parser(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """``audit effects|chain|verify``: one parser, an action each."""
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
    a.add_argument("--json", action="store_true",
                   help="every link whole, its sealed fields opened with the tenant's auditor key when at hand")  # fmt: skip
    a.add_argument("--auditor-key", type=Path, default=None,
                   help="the tenant auditor's key (default: the mesh home's secrets/keys/auditor.<tenant>.key)")  # fmt: skip
    a.add_argument("--nats-url", default=None)
    a = asub.add_parser("verify", help="prove a tenant's audit chain whole, or name its first break (exit 1)")
    a.add_argument("--tenant", type=opt.tenant, default=None, help="a tenant, or _mesh (mesh-wide actions)")
    a.add_argument("--archive", type=Path, default=None,
                   help="check a tenant export (meshctl tenant export) offline instead: its files and its chain")  # fmt: skip
    a.add_argument("--trust-bundle", type=Path, default=None,
                   help="with --archive: the public keys to check it against (default: the archive's own)")  # fmt: skip
    a.add_argument("--anchor", default=None, metavar="N:SHA256",
                   help="also hold the chain to a head kept outside the mesh (what an earlier verify printed)")  # fmt: skip
    a.add_argument("--json", action="store_true")
    a.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_audit, usage=s.error)
