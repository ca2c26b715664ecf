"""``meshctl agent``: a tenant's agent profiles (issue 48): named agents defined as data.

    meshctl agent add sql-analyst --description "Answers questions about orders with SQL" \\
        --instructions-file analyst.md --tier hard --tool sql_query --tool search_docs \\
        --as author.acme.alice
    meshctl agent list --tenant acme
    meshctl agent show sql-analyst --tenant acme          # the profile, its versions and who changed it
    meshctl submit "Top five customers by refunds?" --tenant acme --agent sql-analyst
    meshctl agent remove sql-analyst --as author.acme.alice

``add`` (again: a new version) and ``remove`` are an author's right (``meshctl authors add``); each
is a signed change the planner applies and puts on the tenant's audit chain. A version is the
profile's digest: a task's steps keep the version they were planned with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mesh_contracts.v1.agents import AgentChange, AgentProfile
from meshctl import options as opt
from meshctl import release as rel
from meshctl import workflow as wf
from meshctl.local import MeshError


def _profile(args: argparse.Namespace) -> AgentProfile:
    """The profile from ``--file`` (YAML or JSON; flags given override it) or the flags."""
    raw: dict[str, Any] = {}
    if args.file is not None:
        loaded = wf.read(Path(args.file))
        if not isinstance(loaded, dict):
            raise MeshError(f"{args.file}: an agent profile is a mapping (description, instructions, tools ...)")
        raw.update(loaded)
    raw["name"] = args.name
    if args.instructions_file is not None:
        try:
            raw["instructions"] = Path(args.instructions_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise MeshError(f"--instructions-file {args.instructions_file}: {exc.strerror}") from None
    flags = {"description": args.description, "instructions": args.instructions, "tier": args.tier,
             "route": args.route, "max_iterations": args.max_iterations, "pool": args.pool}  # fmt: skip
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.tool:
        raw["tools"] = args.tool
    if args.documents:
        raw["documents"] = args.documents
    if args.exposed:
        raw["exposed"] = True
    if not raw.get("description"):
        raise MeshError("say what it is for: --description TEXT (the planner and its A2A card show it)")
    try:
        return AgentProfile.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'profile'}: {e['msg']}" for e in exc.errors()]
        raise MeshError("not a valid agent profile: " + "; ".join(problems)) from None


def _send(args: argparse.Namespace, **fields: Any) -> Any:
    """Sign and hand in a change as ``--as`` (an author); the answer, or None when refused (said)."""
    tenant, signer = rel._person(args, "author")
    change = AgentChange(tenant=tenant, task_id=f"agent-{uuid.uuid4().hex[:12]}", by=signer.principal,
                         reason=args.reason or "", **fields)  # fmt: skip

    answer = wf.hand_in(args, tenant, lambda client: client.change_agent(change, signer, timeout=args.timeout))
    if not getattr(answer, "accepted", False):
        print(f"meshctl: agent {fields.get('action')} refused: {answer.reason}", file=sys.stderr)
        return None
    return answer


def _read(
    args: argparse.Namespace, tenant: str, names: list[str] | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the tenant's agent catalogue, the current version's record of each of ``names`` (None: all))."""

    async def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with wf._client(args, tenant) as client:
            catalog = await client.registry("agents") or {}
            entries = catalog.get("agents", {})
            recs = []
            for name in sorted(entries) if names is None else names:
                entry = entries.get(name) or {}
                version = getattr(args, "version", None) or entry.get("version")
                if version:
                    rec = await client.registry(f"agent.{name}.{version}")
                    if rec is not None:
                        recs.append(rec)
            return catalog, recs

    return asyncio.run(run())


def cmd_add(args: argparse.Namespace) -> int:
    profile = _profile(args)
    answer = _send(args, action="put", name=args.name, profile=profile)
    if answer is None:
        return 1
    if not args.json:
        print(f"{args.name}@{answer.version}: {'put' if answer.changed else 'unchanged (the current version)'}; "
              f"submit to it with: meshctl submit GOAL --tenant {answer.tenant} --agent {args.name}")  # fmt: skip
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    answer = _send(args, action="remove", name=args.name)
    if answer is None:
        return 1
    if not args.json:
        print(f"{args.name}: {'removed' if answer.changed else 'already removed'}; no new plan may use it")
    return 0


