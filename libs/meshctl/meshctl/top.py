"""``meshctl top``: a live view of the mesh in the terminal, refreshed every few seconds.

Everything comes from NATS as the admin, so it works against any deployment: per tenant the
tasks in flight and the submissions refused (admission's record), running and queued (the
budget's view: ``budget.status``, a signed request any budget replica answers), done and failed
(the TASK stream's subjects), approvals waiting and today's spend (KV ``budget``), and that
spend by model; per service the backlog and in-flight messages of its durables and the messages
it handled per second since the last frame; the budget's breaker trips; dead letters. On a local mesh (``meshctl up``) it adds
each service's readiness (its ``/status``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx
import nats
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from mesh_contracts import topology as topo
from mesh_contracts.v1 import BudgetStatusReport
from mesh_contracts.v1.records import AdmissionRecord
from meshctl import budget as spend
from meshctl.ask import AskError

OUTCOMES = ("completed", "failed", "rejected")


class DurableRow(TypedDict):
    """One durable in a frame: its service, and its counts from the server's consumer info."""

    service: str
    pending: int
    in_flight: int
    redelivered: int
    delivered: int


@dataclass
class Frame:
    at: float
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    durables: dict[str, DurableRow] = field(default_factory=dict)
    models: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Today's spend per tenant, then per ``provider/model``: calls, tokens, cost."""
    trips: dict[str, int] = field(default_factory=dict)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    """Each endpoint of the tenants' tool servers as the tool-executor last saw it (KV ``toolservers``)."""
    dlq: int = 0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _tenant(frame: Frame, name: str) -> dict[str, Any]:
    return frame.tenants.setdefault(
        name,
        {"in_flight": 0, "running": 0, "queued": 0, "queued_s": 0.0, "completed": 0, "failed": 0, "rejected": 0,
         "refused": 0, "approvals_waiting": 0, "cost_usd": 0.0, "tokens": 0},
    )  # fmt: skip


Asker = Callable[[Any], Awaitable[BudgetStatusReport | None]]


async def _scan(nc: NATS, bucket: str, keys: str) -> dict[str, dict[str, Any]]:
    """The bucket's current records whose keys match ``keys``; none if the mesh has no such
    bucket (provisioned before it existed)."""
    try:
        await nc.jetstream().key_value(bucket)
    except NotFoundError:
        return {}
    return await spend.scan(nc, bucket, keys, timeout=2.0)


