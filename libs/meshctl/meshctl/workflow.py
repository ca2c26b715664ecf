"""``meshctl workflow``: workflow definitions checked, shown and compared (issue 40).

A definition is a YAML or JSON file (``mesh_contracts.v1.workflow``). ``validate`` says every
problem of each file, one line each, naming the node and the field; ``show`` draws the DAG as text
or as a mermaid flowchart; ``diff`` says what changed between two definitions, node by node.
A definition's version is the digest of its content (``name@<digest>``): the same file has the
same version wherever it is published.

The registry (the planner keeps it: ``mesh_planner.workflows``) holds a tenant's versions:
``publish`` (as an author: ``--as author.<tenant>.<person>``, see ``meshctl authors``), ``list``,
``show`` and ``diff`` of registered versions (``NAME@VERSION``, ``NAME@latest``) as well as files,
and ``deprecate``, ``restore`` and ``delete`` of a version. A task runs one with
``meshctl submit --workflow NAME[@VERSION]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from mesh_contracts.v1.workflow import (
    WAITS,
    AgentNode,
    ApprovalNode,
    CheckNode,
    RetrieveNode,
    SignalNode,
    TimerNode,
    ToolNode,
    WorkflowDefinition,
)
from mesh_contracts.v1.workflow_versions import WorkflowChange, parse_ref
from meshctl import options as opt
from meshctl.local import MeshError

if TYPE_CHECKING:
    from meshctl.client import TenantClient

MAX_FILE_BYTES = 1 << 20


class Invalid(MeshError):
    """A definition that does not validate: every problem, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)")
        self.source, self.problems = source, problems


def read(path: Path) -> Any:
    """The file's document (YAML, or JSON: JSON is YAML too), or a one-line error."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise MeshError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB: not a workflow definition")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MeshError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshError(f"cannot read {path}: {exc}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        where = str(exc).splitlines()[0]
        raise MeshError(f"{path}: not {'JSON' if path.suffix == '.json' else 'YAML'}: {where}") from None


def parse(document: Any, source: str = "workflow") -> WorkflowDefinition:
    """The definition, or ``Invalid`` with every problem said for a person."""
    if not isinstance(document, dict):
        raise Invalid(source, [f"a workflow definition is a mapping (name, nodes, ...), not {type(document).__name__}"])
    try:
        return WorkflowDefinition.model_validate(document)
    except ValidationError as exc:
        raise Invalid(source, problems(exc, document)) from None


def load(path: Path) -> WorkflowDefinition:
    return parse(read(path), str(path))


def problems(exc: ValidationError, document: dict[str, Any]) -> list[str]:
    """Pydantic's errors as a person reads them: which node (by id), which field, what is wrong.
    A node's errors under the other node kinds are left out: they only say it is not one."""
    listed = document.get("nodes")
    nodes: list[Any] = listed if isinstance(listed, list) else []
    out: list[str] = []
    errors = exc.errors()
    in_nodes = any(len(e["loc"]) > 2 and e["loc"][0] == "nodes" for e in errors)
    for err in errors:
        loc = list(err["loc"])
        if loc == ["nodes"] and err["type"] == "too_short":
            if in_nodes:
                continue  # pydantic counts only the nodes that validated: their errors say why
            out.append("nodes: a workflow has at least one node")
            continue
        where = ""
        if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
            node = nodes[loc[1]] if loc[1] < len(nodes) else None
            ident = node.get("id") if isinstance(node, dict) else None
            where = f"node {ident!r}" if ident else f"node {loc[1] + 1}"
            loc = loc[2:]
            if loc and isinstance(node, dict) and loc[0] in ("agent", "tool", "retrieve", "approval", "check",
                                                               "timer", "signal"):  # fmt: skip
                if node.get("kind") != loc[0]:
                    continue
                loc = loc[1:]
        field = ".".join(str(p) for p in loc if not (isinstance(p, str) and p in ("str", "Edge")))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "not a field of this (misspelt?)"
        elif err["type"] == "union_tag_invalid":
            msg = f"kind must be one of agent, tool, retrieve, approval, check, timer, signal (not {err['input']!r})"
        elif err["type"] == "union_tag_not_found":
            msg = "says no kind (agent, tool, retrieve, approval, check, timer or signal)"
        line = ": ".join(x for x in (where, field, msg) if x)
        if line not in out:
            out.append(line)
    return out or [str(exc)]


