"""``meshctl review``: plans that wait for a person (a tenant under ``MESH_PLAN_REVIEW``, a
workflow in mode ``review``) and a workflow's approval nodes.

    meshctl review list --tenant acme                          # drafts waiting, oldest first
    meshctl review show TASK --tenant acme                     # the waiting draft, its hash and edits
    meshctl review approve TASK --tenant acme --as approver.acme.alice
    meshctl review edit TASK --tenant acme --plan @plan.json --as approver.acme.alice
    meshctl review reject TASK --tenant acme --as approver.acme.alice --comment "no email step"

A decision names the draft it decides (its hash, read here just before): if the draft changed
meanwhile (another reviewer edited it), the planner refuses it. The decision is signed with the
reviewer's key and carried by the approval console's connection, as ``meshctl approve`` is; the
planner judges the reviewer as the tool-executor judges an approver (the tenant's named approvers
alone, when it names any). Reads are the operator's (admin): the drafts are task messages.

A task running a workflow may instead wait at an approval node: ``show`` prints what it asks,
``approve`` and ``reject`` decide it (the decision names the approval's id; an approval is not
edited). Its waits are read from the task's record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import nats

from mesh_contracts import topology as topo
from mesh_contracts.v1 import PlanCreated, PlanDrafted, PlanStep, TaskFailed
from mesh_contracts.v1.records import TaskRecord, WaitState
from mesh_kit import envelope as env
from meshctl import options as opt
from meshctl.local import MeshError

STREAM = topo.STREAMS["task"]


async def _last(js: Any, stream: str, subject: str) -> Any:
    try:
        # the DLQ allows no direct gets (nobody but operators reads it): the API's get, as the admin
        return await js.get_last_msg(stream, subject, direct=stream != topo.DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return None


async def waiting(nc: nats.NATS, tenant: str, task_id: str) -> tuple[PlanDrafted | None, str]:
    """The task's last draft and what became of the task since: '' (waits), ``approved``,
    ``failed`` (rejected, or ended otherwise)."""
    js = nc.jetstream(timeout=5.0)
    stored = await _last(js, STREAM, PlanDrafted.spec.subject(tenant, task_id))
    if stored is None:
        return None, ""
    drafted = PlanDrafted.model_validate_json(stored.data)
    planned = await _last(js, STREAM, PlanCreated.spec.subject(tenant, task_id))
    if planned is not None:
        return drafted, "approved"
    for event in ("failed", "completed"):
        if await _last(js, STREAM, f"task.v1.{tenant}.{task_id}.{event}") is not None:
            return drafted, "ended"
    return drafted, ""


async def approvals(nc: nats.NATS, tenant: str, task_id: str) -> list[WaitState]:
    """The task's approval nodes waiting for a decision (from its record), oldest first."""
    try:
        entry = await nc.jetstream(timeout=5.0).key_value(TaskRecord.bucket)
        got = await entry.get(TaskRecord.key(tenant, task_id))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
        return []
    if got.value is None:
        return []
    rec = TaskRecord.model_validate_json(got.value)
    return sorted((w for w in rec.waits.values() if w.kind == "approval"), key=lambda w: w.started_at)


def render_approval(tenant: str, task_id: str, w: WaitState) -> str:
    until = f", until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(w.due_at))} UTC" if w.due_at else ""
    return (f"task {tenant}/{task_id}: approval node {w.step_id} ({w.decision}){until}: waits for an approver\n"
            f"  {w.request}")  # fmt: skip


def render(d: PlanDrafted, state: str) -> str:
    lines = [f"task {d.tenant}/{d.task_id}: draft {d.draft}, revision {d.revision}"
             + (f", edited by {d.edited_by}" if d.edited_by else ", as the model planned it")
             + (f" ({state})" if state else ": waits for a reviewer")]  # fmt: skip
    for s in d.steps:
        after = f" after {', '.join(s.depends_on)}" if s.depends_on else ""
        tools = f" [tools: {', '.join(s.tools)}]" if s.tools else ""
        lines.append(f"  {s.step_id:8} {s.kind:8} {s.instruction[:100]}{tools}{after}")
    if d.changes:
        lines.append("  changes from the draft before:")
        lines += [f"    {c}" for c in d.changes]
    return "\n".join(lines)


