"""``meshctl trace TASK``: the task's trace, as a tree of spans.

Two sources, the better one when it is there:

- **a trace backend** (``--jaeger URL``, the Jaeger query API that infra/otel/collector.yaml
  exports to; Jaeger v1 and v2 both serve it): every span of every service, with its start
  and duration, nested as the services recorded them (``CHILD_OF`` references);
- **the messages alone** (always): every stored message of the task carries the W3C trace
  context of the span that published it (``traceparent``), and its causation id names the
  message it was handling. The tree is the causal order of ``meshctl history``; each hop says
  how long after its cause it was stored (the handler's latency, queueing included). Spans are
  not sampled without an exporter, but their ids still travel, so this works on any mesh.

Both say which trace ids the task's messages carry: more than one means a hop lost the context.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

from meshctl.errors import MeshctlError
from meshctl.history import Entry, History

TRACEPARENT = "traceparent"


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, span id, sampled) of a W3C ``traceparent``; None when absent or malformed."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    trace_id, span_id, flags = parts[1], parts[2], parts[3]
    if set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    try:
        sampled = bool(int(flags[:2], 16) & 1)
    except ValueError:
        return None
    return trace_id, span_id, sampled


@dataclass
class Hop:
    """One stored message as a span of the task's trace."""

    entry: Entry
    trace_id: str
    span_id: str
    sampled: bool
    after_cause_s: float | None
    """Seconds between the cause being stored and this message being stored."""


@dataclass
class MessageTrace:
    tenant: str
    task_id: str
    hops: list[Hop] = field(default_factory=list)
    untraced: int = 0
    """Messages without a trace context (a dead letter, or a publisher that sent none)."""

    @property
    def trace_ids(self) -> list[str]:
        """The trace ids, the one most messages carry first."""
        counts: dict[str, int] = defaultdict(int)
        for h in self.hops:
            counts[h.trace_id] += 1
        return sorted(counts, key=lambda t: -counts[t])

    def by_service(self) -> dict[str, dict[str, float]]:
        """Per sending service: how many hops, and the time from their causes (where time went)."""
        waits: dict[str, list[float]] = defaultdict(list)
        for h in self.hops:
            if h.after_cause_s is not None:
                waits[h.entry.sender].append(h.after_cause_s)
        return {
            svc: {
                "hops": len(w),
                "total_s": round(sum(w), 6),
                "median_s": round(statistics.median(w), 6),
                "max_s": round(max(w), 6),
            }
            for svc, w in sorted(waits.items(), key=lambda kv: -sum(kv[1]))
        }


def from_history(h: History, headers: dict[tuple[str, int], dict[str, str]]) -> MessageTrace:
    """The trace carried by ``h``'s messages; ``headers`` by (stream, sequence)."""
    out = MessageTrace(h.tenant, h.task_id)
    for e in h.entries:
        ctx = parse_traceparent(headers.get((e.stream, e.seq), {}).get(TRACEPARENT, ""))
        if ctx is None:
            out.untraced += 1
            continue
        cause = h.entries[e.cause] if e.cause is not None else None
        out.hops.append(Hop(e, *ctx, after_cause_s=(e.time - cause.time) if cause else None))
    return out


def render_messages(t: MessageTrace, *, width: int = 160) -> str:
    if not t.hops:
        return f"no traced message about {t.tenant}/{t.task_id}"
    ids = t.trace_ids
    t0 = min(h.entry.time for h in t.hops)
    lines = [
        f"trace of {t.tenant}/{t.task_id} from its messages: {len(t.hops)} spans in "
        + (f"trace {ids[0]}" if len(ids) == 1 else f"{len(ids)} traces ({', '.join(ids)}): a hop lost the context"),
        "",
        f"{'+S':>8} {'HOP':>8}  {'FROM':14} {'SPAN':16}  WHAT",
    ]
    for h in t.hops:
        e = h.entry
        hop = f"{h.after_cause_s * 1000:>6.1f}ms" if h.after_cause_s is not None else f"{'':>8}"
        other = "" if h.trace_id == ids[0] else f"  [trace {h.trace_id[:8]}]"
        line = f"{e.time - t0:>8.3f} {hop}  {e.sender[:14]:14} {h.span_id}  {'  ' * min(e.depth, 8)}{e.type}"
        lines.append((line + (f"  {e.summary}" if e.summary else "") + other)[:width])
    lines += ["", "time from cause to effect, by the service that produced the effect:"]
    for svc, s in t.by_service().items():
        lines.append(
            f"  {svc[:14]:14} {int(s['hops']):>4} hops  total {s['total_s'] * 1000:8.1f} ms  "
            f"median {s['median_s'] * 1000:7.1f} ms  max {s['max_s'] * 1000:7.1f} ms"
        )
    if t.untraced:
        lines.append(
            f"{t.untraced} stored message(s) outside the trace: sent without a trace context (an operator's "
            "control message, a client older than the trace) or dead letters (they keep the original's headers)"
        )
    return "\n".join(lines)