def label(n: Any) -> str:
    """One line saying what a node does."""
    if isinstance(n, AgentNode):
        tools = f" [tools: {', '.join(n.tools)}]" if n.tools else " [no tools]"
        tier = f" ({n.tier})" if n.tier else ""
        return f"agent{tier}: {_short(n.instruction)}{tools}"
    if isinstance(n, ToolNode):
        return f"tool {n.tool}({', '.join(sorted(n.arguments))})"
    if isinstance(n, RetrieveNode):
        return f"retrieve top {n.top_k}: {_short(n.query)}"
    if isinstance(n, ApprovalNode):
        return (
            f"approval ({'denied ends the task' if n.on_denied == 'fail' else 'denied: branch'}): {_short(n.request)}"
        )
    if isinstance(n, CheckNode):
        score = f", judge >= {n.min_score:g}" if n.min_score is not None else ""
        return f"check {n.of}: {', '.join(n.checks)}{score}"
    if isinstance(n, TimerNode):
        return f"timer: {f'{n.after_s:g} s' if n.after_s else f'until {n.until}'}"
    if isinstance(n, SignalNode):
        return f"signal: waits for {n.name!r}"
    return str(getattr(n, "kind", "?"))


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _limits(n: Any) -> str:
    parts = []
    if n.retry.attempts > 1:
        parts.append(f"{n.retry.attempts} tries, backoff {', '.join(f'{d:g}' for d in n.retry.delays())} s")
    if n.timeout_s:
        parts.append(f"timeout {n.timeout_s:g} s")
    if n.budget_share:
        parts.append(f"{n.budget_share:.0%} of the budget")
    return f"  ({'; '.join(parts)})" if parts else ""


def render_text(wf: WorkflowDefinition) -> str:
    """The DAG as text: each node in running order with what it runs after (and on what condition)."""
    lines = [f"workflow {wf.ref()}  mode: {wf.mode}  nodes: {len(wf.nodes)}  answer: {wf.answer_node()}"]
    if wf.description:
        lines.append(f"  {_short(wf.description, 100)}")
    for i in wf.order():
        n = wf.node(i)
        after = []
        for e in n.edges():
            after.append(e.node + (f" if {e.when.describe(e.node)}" if e.when else ""))
        wait = "  waits" if n.kind in WAITS else ""
        lines.append(f"  {n.id:16} {label(n)}{_limits(n)}{wait}")
        if after:
            lines.append(f"  {'':16}   after {'; '.join(after)}")
    return "\n".join(lines)


_SHAPES = {
    "agent": ("[", "]"),
    "tool": ("[[", "]]"),
    "retrieve": ("[(", ")]"),
    "approval": ("{", "}"),
    "check": ("{{", "}}"),
    "timer": ("([", "])"),
    "signal": (">", "]"),
}


def render_mermaid(wf: WorkflowDefinition) -> str:
    """The DAG as a mermaid flowchart (what the dashboard draws)."""
    lines = ["flowchart TD"]
    for i in wf.order():
        n = wf.node(i)
        left, right = _SHAPES[n.kind]
        text = (n.title or n.id) + "<br/>" + label(n)
        lines.append(f'  {n.id}{left}"{_mermaid_text(text)}"{right}')
    for i in wf.order():
        for e in wf.node(i).edges():
            cond = f'|"{_mermaid_text(e.when.describe(e.node))}"|' if e.when else ""
            lines.append(f"  {e.node} -->{cond} {i}")
    return "\n".join(lines)


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;").replace("#lt;br/#gt;", "<br/>")


