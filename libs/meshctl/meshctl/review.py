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
from typing import Any, cast

import nats
from nats.aio.client import Client as NATS

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


async def waiting(nc: NATS, tenant: str, task_id: str) -> tuple[PlanDrafted | None, str]:
    """The task's last draft and what became of the task since: '' (waits), ``approved``,
    ``failed`` (rejected, or ended otherwise)."""
    js = nc.jetstream(timeout=5.0)
    stored = await _last(js, STREAM, PlanDrafted.spec.subject(tenant, task_id))
    if stored is None:
        return None, ""
    drafted = cast(PlanDrafted, PlanDrafted.parse(stored.data))
    planned = await _last(js, STREAM, PlanCreated.spec.subject(tenant, task_id))
    if planned is not None:
        return drafted, "approved"
    for event in ("failed", "completed"):
        if await _last(js, STREAM, f"task.v1.{tenant}.{task_id}.{event}") is not None:
            return drafted, "ended"
    return drafted, ""


async def approvals(nc: NATS, tenant: str, task_id: str) -> list[WaitState]:
    """The task's approval nodes waiting for a decision (from its record), oldest first."""
    try:
        entry = await nc.jetstream(timeout=5.0).key_value(TaskRecord.bucket)
        got = await entry.get(TaskRecord.key(tenant, task_id))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
        return []
    if got.value is None:
        return []
    rec = TaskRecord.from_bytes(got.value, TaskRecord.key(tenant, task_id))
    return sorted((w for w in rec.waits.values() if w.kind == "approval"), key=lambda w: w.started_at)


async def pending(nc: NATS, tenant: str, task_id: str) -> tuple[WaitState | None, PlanDrafted | None, str]:
    """What of the task waits for a reviewer: its oldest approval node (first), else its last draft
    and what became of the task since (``waiting``); ``MeshError`` when it has neither."""
    gates = await approvals(nc, tenant, task_id)
    if gates:
        return gates[0], None, ""
    draft, state = await waiting(nc, tenant, task_id)
    if draft is None:
        raise MeshError(f"task {tenant}/{task_id} has no draft plan (is its tenant under review?) and no approval "
                        "node waiting")  # fmt: skip
    return None, draft, state


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


def plan_steps(raw: Any, what: str = "the plan") -> tuple[PlanStep, ...]:
    """An edited plan: ``{"steps": [...]}`` or a list of steps; ``MeshError`` saying why not."""
    from pydantic import ValidationError

    try:
        steps = raw["steps"] if isinstance(raw, dict) else raw
        if not isinstance(steps, list) or not steps:
            raise TypeError("expected a list of steps")
        return tuple(PlanStep.model_validate(s) for s in steps)
    except (KeyError, TypeError, ValidationError) as exc:
        raise MeshError(f"{what}: not a plan ({str(exc).splitlines()[0][:200]})") from None


def _plan(value: str) -> tuple[PlanStep, ...]:
    """``--plan``: the edited plan as JSON (inline or @FILE): ``{"steps": [...]}`` or a list of steps."""
    from pathlib import Path

    try:
        raw = json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)
    except (OSError, json.JSONDecodeError) as exc:
        raise MeshError(f"--plan: not a plan ({str(exc).splitlines()[0][:200]})") from None
    return plan_steps(raw, "--plan")


async def listing(nc: NATS, tenant: str, *, every: bool = False) -> tuple[list[tuple[PlanDrafted, str]], list[tuple[str, WaitState]]]:  # fmt: skip
    """What of ``tenant`` waits for a reviewer: drafts (with what became of them, ``every``: the
    decided ones too) and approval nodes (task id, wait)."""
    js = nc.jetstream(timeout=5.0)
    drafts = []
    info = await js.stream_info(STREAM, subjects_filter=f"task.*.{tenant}.*.drafted")
    for subject in sorted(info.state.subjects or {}):
        d, state = await waiting(nc, tenant, subject.split(".")[3])
        if d is not None and (not state or every):
            drafts.append((d, state))
    gates = []
    info = await js.stream_info(STREAM, subjects_filter=f"task.*.{tenant}.*.waiting")
    for subject in sorted(info.state.subjects or {}):
        task = subject.split(".")[3]
        gates += [(task, w) for w in await approvals(nc, tenant, task)]
    return drafts, gates