def messages_json(t: MessageTrace) -> dict[str, Any]:
    return {
        "tenant": t.tenant,
        "task_id": t.task_id,
        "source": "messages",
        "trace_ids": t.trace_ids,
        "spans": [
            {
                "trace_id": h.trace_id,
                "span_id": h.span_id,
                "sampled": h.sampled,
                "time": h.entry.time,
                "after_cause_s": h.after_cause_s,
                "depth": h.entry.depth,
                "service": h.entry.sender,
                "type": h.entry.type,
                "subject": h.entry.subject,
                "msg_id": h.entry.msg_id,
                "causation": h.entry.causation,
                "summary": h.entry.summary,
            }
            for h in t.hops
        ],
        "by_service": t.by_service(),
        "untraced": t.untraced,
    }


# --- a trace backend: Jaeger's query API ------------------------------------------------------


class BackendError(RuntimeError, MeshctlError):
    """The trace backend could not be asked or did not answer with a trace."""


@dataclass
class Span:
    span_id: str
    parent_id: str
    service: str
    name: str
    start_us: int
    duration_us: int
    kind: str
    error: bool
    children: list[Span] = field(default_factory=list)


def fetch_jaeger(base_url: str, trace_id: str, *, timeout_s: float = 10.0) -> list[Span]:
    """Every span of ``trace_id`` from a Jaeger query service (``GET /api/traces/<id>``)."""
    url = f"{base_url.rstrip('/')}/api/traces/{trace_id}"
    try:
        r = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot reach the trace backend at {base_url}: {exc}") from exc
    if r.status_code == 404:
        return []
    if r.status_code != 200:
        raise BackendError(f"the trace backend answered {r.status_code} for trace {trace_id}: {r.text[:200]}")
    try:
        data = r.json().get("data") or []
    except ValueError as exc:
        raise BackendError(f"the trace backend's answer is not JSON: {r.text[:200]}") from exc
    spans: list[Span] = []
    for trace in data:
        processes = trace.get("processes") or {}
        for s in trace.get("spans") or []:
            tags = {t.get("key"): t.get("value") for t in s.get("tags") or []}
            parent = next(
                (ref.get("spanID", "") for ref in s.get("references") or [] if ref.get("refType") == "CHILD_OF"), ""
            )
            spans.append(Span(
                span_id=s.get("spanID", ""), parent_id=parent,
                service=(processes.get(s.get("processID"), {}) or {}).get("serviceName", "?"),
                name=s.get("operationName", ""), start_us=int(s.get("startTime", 0)),
                duration_us=int(s.get("duration", 0)), kind=str(tags.get("span.kind", "")),
                error=bool(tags.get("error")) or tags.get("otel.status_code") == "ERROR",
            ))  # fmt: skip
    return spans


def tree(spans: list[Span]) -> list[Span]:
    """Nest ``spans`` under their parents; the roots (parent unknown or absent), by start time."""
    for s in spans:
        s.children = []
    by_id = {s.span_id: s for s in spans}
    roots: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start_us):
        parent = by_id.get(s.parent_id)
        (parent.children if parent is not None and parent is not s else roots).append(s)
    return roots


def render_spans(tenant: str, task_id: str, trace_ids: list[str], spans: list[Span], *, width: int = 160) -> str:
    if not spans:
        return f"the trace backend has no span of {tenant}/{task_id}'s trace {', '.join(trace_ids)}"
    t0 = min(s.start_us for s in spans)
    end = max(s.start_us + s.duration_us for s in spans)
    services = sorted({s.service for s in spans})
    lines = [
        f"trace of {tenant}/{task_id} from the trace backend: {len(spans)} spans, {len(services)} services, "
        f"{(end - t0) / 1000:.1f} ms ({', '.join(trace_ids)})",
        "",
        f"{'+MS':>9} {'DURATION':>10}  {'SERVICE':14} SPAN",
    ]

    def walk(s: Span, depth: int) -> None:
        flag = "  ERROR" if s.error else ""
        line = f"{(s.start_us - t0) / 1000:>9.1f} {s.duration_us / 1000:>8.1f}ms  {s.service[:14]:14} "
        lines.append((line + "  " * min(depth, 10) + s.name + flag)[:width])
        for c in s.children:
            walk(c, depth + 1)

    for root in tree(spans):
        walk(root, 0)
    busy: dict[str, int] = defaultdict(int)
    for s in spans:
        if s.kind in ("consumer", "server", "SPAN_KIND_CONSUMER", "SPAN_KIND_SERVER"):
            busy[s.service] += s.duration_us
    if busy:
        lines += ["", "time in handlers, by service: " + ", ".join(
            f"{svc} {us / 1000:.1f} ms" for svc, us in sorted(busy.items(), key=lambda kv: -kv[1]))]  # fmt: skip
    return "\n".join(lines)


def spans_json(tenant: str, task_id: str, trace_ids: list[str], spans: list[Span]) -> dict[str, Any]:
    def one(s: Span) -> dict[str, Any]:
        return {
            "span_id": s.span_id,
            "parent_id": s.parent_id,
            "service": s.service,
            "name": s.name,
            "kind": s.kind,
            "start_us": s.start_us,
            "duration_us": s.duration_us,
            "error": s.error,
            "children": [one(c) for c in s.children],
        }

    return {
        "tenant": tenant,
        "task_id": task_id,
        "source": "jaeger",
        "trace_ids": trace_ids,
        "spans": [one(r) for r in tree(spans)],
    }