def diff(old: WorkflowDefinition, new: WorkflowDefinition) -> list[str]:
    """What changed from ``old`` to ``new``, node by node (empty: the same definition)."""
    if old.digest() == new.digest():
        return []
    out = []
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for key in sorted(set(a) | set(b)):
        if key != "nodes" and a.get(key) != b.get(key):
            out.append(f"~ {key}: {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    an, bn = {n["id"]: n for n in a["nodes"]}, {n["id"]: n for n in b["nodes"]}
    for i in [n["id"] for n in a["nodes"]] + [n["id"] for n in b["nodes"] if n["id"] not in an]:
        if i not in bn:
            out.append(f"- node {i}: {label(old.node(i))}")
        elif i not in an:
            out.append(f"+ node {i}: {label(new.node(i))}")
        elif an[i] != bn[i]:
            for f in sorted(set(an[i]) | set(bn[i])):
                if an[i].get(f) != bn[i].get(f):
                    out.append(f"~ node {i}.{f}: {json.dumps(an[i].get(f))} -> {json.dumps(bn[i].get(f))}")
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            wf = load(path)
        except Invalid as exc:
            bad += 1
            for p in exc.problems:
                print(f"{exc.source}: {p}", file=sys.stderr)
            continue
        print(f"{path}: ok: {wf.ref()} ({len(wf.nodes)} nodes, mode {wf.mode})")
    return 1 if bad else 0


def cmd_show(args: argparse.Namespace) -> int:
    wf = _definition(args, args.file)
    if args.json:
        print(json.dumps({"ref": wf.ref(), "digest": wf.digest(), "definition": wf.model_dump(mode="json")}, indent=2))
    else:
        print(render_mermaid(wf) if args.mermaid else render_text(wf))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    old, new = _definition(args, args.old), _definition(args, args.new)
    changes = diff(old, new)
    print(f"{old.ref()} -> {new.ref()}")
    print("\n".join(changes) if changes else "no change")
    return 0


def _one(path: Path) -> WorkflowDefinition:
    try:
        return load(path)
    except Invalid as exc:
        raise MeshError(f"{exc.source}: not a valid workflow: {'; '.join(exc.problems)}") from None


# --- the registry ----------------------------------------------------------------------------


def _is_file(arg: str) -> bool:
    return Path(arg).exists() or arg.endswith((".yaml", ".yml", ".json")) or "/" in arg


def _definition(args: argparse.Namespace, arg: str) -> WorkflowDefinition:
    """A definition from a file, or a registered version of ``--tenant``'s (``NAME[@VERSION]``)."""
    if _is_file(arg):
        return _one(Path(arg))
    if not getattr(args, "tenant", None):
        raise MeshError(f"{arg}: no such file; to show a registered version, say whose: --tenant T")
    try:
        name, version = parse_ref(arg)
    except ValueError as exc:
        raise MeshError(str(exc)) from None

    async def fetch() -> dict[str, Any]:
        async with _client(args, args.tenant) as client:
            if version == "latest":
                latest = _latest(await client.registry("catalog") or {}, name)
                if not latest:
                    raise MeshError(f"tenant {args.tenant} has no active version of {name!r} (meshctl workflow list)")
                found = await client.registry(f"wf.{name}.{latest}")
            else:
                found = await client.registry(f"wf.{name}.{version}")
            if found is None:
                raise MeshError(
                    f"tenant {args.tenant} has no workflow {arg} (meshctl workflow list --tenant {args.tenant})"
                )
            return found

    rec = asyncio.run(fetch())
    return WorkflowDefinition.model_validate(rec["definition"])


def _latest(catalog: dict[str, Any], name: str) -> str:
    versions = (catalog.get("workflows") or {}).get(name) or []
    return next((v["version"] for v in reversed(versions) if v.get("status") == "active"), "")


def hand_in(args: argparse.Namespace, tenant: str, send: Callable[[TenantClient], Awaitable[Any]],
            keeper: str = "planner") -> Any:  # fmt: skip
    """A person's change handed in with the tenant's client (``send``), and its answer (printed as
    JSON with ``--json``); a change nobody answered says which service to look at."""

    async def run() -> Any:
        async with _client(args, tenant) as client:
            return await send(client)

    try:
        answer = asyncio.run(run())
    except TimeoutError as exc:
        raise MeshError(f"{exc} (is the {keeper} running?)") from None
    if args.json:
        print(json.dumps(answer.model_dump(mode="json"), indent=2))
    return answer


def _client(args: argparse.Namespace, tenant: str) -> TenantClient:
    from meshctl.client import TenantClient
    from meshctl.commands.common import nats_url
    from meshctl.identity import Identities

    home = opt.home(args)
    ids = Identities(home)
    if not ids.creds(f"client.{tenant}").exists():
        raise MeshError(f"unknown tenant {tenant!r} (known: {', '.join(ids.tenants()) or 'none'})")
    return TenantClient.of(ids, nats_url(args, home), tenant)


def _author(args: argparse.Namespace) -> tuple[str, Any]:
    """(tenant, signer) of ``--as author.<tenant>.<person>``, with the person's key from the mesh home."""
    from mesh_identity import Signer
    from meshctl.identity import Identities

    parts = (args.as_ or "").split(".")
    if len(parts) != 3 or parts[0] != "author":
        raise MeshError(f"--as {args.as_!r}: an author is author.<tenant>.<person> (meshctl authors list)")
    tenant, person = parts[1], parts[2]
    if args.tenant and args.tenant != tenant:
        raise MeshError(f"{args.as_} authors tenant {tenant}'s workflows, not {args.tenant}'s")
    key = Identities(opt.home(args)).signing_key(args.as_)
    if not key.exists():
        raise MeshError(f"no key for {args.as_} in this mesh home (add the author: meshctl authors add {person} "
                        f"--tenant {tenant})")  # fmt: skip
    return tenant, Signer.from_file(args.as_, key)


def _change(args: argparse.Namespace, action: str, name: str, version: str = "", definition: Any = None) -> int:
    tenant, signer = _author(args)
    change = WorkflowChange(
        tenant=tenant, task_id=f"wf-{uuid.uuid4().hex[:12]}", action=action, name=name,  # type: ignore[arg-type]
        version=version, definition=definition, author=signer.principal, reason=args.reason or "",
    )  # fmt: skip

    answer = hand_in(args, tenant, lambda client: client.change_workflow(change, signer, timeout=args.timeout))
    if not getattr(answer, "accepted", False):
        if not args.json:
            print(f"meshctl: {action} {name} refused: {answer.reason}", file=sys.stderr)
        return 1
    if not args.json:
        ref = f"{name}@{answer.version}"
        what = {"publish": "published", "deprecate": "deprecated", "restore": "restored", "delete": "deleted"}[action]
        head = f"{ref} {what}" if answer.changed else f"{ref} was already {answer.status} (nothing changed)"
        latest = (
            f"{name}@latest is {answer.latest}"
            if answer.latest
            else f"{name} has no active version: no new task may run it"
        )
        print(f"{head}; {latest}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    wf = _one(args.file)
    return _change(args, "publish", wf.name, wf.digest(), wf.model_dump(mode="json"))


def cmd_status(args: argparse.Namespace) -> int:
    try:
        name, version = parse_ref(args.ref)
    except ValueError as exc:
        raise MeshError(str(exc)) from None
    if version == "latest":
        raise MeshError(f"{args.action} names one version: {name}@VERSION (meshctl workflow list)")
    return _change(args, args.action, name, version)


def cmd_list(args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any]:
        async with _client(args, args.tenant) as client:
            return await client.registry("catalog") or {}

    catalog = asyncio.run(run())
    workflows = catalog.get("workflows") or {}
    if args.json:
        print(json.dumps(workflows, indent=2))
        return 0
    if not workflows:
        print(
            f"tenant {args.tenant} has no workflow (publish one: meshctl workflow publish FILE --as author.{args.tenant}.NAME)"
        )
        return 0
    for name in sorted(workflows):
        latest = _latest(catalog, name)
        print(f"{name}  (latest: {latest or 'none active'})")
        for v in workflows[name]:
            if v.get("status") == "deleted" and not args.all:
                continue
            at = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.get("published_at", 0)))
            mark = "  <- latest" if v["version"] == latest else ""
            print(f"  {v['version']}  {v.get('status', '?'):10}  {at} UTC  {v.get('published_by', '')}{mark}")
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("workflow", help="workflow definitions and the tenant's registry: validate, publish, list, "
                                         "show, diff, deprecate, restore, delete")  # fmt: skip
    w = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    v = w.add_parser("validate", help="check definitions (YAML or JSON): every problem, one line each")
    v.add_argument("files", nargs="+", type=Path, metavar="FILE")
    v.set_defaults(fn=cmd_validate)

    def reach(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nats-url", default=None)
        p.add_argument("--timeout", type=opt.positive, default=30.0, help="seconds to wait for the planner's answer")

    sh = w.add_parser("show", help="a definition's DAG, its version (name@digest) and each node's limits")
    sh.add_argument("file", metavar="FILE|NAME[@VERSION]", help="a file, or a registered version (with --tenant)")
    sh.add_argument("--tenant", type=opt.tenant, default=None, help="whose registered version")
    sh.add_argument("--mermaid", action="store_true", help="as a mermaid flowchart")
    sh.add_argument("--json", action="store_true", help="the canonical definition and its digest")
    reach(sh)
    sh.set_defaults(fn=cmd_show)
    d = w.add_parser("diff", help="what changed between two definitions (files or registered versions), node by node")
    d.add_argument("old", metavar="OLD")
    d.add_argument("new", metavar="NEW")
    d.add_argument("--tenant", type=opt.tenant, default=None, help="whose registered versions")
    reach(d)
    d.set_defaults(fn=cmd_diff)

    def authored(c: argparse.ArgumentParser) -> None:
        """A change made as an author: who, why, and how to reach the mesh."""
        c.add_argument(
            "--as", dest="as_", required=True, metavar="AUTHOR", help="author.<tenant>.<person> (meshctl authors)"
        )
        c.add_argument("--tenant", type=opt.tenant, default=None, help="(the author's tenant)")
        c.add_argument("--reason", default=None, help="why: on the tenant's audit chain")
        c.add_argument("--json", action="store_true")
        reach(c)

    p = w.add_parser("publish", help="register a definition as a new version (as an author)")
    p.add_argument("file", type=Path, metavar="FILE")
    authored(p)
    p.set_defaults(fn=cmd_publish)
    for verb, text in (
        ("deprecate", "no new task may start this version (tasks running it go on); @latest moves back"),
        ("restore", "a deprecated version may be started again"),
        ("delete", "withdraw a version for good (its definition stays for the tasks that ran it and the audit)"),
    ):
        c = w.add_parser(verb, help=text)
        c.add_argument("ref", metavar="NAME@VERSION")
        authored(c)
        c.set_defaults(fn=cmd_status)
    ls = w.add_parser("list", help="the tenant's workflows: every version, its status, who published it, @latest")
    ls.add_argument("--tenant", type=opt.tenant, required=True)
    ls.add_argument("--all", action="store_true", help="deleted versions too")
    ls.add_argument("--json", action="store_true")
    reach(ls)
    ls.set_defaults(fn=cmd_list)