async def gather(
    nc: NATS, prev: Frame | None = None, health: dict[str, str] | None = None, budget: Asker | None = None
) -> Frame:
    """One frame. ``health``: service -> its local ``/status`` URL (a mesh of ``meshctl up``);
    ``budget``: asks the budget service what it sees (``meshctl.ask.budget_status``)."""
    js = nc.jetstream()
    frame = Frame(time.time())
    for d in topo.durables():
        try:
            info = await js.consumer_info(d.stream, d.name, timeout=2.0)
        except (nats.errors.TimeoutError, NotFoundError):
            frame.notes.append(f"durable {d.name} did not answer")
            continue
        frame.durables[d.name] = {
            "service": d.service,
            "pending": info.num_pending or 0,
            "in_flight": info.num_ack_pending or 0,
            "redelivered": info.num_redelivered or 0,
            "delivered": info.delivered.consumer_seq or 0 if info.delivered else 0,
        }
    window = frame.at - prev.at if prev else 0.0
    for name, row in frame.durables.items():
        svc = frame.services.setdefault(
            str(row["service"]), {"pending": 0, "in_flight": 0, "redelivered": 0, "per_s": 0.0}
        )
        svc["pending"] += row["pending"]
        svc["in_flight"] += row["in_flight"]
        svc["redelivered"] += row["redelivered"]
        if prev and window > 0 and name in prev.durables:
            svc["per_s"] += max(0, row["delivered"] - prev.durables[name]["delivered"]) / window
    admission = await _scan(nc, AdmissionRecord.bucket, ">")
    for tenant, rec in admission.items():
        # Every refusal once, by code (as the dashboard shows it). ``rejected`` below counts the
        # tasks with a stored ``task.rejected``: the same refusals again (a planner's refusal is
        # both), and a task resubmitted after one still has it, so the two are never added.
        t = _tenant(frame, tenant)
        t["in_flight"] = len(rec.get("in_flight") or {})
        t["refused"] = sum((rec.get("refused") or {}).values())
    try:
        report = await budget(nc) if budget is not None else None
    except AskError as exc:
        report = None
        frame.notes.append(str(exc))
        budget = None  # noted: not "no answer"
    if report is not None:
        for tenant, seen in report.tenants.items():
            t = _tenant(frame, tenant)
            t["running"], t["queued"], t["queued_s"] = seen.running, seen.queued, seen.queued_s
        frame.trips = dict(report.trips)
    elif budget is not None:
        frame.notes.append("no budget replica answered budget.status: running, queued and trips unknown")
    for event in OUTCOMES:
        info = await js.stream_info(topo.STREAMS["task"], subjects_filter=f"task.*.*.*.{event}")
        for subject in info.state.subjects or {}:
            _tenant(frame, subject.split(".")[2])[event] += 1
    day = spend.today()
    days = await _scan(nc, spend.BUCKET, spend.day_key("*", day))
    for rec in days.values():
        tenant = str(rec.get("tenant", "?"))
        t = _tenant(frame, tenant)
        total = rec.get("total") or {}
        t["cost_usd"] = float(total.get("cost_usd", 0.0))
        t["tokens"] = int(total.get("input_tokens", 0)) + int(total.get("output_tokens", 0))
        frame.models[tenant] = {
            model: {"calls": int(u.get("calls", 0)), "cost_usd": float(u.get("cost_usd", 0.0)),
                    "tokens": int(u.get("input_tokens", 0)) + int(u.get("output_tokens", 0))}
            for model, u in (rec.get("by_model") or {}).items()
        }  # fmt: skip
    approvals = await _scan(nc, "approvals", ">")
    for rec in approvals.values():
        if rec.get("status") == "pending":
            _tenant(frame, str(rec.get("tenant", "?")))["approvals_waiting"] += 1
    await _tool_servers(nc, frame)
    try:
        frame.dlq = (await js.stream_info(topo.DLQ_STREAM)).state.messages
    except NotFoundError:
        frame.dlq = 0
    if health:
        await _health(frame, health)
    return frame


async def _tool_servers(nc: NATS, frame: Frame) -> None:
    """Each endpoint of the tenants' tool servers as the tool-executor last saw it (KV ``toolservers``)."""
    for key, state in sorted((await _scan(nc, "toolservers", "*.state.*")).items()):
        tenant, server = str(state.get("tenant", key.split(".")[0])), str(state.get("server", "?"))
        suspended = sum(1 for t in state.get("tools") or [] if t.get("status") == "suspended")
        for e in state.get("endpoints") or []:
            frame.endpoints.append({"tenant": tenant, "server": server, "suspended": suspended, **e})
        if state.get("error"):
            frame.notes.append(f"tool server {tenant}/{server}: {str(state['error'])[:200]}")


async def _health(frame: Frame, health: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=1.0) as client:
        for name, url in health.items():
            service = name.rsplit("-", 1)[0] if name[-1:].isdigit() else name
            svc = frame.services.setdefault(service, {"pending": 0, "in_flight": 0, "redelivered": 0, "per_s": 0.0})
            try:
                status = (await client.get(url)).json()
            except (httpx.HTTPError, ValueError):
                status = {"ready": False}
            svc["replicas"] = svc.get("replicas", 0) + 1
            svc["ready"] = svc.get("ready", 0) + (1 if status.get("ready") else 0)


Restarts = Callable[[], dict[str, tuple[int, str]]]
"""A local mesh's processes by name: (restarts by its supervisor, state: ``running``, ``restarting``,
``crash-looping``), read afresh for each frame."""


def add_restarts(frame: Frame, restarts: dict[str, tuple[int, str]]) -> None:
    for name, (count, state) in restarts.items():
        service = name.rsplit("-", 1)[0] if name[-1:].isdigit() else name
        svc = frame.services.setdefault(service, {"pending": 0, "in_flight": 0, "redelivered": 0, "per_s": 0.0})
        svc["restarts"] = svc.get("restarts", 0) + count
        if state != "running":
            svc["state"] = state