def _plan(value: str) -> tuple[PlanStep, ...]:
    """``--plan``: the edited plan as JSON (inline or @FILE): ``{"steps": [...]}`` or a list of steps."""
    from pathlib import Path

    from pydantic import ValidationError

    try:
        raw = json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)
        steps = raw["steps"] if isinstance(raw, dict) else raw
        return tuple(PlanStep.model_validate(s) for s in steps)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise MeshError(f"--plan: not a plan ({str(exc).splitlines()[0][:200]})") from None


def cmd_review(args: argparse.Namespace) -> int:
    from meshctl.cli import _admin, _approver

    async def run() -> int:
        nc = await _admin(args)
        try:
            if args.action == "list":
                info = await nc.jetstream(timeout=5.0).stream_info(
                    STREAM, subjects_filter=f"task.*.{args.tenant}.*.drafted"
                )
                out = []
                for subject in sorted(info.state.subjects or {}):
                    d, state = await waiting(nc, args.tenant, subject.split(".")[3])
                    if d is not None and (not state or args.all):
                        out.append((d, state))
                gates = []
                info = await nc.jetstream(timeout=5.0).stream_info(
                    STREAM, subjects_filter=f"task.*.{args.tenant}.*.waiting"
                )
                for subject in sorted(info.state.subjects or {}):
                    task = subject.split(".")[3]
                    gates += [(task, w) for w in await approvals(nc, args.tenant, task)]
                if args.json:
                    print(json.dumps([{**d.model_dump(mode="json"), "state": s or "waiting"} for d, s in out]
                                     + [{"task_id": t, "approval": w.model_dump(mode="json")} for t, w in gates],
                                     indent=2))  # fmt: skip
                elif not out and not gates:
                    print(f"nothing of {args.tenant} waits for review")
                else:
                    print("\n".join([render(d, s) for d, s in out]
                                    + [render_approval(args.tenant, t, w) for t, w in gates]))  # fmt: skip
                return 0
            if not args.task_id:
                raise MeshError(f"review {args.action} names a task: meshctl review {args.action} TASK --tenant T")
            gates = await approvals(nc, args.tenant, args.task_id)
            if gates:
                return await _decide_gate(nc, args, gates[0])
            d, state = await waiting(nc, args.tenant, args.task_id)
            if d is None:
                raise MeshError(f"task {args.tenant}/{args.task_id} has no draft plan (is its tenant under review?)"
                                " and no approval node waiting")  # fmt: skip
            if args.action == "show":
                print(json.dumps({**d.model_dump(mode="json"), "state": state or "waiting"}, indent=2)
                      if args.json else render(d, state))  # fmt: skip
                return 0
            if state:
                raise MeshError(f"task {args.tenant}/{args.task_id}: its plan is no longer waiting ({state})")
            if args.action == "edit" and not args.plan:
                raise MeshError("review edit needs the plan as edited: --plan JSON|@FILE")
            steps = _plan(args.plan) if args.action == "edit" else ()
            decision = {"approve": "approve", "reject": "reject", "edit": "edit"}[args.action]
            from meshctl.approver import ApprovalError

            # The last refusal before this decision is sent: a planner quicker than this process
            # refuses it before the answer is looked for, and it must not be taken for an old one.
            refused_before = await _last(nc.jetstream(timeout=5.0), topo.DLQ_STREAM, _refusals(args))
            try:
                async with _approver(args) as ap:
                    await ap.review(
                        args.tenant, args.task_id, d.draft, decision, steps=steps, comment=args.comment or ""
                    )
            except ApprovalError as exc:
                raise MeshError(str(exc)) from None
            return await _effect(nc, args, d, refused_before)
        finally:
            await nc.close()

    return asyncio.run(run())


