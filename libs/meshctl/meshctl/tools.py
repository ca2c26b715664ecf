"""``meshctl tools``: a tenant's own tool servers (issue 44), remote MCP servers over streamable HTTP,
and external A2A agents (issue 48), whose skills become the tenant's tools the same way.

    meshctl tools add orders --endpoint https://orders-1/mcp --endpoint https://orders-2/mcp \\
        --bearer orders-token --rule refund_order=write --as author.acme.alice
    meshctl tools add travel --a2a https://travel.example.com/.well-known/agent-card.json \\
        --bearer travel-token --rule book_trip=approve --as author.acme.alice
    meshctl tools list --tenant acme                  # what each server lists, approved or not, its replicas
    meshctl tools approve orders --all --as approver.acme.bob

``add`` and ``remove`` are an author's right, ``approve`` an approver's; each is a signed change the
tool-executor applies and puts on the tenant's audit chain. A record names secrets (files the
operator mounts in the tool-executor at ``MESH_TOOL_SECRETS_DIR/<tenant>/<name>``), never holds one.
``approve`` pins the definitions exactly as ``list`` showed them (their hashes): if the server lists
something else meanwhile, the approval is refused. An A2A agent's tools pin its whole card: any
change to the card suspends them all until they are approved again.
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

from mesh_contracts.v1.tool_servers import ToolsChange, ToolServerSpec
from meshctl import options as opt
from meshctl import release as rel
from meshctl import workflow as wf
from meshctl.local import MeshError

THRESHOLD = 0.5  # the injection detector's (mesh_guardrails.injection.THRESHOLD), shown beside scores


def _spec(args: argparse.Namespace) -> ToolServerSpec:
    """The server's definition from ``--file`` (YAML or JSON) or the flags, one line per problem."""
    if args.file is not None:
        raw = wf.read(Path(args.file))
        if not isinstance(raw, dict):
            raise MeshError(f"{args.file}: a tool server is a mapping (endpoints, auth, tools ...)")
    else:
        if not args.endpoint and not args.a2a:
            raise MeshError("say where: --endpoint URL or --a2a CARD_URL (once per replica), or --file SERVER.yaml")
        raw = {"endpoints": args.a2a or args.endpoint, "default_risk": args.default_risk, "timeout_s": args.timeout_s,
               "rate_per_min": args.rate_per_min}  # fmt: skip
        if args.a2a:
            raw["protocol"] = "a2a"
        if args.max_response_mb is not None:
            raw["max_response_bytes"] = int(args.max_response_mb * 1024 * 1024)
        if args.bearer:
            raw["auth"] = {"kind": "bearer", "secret": args.bearer}
        elif args.oauth_secret:
            raw["auth"] = {"kind": "oauth", "secret": args.oauth_secret, "token_url": args.token_url or "",
                           "client_id": args.client_id or "", "scope": args.scope or ""}  # fmt: skip
        if args.ca:
            raw["ca"] = args.ca
        tools: dict[str, dict[str, Any]] = {}
        for rule in args.rule or []:
            name, _, risk = rule.partition("=")
            if not name or risk not in ("read", "write", "external", "approve"):
                raise MeshError(f"--rule {rule!r}: TOOL=read|write|external|approve")
            tools.setdefault(name, {}).update({"needs_approval": True} if risk == "approve" else {"risk": risk})
        raw["tools"] = tools
    try:
        return ToolServerSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'server'}: {e['msg']}" for e in exc.errors()]
        raise MeshError("not a valid tool server: " + "; ".join(problems)) from None


def _send(args: argparse.Namespace, role: str, **fields: Any) -> Any:
    """Sign and hand in a change as ``--as``; the answer, or None when it was refused (said)."""
    if getattr(args, "global_", False):
        raise MeshError("tool servers are a tenant's: the mesh's own are mounted with MESH_MCP_CONFIG")
    tenant, signer = rel._person(args, role)
    change = ToolsChange(tenant=tenant, task_id=f"tools-{uuid.uuid4().hex[:12]}", by=signer.principal,
                         reason=args.reason or "", **fields)  # fmt: skip
    answer = wf.hand_in(
        args, tenant, lambda client: client.change_tools(change, signer, timeout=args.timeout), keeper="tool-executor"
    )
    if not getattr(answer, "accepted", False):
        print(f"meshctl: tools {fields.get('action')} refused: {answer.reason}", file=sys.stderr)
        return None
    return answer


