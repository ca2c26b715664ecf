"""Commands as the approver: the tool calls waiting for a human (``approvals``), a decision on one
(``approve``, ``deny``), and the people a tenant trusts with a key of their own (``approvers``,
``authors``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from mesh_kit.settings import nats_servers
from meshctl import options as opt
from meshctl.commands.common import age, approver, nats_url
from meshctl.identity import Identities
from meshctl.local import MeshError


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
            name, revision = await act(ids, args.tenant, args.name, nats_servers(nats_url(args, ids.home)), role)
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
        async with approver(args) as ap:
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
            left = f"expires in {age(r['deadline'] - now)}" if r["status"] == "pending" else r["status"]
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
        async with approver(args) as ap:
            try:
                rec = await ap.decide(args.approval_id, args.command == "approve", args.comment or "")
            except ApprovalError as exc:
                raise MeshError(str(exc)) from None
        print(f"{rec['approval_id']}: {rec['status']} by {rec['decided_by']} ({rec['tool']} for "
              f"{rec['tenant']}/{rec['task_id']})")  # fmt: skip
        return 0

    return asyncio.run(run())


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
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
