"""``meshctl workflow``: workflow definitions checked, shown and compared (issue 40).

A definition is a YAML or JSON file (``mesh_contracts.v1.workflow``). ``validate`` says every
problem of each file, one line each, naming the node and the field; ``show`` draws the DAG as text
or as a mermaid flowchart; ``diff`` says what changed between two definitions, node by node.
A definition's version is the digest of its content (``name@<digest>``): the same file has the
same version wherever it is published.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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
from meshctl import options as opt
from meshctl.local import MeshError

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
    nodes = document.get("nodes") if isinstance(document.get("nodes"), list) else []
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
    wf = _one(args.file)
    if args.json:
        print(json.dumps({"ref": wf.ref(), "digest": wf.digest(), "definition": wf.model_dump(mode="json")}, indent=2))
    else:
        print(render_mermaid(wf) if args.mermaid else render_text(wf))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    old, new = _one(args.old), _one(args.new)
    changes = diff(old, new)
    print(f"{old.ref()} -> {new.ref()}")
    print("\n".join(changes) if changes else "no change")
    return 0


def _one(path: Path) -> WorkflowDefinition:
    try:
        return load(path)
    except Invalid as exc:
        raise MeshError(f"{exc.source}: not a valid workflow: {'; '.join(exc.problems)}") from None


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("workflow", help="workflow definitions: validate, show (text or mermaid), diff")
    w = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    v = w.add_parser("validate", help="check definitions (YAML or JSON): every problem, one line each")
    v.add_argument("files", nargs="+", type=Path, metavar="FILE")
    v.set_defaults(fn=cmd_validate)
    sh = w.add_parser("show", help="a definition's DAG, its version (name@digest) and each node's limits")
    sh.add_argument("file", type=Path, metavar="FILE")
    sh.add_argument("--mermaid", action="store_true", help="as a mermaid flowchart")
    sh.add_argument("--json", action="store_true", help="the canonical definition and its digest")
    sh.set_defaults(fn=cmd_show)
    d = w.add_parser("diff", help="what changed between two definitions, node by node")
    d.add_argument("old", type=Path, metavar="OLD")
    d.add_argument("new", type=Path, metavar="NEW")
    d.set_defaults(fn=cmd_diff)