def _read(args: argparse.Namespace, tenant: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(server records, their states) of the tenant, read key by key with its own client."""

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with wf._client(args, tenant) as client:
            catalogue = await client.registry("catalogue", bucket="toolservers") or {}
            names = [args.server] if getattr(args, "server", None) else catalogue.get("servers", [])
            recs, states = [], []
            for name in names:
                rec = await client.registry(f"server.{name}", bucket="toolservers")
                if rec is not None:
                    recs.append(rec)
                    states.append(await client.registry(f"state.{name}", bucket="toolservers") or {})
            return recs, states

    return asyncio.run(run())


def cmd_add(args: argparse.Namespace) -> int:
    answer = _send(args, "author", action="add", server=args.server, definition=_spec(args))
    if answer is None:
        return 1
    if not args.json:
        what = "registered" if answer.version == 1 else ("changed" if answer.changed else "unchanged")
        print(f"{args.server}: {what} (version {answer.version}); its tools are offered once approved: "
              f"meshctl tools list --tenant {answer.tenant}")  # fmt: skip
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    answer = _send(args, "author", action="remove", server=args.server)
    if answer is None:
        return 1
    if not args.json:
        print(f"{args.server}: removed; its tools are no longer offered")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    tenant, _ = rel._person(args, "approver")  # checked (and the key found) before anything is read
    args.tenant = tenant
    recs, states = _read(args, tenant)
    if not recs:
        raise MeshError(f"tenant {tenant} has no tool server {args.server!r} (meshctl tools list --tenant {tenant})")
    state = states[0]
    listed = {t["name"]: t for t in state.get("tools", [])}
    if not listed:
        why = f": {state['error']}" if state.get("error") else " yet"
        raise MeshError(f"{args.server} has not listed its tools{why}")
    names = args.tool or ([n for n, t in listed.items() if t.get("status") != "approved"] if args.all else [])
    if not names:
        raise MeshError("say which: --tool NAME (repeat), or --all (every tool not approved yet)")
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise MeshError(f"{args.server} lists no tool {unknown[0]!r} (it lists {', '.join(sorted(listed))})")
    for n in names:
        t = listed[n]
        flag = f"  FLAGGED {t['injection_score']:.2f} ({', '.join(t.get('signals', []))})" if (
            t.get("injection_score", 0) >= THRESHOLD) else ""  # fmt: skip
        print(f"approving {args.server}__{n} {t['sha256'][:12]}{flag}: {t.get('description', '')[:200]}")
    answer = _send(args, "approver", action="approve", server=args.server,
                   pins={n: listed[n]["sha256"] for n in names}, force=args.force)  # fmt: skip
    if answer is None:
        return 1
    if not args.json:
        print(f"{args.server}: approved {', '.join(answer.approved)} (version {answer.version})")
    return 0


def lines(rec: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """A server as ``meshctl tools list`` shows it."""
    spec = rec.get("definition", {})
    auth = spec.get("auth", {}).get("kind", "none")
    protocol = spec.get("protocol", "mcp")
    out = [f"{rec['server']}  {protocol}  version {rec.get('version')}  auth {auth}  added by {rec.get('added_by', '?')}"
           + (f"  LISTING FAILED: {state['error']}" if state.get("error") else "")]  # fmt: skip
    for e in state.get("endpoints", []) or [{"url": u} for u in spec.get("endpoints", [])]:
        health = "up" if e.get("healthy") else ("down" if "healthy" in e else "?")
        out.append(f"  endpoint {e['url']}  {health}  breaker {e.get('breaker', '?')}  in flight {e.get('in_flight', 0)}"
                   f"  calls {e.get('calls', 0)}  failures {e.get('failures', 0)}  failovers {e.get('failovers', 0)}"
                   f"  {e.get('latency_ms', 0):.0f} ms" + (f"  ({e['last_error'][:100]})" if e.get("last_error") else ""))  # fmt: skip
    for t in state.get("tools", []):
        status = t.get("status", "?") + (f" ({' and '.join(t['changed'])} changed)" if t.get("changed") else "")
        flag = f"  FLAGGED {t['injection_score']:.2f}" if t.get("injection_score", 0) >= THRESHOLD else ""
        out.append(f"  tool {rec['server']}__{t['name']}  {status}  {t['sha256'][:12]}{flag}")
        out.append(f"    {t.get('description', '')[:160]}")
    return out


def cmd_list(args: argparse.Namespace) -> int:
    recs, states = _read(args, args.tenant)
    if args.json:
        print(json.dumps([{"server": r, "state": s} for r, s in zip(recs, states, strict=True)], indent=2))
        return 0
    if not recs:
        print(
            f"tenant {args.tenant} has no tool servers (meshctl tools add NAME --endpoint URL --as author.{args.tenant}.<person>)"
        )
        return 0
    for r, s in zip(recs, states, strict=True):
        print("\n".join(lines(r, s)))
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("tools", help="a tenant's own tool servers (remote MCP, A2A agents): add, list, approve, remove")
    r = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)

    def common(p: argparse.ArgumentParser, role: str | None) -> None:
        p.add_argument("server", metavar="SERVER", type=opt.server_name)
        if role is not None:
            p.add_argument("--as", dest="as_", default=None, metavar=role.upper(), help=f"{role}.<tenant>.<person>")
            p.add_argument("--tenant", type=opt.tenant, default=None, help=f"(the {role}'s tenant)")
            p.add_argument("--reason", default=None, help="why: on the tenant's audit chain")
        p.add_argument("--json", action="store_true")
        p.add_argument("--nats-url", default=None)
        p.add_argument("--timeout", type=opt.positive, default=30.0, help="seconds to wait for the tool-executor")

    a = r.add_parser("add", help="register a server or an A2A agent, or change one (as an author)")
    common(a, "author")
    a.add_argument("--file", default=None, help="the server as YAML or JSON (protocol, endpoints, auth, ca, tools ...)")
    where = a.add_mutually_exclusive_group()
    where.add_argument("--endpoint", action="append", help="an MCP replica's streamable-HTTP URL (repeat for each)")
    where.add_argument("--a2a", action="append", metavar="CARD_URL",
                       help="an A2A agent's card URL, or its base URL (repeat for each replica)")  # fmt: skip
    a.add_argument("--bearer", default=None, metavar="SECRET", help="a mounted secret file holding a bearer token")
    a.add_argument(
        "--oauth-secret", default=None, metavar="SECRET", help="OAuth client credentials: the client secret's file"
    )
    a.add_argument("--token-url", default=None)
    a.add_argument("--client-id", default=None)
    a.add_argument("--scope", default=None)
    a.add_argument("--ca", default=None, metavar="SECRET", help="a mounted PEM CA bundle to verify its TLS with")
    a.add_argument(
        "--rule",
        action="append",
        metavar="TOOL=RISK",
        help="read, write, external, or approve (always ask); "
        "an A2A agent's tools are named after its skills (or 'ask')",
    )
    a.add_argument("--default-risk", choices=("read", "write", "external"), default="external")
    a.add_argument("--timeout-s", type=opt.positive, default=30.0, help="per call")
    a.add_argument("--rate-per-min", type=int, default=0, help="per tool, for the tenant (0: none)")
    a.add_argument("--max-response-mb", type=opt.positive, default=None, help="an answer larger is cut off (10)")
    a.set_defaults(fn=cmd_add)

    p = r.add_parser("approve", help="approve tools' definitions as listed now (as an approver)")
    common(p, "approver")
    p.add_argument("--tool", action="append", help="a tool to approve (repeat)")
    p.add_argument("--all", action="store_true", help="every tool not approved yet")
    p.add_argument("--force", action="store_true", help="also a description the injection detector flags")
    p.set_defaults(fn=cmd_approve)

    d = r.add_parser("remove", help="remove a server: its tools are no longer offered (as an author)")
    common(d, "author")
    d.set_defaults(fn=cmd_remove)

    ls = r.add_parser("list", help="the tenant's servers: each tool's status and hash, each replica's health")
    ls.add_argument("--tenant", type=opt.tenant, required=True)
    ls.add_argument("--server", default=None, type=opt.server_name)
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--nats-url", default=None)
    ls.set_defaults(fn=cmd_list)