def _line(rec: dict[str, Any]) -> str:
    p = rec["profile"]
    model = p.get("route") or p.get("tier") or "default"
    where = f"  pool {p['pool']}" if p.get("pool") else ""
    exposed = "  A2A" if p.get("exposed") else ""
    tools = ", ".join(p.get("tools", [])) or "none"
    docs = "  documents " + ", ".join(f"{d}*" for d in p["documents"]) if p.get("documents") else ""
    head = f"{rec['agent']}@{rec['version']}  model {model}  tools {tools}{docs}{where}{exposed}"
    return f"{head}\n    {p['description'][:160]}"


def cmd_list(args: argparse.Namespace) -> int:
    _, recs = _read(args, args.tenant, None)
    if args.json:
        print(json.dumps(recs, indent=2))
        return 0
    if not recs:
        print(f"tenant {args.tenant} has no agent profiles "
              f"(meshctl agent add NAME --description TEXT --as author.{args.tenant}.<person>)")  # fmt: skip
        return 0
    print("\n".join(_line(r) for r in recs))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    catalog, recs = _read(args, args.tenant, [args.name])
    entry = catalog.get("agents", {}).get(args.name)
    if entry is None or not recs:
        raise MeshError(f"tenant {args.tenant} has no agent profile {args.name!r}"
                        + (f" version {args.version}" if args.version else ""))  # fmt: skip
    if args.json:
        print(json.dumps({"record": recs[0], "history": entry.get("history", [])}, indent=2))
        return 0
    rec = recs[0]
    print(_line(rec) + ("" if entry.get("version") else "\n    (removed: no new plan may use it)"))
    p = rec["profile"]
    print(f"    max iterations {p['max_iterations']}  put by {rec.get('put_by', '?')}")
    if p.get("instructions"):
        print("  instructions:\n" + "\n".join("    " + line for line in p["instructions"].splitlines()))
    print("  history:")
    for e in entry.get("history", []):
        print(f"    {e['action']:<7} {e.get('version', '') or '-':<16}  by {e['by']}" + (f": {e['reason']}" if e.get("reason") else ""))  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("agent", help="a tenant's agent profiles: add (or change), list, show, remove")
    r = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)

    def common(p: argparse.ArgumentParser, author: bool) -> None:
        p.add_argument("name", metavar="NAME", type=opt.agent_name)
        if author:
            p.add_argument("--as", dest="as_", default=None, metavar="AUTHOR", help="author.<tenant>.<person>")
            p.add_argument("--tenant", type=opt.tenant, default=None, help="(the author's tenant)")
            p.add_argument("--reason", default=None, help="why: on the tenant's audit chain")
            p.add_argument("--timeout", type=opt.positive, default=30.0, help="seconds to wait for the planner")
        else:
            p.add_argument("--tenant", type=opt.tenant, required=True)
        p.add_argument("--json", action="store_true")
        p.add_argument("--nats-url", default=None)

    a = r.add_parser("add", help="define a profile, or change one (a new version), as an author")
    common(a, True)
    a.add_argument("--file", default=None, help="the profile as YAML or JSON (flags given override it)")
    a.add_argument("--description", default=None, help="what it is for (the planner and its A2A card show it)")
    a.add_argument("--instructions", default=None, help="added to the worker's system prompt for its steps")
    a.add_argument("--instructions-file", default=None, metavar="FILE", help="the instructions from a file")
    a.add_argument("--tier", choices=("easy", "normal", "hard"), default=None, help="the model tier of its steps")
    a.add_argument("--route", default=None, help="a named route of the model gateway (instead of a tier)")
    a.add_argument("--tool", action="append", metavar="TOOL", help="a tool it may call (repeat; none: no tools)")
    a.add_argument("--documents", action="append", metavar="PREFIX",
                   help="its retrieval scope: documents whose id starts with PREFIX (repeat; none: all)")  # fmt: skip
    a.add_argument("--max-iterations", type=int, default=None, help="model calls per step (1-50, default 6)")
    a.add_argument("--exposed", action="store_true", help="published as an A2A agent card by the a2a gateway")
    a.add_argument("--pool", default=None, help="the worker pool that runs its steps (MESH_WORKER_POOL)")
    a.set_defaults(fn=cmd_add)

    d = r.add_parser("remove", help="remove a profile: no new plan may use it (as an author)")
    common(d, True)
    d.set_defaults(fn=cmd_remove)

    ls = r.add_parser("list", help="the tenant's profiles: version, model, tools, pool")
    ls.add_argument("--tenant", type=opt.tenant, required=True)
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--nats-url", default=None)
    ls.set_defaults(fn=cmd_list)

    sh = r.add_parser("show", help="one profile: its instructions and every change")
    common(sh, False)
    sh.add_argument("--version", default=None, help="a version other than the current one")
    sh.set_defaults(fn=cmd_show)