async def decide(
    nc: NATS, ap: Any, tenant: str, task_id: str, action: str, *, steps: tuple[PlanStep, ...] = (),
    comment: str = "", timeout: float = 15.0,
) -> tuple[int, str]:  # fmt: skip
    """Decide what the task waits for, its approval node first, else its draft plan, as the
    person ``ap`` (a ``meshctl.approver.Approver``) signs for, and wait for the effect. Returns (0:
    applied, 1: the planner refused it, 3: no effect within ``timeout``; what happened). Raises
    ``MeshError`` for a decision that cannot be sent (nothing waits, an edit of an approval...).
    What ``meshctl review`` and the dashboard both do."""
    from meshctl.approver import ApprovalError

    gate, draft, state = await pending(nc, tenant, task_id)
    if gate is not None:
        if action == "edit":
            raise MeshError(f"task {tenant}/{task_id} waits at approval node {gate.step_id}: approve or reject it")
        target = gate.decision
    else:
        assert draft is not None
        if state:
            raise MeshError(f"task {tenant}/{task_id}: its plan is no longer waiting ({state})")
        if action == "edit" and not steps:
            raise MeshError("review edit needs the plan as edited: --plan JSON|@FILE")
        target = draft.draft
    js = nc.jetstream(timeout=5.0)
    dlq = topo.dlq_subject("planner", f"approval.v1.{tenant}.{task_id}.reviewed")  # where it refuses one
    # The last refusal before this decision is sent: a planner quicker than this process refuses
    # it before the answer is looked for, and it must not be taken for an old one.
    old = await _last(js, topo.DLQ_STREAM, dlq)
    try:
        await ap.review(tenant, task_id, target, action, steps=steps, comment=comment)
    except ApprovalError as exc:
        raise MeshError(str(exc)) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gate is not None:
            if not any(g.decision == target for g in await approvals(nc, tenant, task_id)):
                return 0, f"{'approved' if action == 'approve' else 'rejected'}: approval node {gate.step_id} of {tenant}/{task_id}"  # fmt: skip
        else:
            assert draft is not None
            d, state = await waiting(nc, tenant, task_id)
            if state == "approved":
                planned = await _last(js, STREAM, PlanCreated.spec.subject(tenant, task_id))
                return (
                    0,
                    f"approved: the plan runs as draft {cast(PlanCreated, PlanCreated.parse(planned.data)).reviewed}",
                )
            if state == "ended":
                failed = await _last(js, STREAM, TaskFailed.spec.subject(tenant, task_id))
                return 0, (f"the task ended: {cast(TaskFailed, TaskFailed.parse(failed.data)).reason}" if failed
                           else "the task ended")  # fmt: skip
            if d is not None and d.draft != draft.draft:
                return 0, render(d, "")
        dead = await _last(js, topo.DLQ_STREAM, dlq)
        if dead is not None and (old is None or dead.seq != old.seq):
            reason = (dead.headers or {}).get(env.DLQ_REASON) or dead.data.decode(errors="replace")[:300]
            return 1, f"the planner refused the {'decision' if gate is not None else 'review'}: {reason}"
        await asyncio.sleep(0.2)
    return 3, f"no effect of the decision within {timeout:g} s (is the planner running?)"


def cmd_review(args: argparse.Namespace) -> int:
    from meshctl.commands.common import admin, approver

    async def run() -> int:
        nc = await admin(args)
        try:
            if args.action == "list":
                out, gates = await listing(nc, args.tenant, every=args.all)
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
            if args.action == "show":
                gate, d, state = await pending(nc, args.tenant, args.task_id)
                if gate is not None:
                    print(json.dumps({"task_id": args.task_id, "approval": gate.model_dump(mode="json")}, indent=2)
                          if args.json else render_approval(args.tenant, args.task_id, gate))  # fmt: skip
                    return 0
                assert d is not None
                print(json.dumps({**d.model_dump(mode="json"), "state": state or "waiting"}, indent=2)
                      if args.json else render(d, state))  # fmt: skip
                return 0
            from meshctl.approver import ApprovalError

            steps = _plan(args.plan) if args.action == "edit" and args.plan else ()
            try:
                async with approver(args) as ap:
                    code, said = await decide(nc, ap, args.tenant, args.task_id, args.action, steps=steps,
                                              comment=args.comment or "", timeout=args.timeout)  # fmt: skip
            except ApprovalError as exc:
                raise MeshError(str(exc)) from None
            print(said if code == 0 else f"meshctl: {said}", file=sys.stdout if code == 0 else sys.stderr)
            return code
        finally:
            await nc.close()

    return asyncio.run(run())


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
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