async def _decide_gate(nc: nats.NATS, args: argparse.Namespace, w: WaitState) -> int:
    """``show``, ``approve`` or ``reject`` a workflow's approval node; wait until it is decided."""
    from meshctl.approver import ApprovalError
    from meshctl.cli import _approver

    if args.action == "show":
        print(json.dumps({"task_id": args.task_id, "approval": w.model_dump(mode="json")}, indent=2)
              if args.json else render_approval(args.tenant, args.task_id, w))  # fmt: skip
        return 0
    if args.action == "edit":
        raise MeshError(f"task {args.tenant}/{args.task_id} waits at approval node {w.step_id}: approve or reject it")
    js = nc.jetstream(timeout=5.0)
    dlq = _refusals(args)
    old = await _last(js, topo.DLQ_STREAM, dlq)  # before it is sent (see ``cmd_review``)
    try:
        async with _approver(args) as ap:
            await ap.review(args.tenant, args.task_id, w.decision, args.action, comment=args.comment or "")
    except ApprovalError as exc:
        raise MeshError(str(exc)) from None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not any(g.decision == w.decision for g in await approvals(nc, args.tenant, args.task_id)):
            verb = "approved" if args.action == "approve" else "rejected"
            print(f"{verb}: approval node {w.step_id} of {args.tenant}/{args.task_id}")
            return 0
        dead = await _last(js, topo.DLQ_STREAM, dlq)
        if dead is not None and (old is None or dead.seq != old.seq):
            reason = (dead.headers or {}).get(env.DLQ_REASON) or dead.data.decode(errors="replace")[:300]
            print(f"meshctl: the planner refused the decision: {reason}", file=sys.stderr)
            return 1
        await asyncio.sleep(0.2)
    print(f"meshctl: no effect of the decision within {args.timeout:g} s (is the planner running?)", file=sys.stderr)
    return 3


def _refusals(args: argparse.Namespace) -> str:
    """Where the planner dead-letters a decision on the task it refuses."""
    return topo.dlq_subject("planner", f"approval.v1.{args.tenant}.{args.task_id}.reviewed")


async def _effect(nc: nats.NATS, args: argparse.Namespace, before: PlanDrafted, old: Any) -> int:
    """Wait for what the decision did: the plan runs, the task failed, a new draft; or the
    planner's refusal (its dead letter: one other than ``old``, the last before it was sent)."""
    js = nc.jetstream(timeout=5.0)
    dlq = _refusals(args)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        d, state = await waiting(nc, args.tenant, args.task_id)
        if state == "approved":
            planned = await _last(js, STREAM, PlanCreated.spec.subject(args.tenant, args.task_id))
            print(f"approved: the plan runs as draft {PlanCreated.model_validate_json(planned.data).reviewed}")
            return 0
        if state == "ended":
            failed = await _last(js, STREAM, TaskFailed.spec.subject(args.tenant, args.task_id))
            print(
                f"the task ended: {TaskFailed.model_validate_json(failed.data).reason}" if failed else "the task ended"
            )
            return 0
        if d is not None and d.draft != before.draft:
            print(render(d, ""))
            return 0
        dead = await _last(js, topo.DLQ_STREAM, dlq)
        if dead is not None and (old is None or dead.seq != old.seq):
            reason = (dead.headers or {}).get(env.DLQ_REASON) or dead.data.decode(errors="replace")[:300]
            print(f"meshctl: the planner refused the review: {reason}", file=sys.stderr)
            return 1
        await asyncio.sleep(0.2)
    print(f"meshctl: no effect of the review within {args.timeout:g} s (is the planner running?)", file=sys.stderr)
    return 3


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("review", help="plans waiting for a person: list, show, approve, edit, reject")
    s.add_argument("action", choices=("list", "show", "approve", "edit", "reject"))
    s.add_argument("task_id", nargs="?", default=None, type=opt.task_id, metavar="TASK")
    s.add_argument("--tenant", type=opt.tenant, required=True)
    s.add_argument("--as", dest="as_", default=None, metavar="PRINCIPAL",
                   help="review as this person (approver.<tenant>.<name>, see meshctl approvers)")  # fmt: skip
    s.add_argument("--plan", default=None, help='edit: the plan as you want it, JSON or @FILE ({"steps": [...]})')
    s.add_argument("--comment", default=None, help="why (a rejection's reason for the task): on the audit chain")
    s.add_argument("--all", action="store_true", help="list: drafts already decided too")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=opt.positive, default=15.0, help="seconds to wait for the decision's effect")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_review)
