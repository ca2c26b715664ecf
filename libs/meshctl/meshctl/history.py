"""``meshctl history TASK``: every stored message about one task, across every stream (and its
dead letters), in causal order, with who sent it (its identity token verified), what it says in one line, and the task's
totals (tokens and cost by model, attempts, verdicts, tool decisions, the release of the tenant's
behaviour its messages were made with).

Read as the admin with batched direct gets on each stream's per-subject index
(``<domain>.*.<tenant>.<task>.>``): no consumer is created, nothing is acknowledged, the mesh
does not notice. Bodies and lines are redacted (tool arguments are stored as the worker sent them).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import ContractError, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.registry import open_body
from mesh_durable.tail import Stored
from mesh_guardrails.redact import redact, redact_value
from mesh_identity import IdentityError, Verifier
from mesh_kit import envelope as env
from meshctl import audit


@dataclass
class Entry:
    stream: str
    seq: int
    time: float
    subject: str
    type: str
    sender: str
    """The principal whose token verified, or ``?`` with the reason it did not."""
    msg_id: str
    causation: str
    summary: str
    body: dict[str, Any]
    depth: int = 0
    cause: int | None = None
    """Position (in the printed order) of the message that caused this one, when stored."""


@dataclass
class History:
    tenant: str
    task_id: str
    entries: list[Entry] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        models: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "tokens": 0, "cost_usd": 0.0})
        attempts: dict[str, int] = {}
        decisions: Counter[str] = Counter()
        verdicts = []
        releases: Counter[str] = Counter()
        for e in self.entries:
            b = e.body
            if e.type not in (DEAD_LETTER, "task.submitted", "audit.recorded"):
                releases[str(b.get("release", ""))] += 1
            if e.type == "usage.recorded":
                m = models[f"{b.get('provider', '')}/{b.get('model', '')}"]
                m["calls"] += 1
                m["tokens"] += int(b.get("input_tokens", 0)) + int(b.get("output_tokens", 0))
                m["cost_usd"] += float(b.get("cost_usd", 0.0))
            elif e.type == "step.requested":
                sid = (b.get("step") or {}).get("step_id", "?")
                attempts[sid] = max(attempts.get(sid, 0), int(b.get("attempt", 1)))
            elif e.type == "tool.audited":
                decisions[f"{b.get('tool')}: {b.get('decision')}"] += 1
            elif e.type == "check.verdict":
                verdicts.append(
                    {"attempt": b.get("attempt"), "passed": b.get("passed"), "judge_score": b.get("judge_score")}
                    | ({"node": b["node"]} if b.get("node") else {})
                )
        return {
            "messages": len(self.entries),
            "by_model": {k: {**v, "cost_usd": round(v["cost_usd"], 6)} for k, v in sorted(models.items())},
            "tokens": int(sum(v["tokens"] for v in models.values())),
            "cost_usd": round(sum(v["cost_usd"] for v in models.values()), 6),
            "step_attempts": attempts,
            "tool_decisions": dict(decisions),
            "verdicts": verdicts,
            "outcome": next((e.type for e in reversed(self.entries) if e.type in OUTCOMES), None),
            "dead_letters": sum(e.type == DEAD_LETTER for e in self.entries),
            "releases": dict(releases),
        }


OUTCOMES = ("task.completed", "task.failed", "task.rejected")
DEAD_LETTER = "dead-letter"


async def collect(nc: NATS, tenant: str, task_id: str, *, events: bool = True) -> list[tuple[str, Stored]]:
    """Every stored message of the task, stream by stream (``events=False`` leaves out the
    progress feed, which restates what the other streams hold)."""
    out: list[tuple[str, Stored]] = []
    # Every stream of the mesh, then the dead letters of the task (``dlq.<service>.<original>``).
    sources = [(stream, f"{domain}.*.{tenant}.{task_id}.>") for domain, stream in topo.STREAMS.items()
               if events or domain != "event"]  # fmt: skip
    sources.append((topo.DLQ_STREAM, f"{topo.DLQ_PREFIX}.*.*.*.{tenant}.{task_id}.>"))
    for stream, subject in sources:
        out += [(stream, s) for s in await audit.stored(nc, stream, subject)]
    return out


def build(tenant: str, task_id: str, stored: list[tuple[str, Stored]], verifier: Verifier) -> History:
    """Order the messages causally: a message after the one that caused it (``Mesh-Causation``),
    otherwise by the time it was stored; ``depth`` is how many causes lead to it."""
    entries = [_entry(stream, s, verifier) for stream, s in stored]
    by_id = {e.msg_id: e for e in entries if e.msg_id}
    children: dict[str, list[Entry]] = defaultdict(list)
    ready: list[tuple[float, str, int, Entry]] = []
    for e in entries:
        if e.causation in by_id and by_id[e.causation] is not e:
            children[e.causation].append(e)
        else:
            heapq.heappush(ready, (e.time, e.stream, e.seq, e))
    ordered: list[Entry] = []
    position: dict[int, int] = {}
    while ready:
        _, _, _, e = heapq.heappop(ready)
        position[id(e)] = len(ordered)
        ordered.append(e)
        for child in children.pop(e.msg_id, []) if e.msg_id else []:
            child.depth, child.cause = e.depth + 1, position[id(e)]
            heapq.heappush(ready, (max(child.time, e.time), child.stream, child.seq, child))
    for rest in children.values():  # a causation cycle cannot happen; if it did, lose nothing
        ordered += rest
    return History(tenant, task_id, ordered)


def _entry(stream: str, s: Stored, verifier: Verifier) -> Entry:
    if stream == topo.DLQ_STREAM:
        return _dead_letter(s)
    headers = s.headers
    try:
        model = parse_message(s.subject, s.data)
    except ContractError as exc:
        return Entry(stream, s.seq, s.time, s.subject, "?", "?", headers.get(env.MSG_ID, ""),
                     headers.get(env.CAUSATION, ""), f"unreadable: {exc}"[:200], {})  # fmt: skip
    try:
        sender = verifier.verify(
            headers.get(env.IDENTITY), s.data, model, at=s.time, msg_id=headers.get(env.MSG_ID, "")
        ).name
    except IdentityError as exc:
        sender = f"? ({exc})"
    body = redact_value(open_body(s.subject, s.data))
    return Entry(stream, s.seq, s.time, s.subject, model.type, sender, headers.get(env.MSG_ID, ""),
                 headers.get(env.CAUSATION, ""), redact(summary(model.type, body))[:160], body)  # fmt: skip


def _dead_letter(s: Stored) -> Entry:
    """A message of the task a service gave up on: who, why, after how many deliveries. Written by
    that service (the original's signed headers travel with it, prefixed)."""
    h = s.headers
    original = h.get(env.DLQ_SUBJECT, "")
    parts = original.split(".")
    of = f"{parts[0]}.{parts[4]}" if len(parts) == 5 else original
    service = h.get(env.DLQ_SERVICE, "?")
    why = f"{service} gave up on {of} after {h.get(env.DLQ_DELIVERIES, '?')} deliveries ({h.get(env.DLQ_KIND, '?')}): "
    detail = {"original_subject": original, "service": service, "kind": h.get(env.DLQ_KIND, ""),
              "deliveries": h.get(env.DLQ_DELIVERIES, ""), "reason": redact(h.get(env.DLQ_REASON, ""))}  # fmt: skip
    return Entry(topo.DLQ_STREAM, s.seq, s.time, s.subject, DEAD_LETTER, service, "",
                 h.get(env.ORIG_PREFIX + env.CAUSATION, ""), redact(why + h.get(env.DLQ_REASON, ""))[:200], detail)  # fmt: skip


def summary(kind: str, b: dict[str, Any]) -> str:
    """One line of what a message says."""
    g = b.get
    match kind:
        case "task.submitted":
            replay = g("replay") or {}
            return (f"replay of {replay.get('of')}: " if replay else "") + f"{g('goal', '')!s}"[:100]
        case "plan.created":
            steps = g("steps") or []
            return f"{len(steps)} steps: " + ", ".join(
                f"{s.get('step_id')} {s.get('kind', '')}" + (f" as {s['agent']}" if s.get("agent") else "")
                for s in steps
            )
        case "step.requested":
            step = g("step") or {}
            agent = f" as {step['agent']}" if step.get("agent") else ""
            return f"{step.get('step_id')} attempt {g('attempt')}{agent}: {step.get('instruction', '')}"[:160]
        case "step.completed":
            return f"{g('step_id')} attempt {g('attempt')}: {g('iterations')} iterations, tools {g('tools') or []}"
        case "step.failed":
            return f"{g('step_id')} attempt {g('attempt')}: {g('reason')}"
        case "tool.requested":
            return f"{g('tool')} {g('call_id')}"
        case "tool.completed":
            route = g("route") or {}
            tries = " -> ".join(f"{a.get('endpoint')} {a.get('outcome')}" for a in route.get("attempts") or [])
            return (f"{g('tool')} {g('call_id')}: " + ("ok" if g("ok") else f"error: {g('error')}")
                    + (" (dry run: not performed)" if g("dry_run") else "")
                    + (f" [{tries}, {route.get('latency_ms', 0):.0f} ms]" if tries else ""))  # fmt: skip
        case "tool.audited":
            return f"{g('tool')} {g('call_id')}: {g('decision')} by {g('decided_by') or '?'}"
        case "retrieval.requested":
            return f"{g('query', '')!s}"[:100]
        case "retrieval.completed":
            return f"{len(g('hits') or [])} hits, index {g('index_version')}" + (" (cached)" if g("cached") else "")
        case "check.requested":
            return (f"node {g('node')} ({', '.join(g('only') or ())}) on {g('answer_step')}, " if g("node") else "") + (
                f"attempt {g('attempt')}")  # fmt: skip
        case "check.verdict":
            failed = [c.get("name") for c in g("checks") or [] if not c.get("passed", True)]
            verdict = "passed" if g("passed") else f"failed: {', '.join(map(str, failed)) or '?'}"
            node = f"node {g('node')}, " if g("node") else ""
            return f"{node}attempt {g('attempt')}: {verdict}, judge {g('judge_score')}"
        case "usage.recorded":
            return (f"{g('agent')} {g('provider')}/{g('model')}: {g('input_tokens')}+{g('output_tokens')} tokens, "
                    f"${float(g('cost_usd') or 0):.6f}" + (f", error {g('error')}" if g("error") else ""))  # fmt: skip
        case "approval.requested":
            return f"{g('approval_id')} {g('tool')}: {g('reason')}"
        case "approval.decided":
            return f"{g('approval_id')}: {'approved' if g('approved') else 'denied'} by {g('decided_by')}"
        case "event.progress":
            return f"{g('stage')}: {g('message')}"
        case "audit.recorded":
            return f"#{g('n')} {g('kind')} by {g('actor')}"
        case "task.completed":
            return f"{g('answer', '')!s}"[:100]
        case "task.failed" | "task.rejected" | "control.halt" | "control.cancel" | "control.resume":
            return f"{g('reason', '')!s}"
    return ""


def render(h: History, *, width: int = 160) -> str:
    if not h.entries:
        return f"no stored message about {h.tenant}/{h.task_id}"
    t0 = h.entries[0].time
    lines = [f"history of {h.tenant}/{h.task_id}: {len(h.entries)} messages", ""]
    lines.append(f"{'#':>4} {'+S':>8} {'FROM':14} {'TYPE':20} WHAT")
    for i, e in enumerate(h.entries):
        cause = f" <- #{e.cause}" if e.cause is not None else ""
        line = f"{i:>4} {e.time - t0:>8.3f} {e.sender[:14]:14} {'  ' * min(e.depth, 6)}{e.type:20} {e.summary}{cause}"
        lines.append(line[:width])
    t = h.totals()
    lines += ["", f"outcome: {t['outcome'] or 'not ended'}; {t['tokens']} tokens, ${t['cost_usd']:.6f}"]
    made = t["releases"]
    if made:  # which release of the tenant's behaviour the messages were made with ('' : the packaged one)
        lines.append("release: " + ", ".join(f"{v or 'packaged'} ({n} messages)" for v, n in made.items())
                     + ("  WARNING: more than one" if len(made) > 1 else ""))  # fmt: skip
    for model, m in t["by_model"].items():
        lines.append(f"  {model}: {int(m['calls'])} calls, {int(m['tokens'])} tokens, ${m['cost_usd']:.6f}")
    if t["step_attempts"]:
        lines.append("attempts: " + ", ".join(f"{s} {n}" for s, n in sorted(t["step_attempts"].items())))
    if t["tool_decisions"]:
        lines.append("tool decisions: " + ", ".join(f"{k} x{n}" for k, n in t["tool_decisions"].items()))
    if t["verdicts"]:
        lines.append("verdicts: " + ", ".join(
            ("node " + v["node"] + " " if v.get("node") else "") + f"attempt {v['attempt']} "
            + ("passed" if v["passed"] else "failed") for v in t["verdicts"]))  # fmt: skip
    if t["dead_letters"]:
        lines.append(f"dead letters: {t['dead_letters']} (meshctl dlq list shows them whole; retry re-drives one)")
    unverified = sum(e.sender.startswith("?") for e in h.entries)
    if unverified:
        lines.append(f"WARNING: {unverified} message(s) whose sender's token did not verify (shown as ?)")
    return "\n".join(lines)


def as_json(h: History) -> dict[str, Any]:
    return {
        "tenant": h.tenant,
        "task_id": h.task_id,
        "messages": [
            {
                "n": i,
                "stream": e.stream,
                "seq": e.seq,
                "time": e.time,
                "subject": e.subject,
                "type": e.type,
                "sender": e.sender,
                "msg_id": e.msg_id,
                "causation": e.causation,
                "cause": e.cause,
                "depth": e.depth,
                "summary": e.summary,
                "body": e.body,
            }
            for i, e in enumerate(h.entries)
        ],
        "totals": h.totals(),
    }