def render(frame: Frame, interval: float | None = None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(frame.at))
    every = f" (every {interval:g} s; Ctrl-C to quit)" if interval else ""
    lines = [f"AgentMesh top: {when}{every}", ""]
    lines.append(f"{'TENANT':14} {'IN FLIGHT':>9} {'RUNNING':>7} {'QUEUED':>6} {'DONE':>6} {'FAILED':>6} "
                 f"{'REFUSED':>7} {'APPROVALS':>9} {'TOKENS TODAY':>12} {'SPEND TODAY':>12}")  # fmt: skip
    for name, t in sorted(frame.tenants.items()):
        lines.append(
            f"{name[:14]:14} {t['in_flight']:>9} {t['running']:>7} {t['queued']:>6} {t['completed']:>6} "
            f"{t['failed']:>6} {t['refused']:>7} {t['approvals_waiting']:>9} {t['tokens']:>12,} "
            f"{'$' + format(t['cost_usd'], '.4f'):>12}"
        )
    if not frame.tenants:
        lines.append("(no tenant has submitted anything)")
    restarts = any("restarts" in s for s in frame.services.values())  # a supervised local mesh
    lines += ["", f"{'SERVICE':14} {'READY':>7} {'BACKLOG':>8} {'IN FLIGHT':>9} {'MSGS/S':>7} {'REDELIVERED':>11}"
              + ("  RESTARTS" if restarts else "")]  # fmt: skip
    for name, s in sorted(frame.services.items()):
        ready = f"{s['ready']}/{s['replicas']}" if "replicas" in s else "-"
        again = f"  {s.get('restarts', '-'):>8}" + (f" {s['state']}" if "state" in s else "") if restarts else ""
        lines.append(
            f"{name[:14]:14} {ready:>7} {s['pending']:>8} {s['in_flight']:>9} {s['per_s']:>7.1f} {s['redelivered']:>11}"
            + again
        )
    if frame.models:
        lines += ["", f"{'TENANT':14} {'MODEL (TODAY)':30} {'CALLS':>6} {'TOKENS':>10} {'SPEND':>10}"]
        for tenant, models in sorted(frame.models.items()):
            for model, m in sorted(models.items(), key=lambda kv: -kv[1]["cost_usd"]):
                lines.append(
                    f"{tenant[:14]:14} {model[:30]:30} {int(m['calls']):>6} {int(m['tokens']):>10,} "
                    f"{'$' + format(m['cost_usd'], '.4f'):>10}"
                )
    if frame.endpoints:
        lines += ["", f"{'TOOL SERVER':22} {'ENDPOINT':34} {'HEALTH':>6} {'BREAKER':>9} {'IN FLIGHT':>9} {'CALLS':>6} "
                  f"{'FAILED':>6} {'FAILOVER':>8} {'LATENCY':>8}"]  # fmt: skip
        for e in frame.endpoints:
            lines.append(
                f"{(e['tenant'] + '/' + e['server'])[:22]:22} {str(e.get('url', ''))[-34:]:34} "
                f"{'up' if e.get('healthy') else 'DOWN':>6} {e.get('breaker', '?'):>9} {e.get('in_flight', 0):>9} "
                f"{e.get('calls', 0):>6} {e.get('failures', 0):>6} {e.get('failovers', 0):>8} "
                f"{format(float(e.get('latency_ms', 0.0)), '.0f') + ' ms':>8}"
            )
    trips = ", ".join(f"{k} {v}" for k, v in sorted(frame.trips.items())) or "none"
    lines += ["", f"budget breakers tripped (since the budget started): {trips}", f"dead letters: {frame.dlq}"]
    lines += [f"note: {n}" for n in frame.notes]
    return "\n".join(lines)


async def run(
    connect: Any,
    interval: float,
    once: bool,
    health: dict[str, str] | None,
    out: Any,
    budget: Asker | None = None,
    restarts: Restarts | None = None,
) -> Frame:
    nc = await connect()
    prev: Frame | None = None

    async def look(prev: Frame | None) -> Frame:
        frame = await gather(nc, prev, health, budget)
        if restarts is not None:
            add_restarts(frame, restarts())
        return frame

    try:
        if once:  # two looks a second apart: the rates need an interval
            first = await gather(nc)
            await asyncio.sleep(1.0)
            return await look(first)
        while True:
            frame = await look(prev)
            out.write("\x1b[2J\x1b[H" + render(frame, interval) + "\n")
            out.flush()
            prev = frame
            await asyncio.sleep(interval)
    finally:
        await nc.close()
