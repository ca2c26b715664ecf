"""Where a tenant's data lives, by data class: what a retention, an export or an erasure reaches.

Every stream subject carries the tenant as its third token (``<domain>.v<major>.<tenant>.…``)
and every per-task key-value record starts with it (or with its writer's name, then the
tenant), so one subject filter per place finds all of one tenant's data there, in a stream
shared with every other tenant. A data class is a set of such places with one retention: the
operator sets it per tenant (``meshctl tenant retention``), the keeper (``meshctl keeper``)
removes what is older, and ``meshctl tenant show`` says what is kept and until when.

The places are listed here, next to the topology they come from, so a new stream or bucket
that holds tenant data is a change to this file, and ``tests/contracts`` fails until it is
placed in a class or named as holding none.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh_contracts import topology as topo


@dataclass(frozen=True)
class Place:
    """Where some of one tenant's data is stored: a stream and a subject filter (``{t}``: the tenant)."""

    stream: str
    filter: str

    def of(self, tenant: str) -> str:
        return self.filter.format(t=tenant)


@dataclass(frozen=True)
class DataClass:
    name: str
    description: str
    domains: tuple[str, ...] = ()
    """Stream domains whose messages are of this class: the domain's stream, its copy in
    ENVELOPES (headers only) and its dead letters."""
    keys: tuple[tuple[str, str], ...] = ()
    """(bucket, key filter) pairs: key-value records of this class."""
    purgeable: bool = True
    """False: kept for the stream's own max_age whatever a tenant's retention (the audit chain
    refuses purges, by design: erasure shreds its payloads instead)."""

    def places(self) -> list[Place]:
        out = []
        for d in self.domains:
            out.append(Place(topo.STREAMS[d], f"{d}.*.{{t}}.>"))
            if d in topo.ENVELOPED:
                out.append(Place(topo.ENVELOPES, f"{d}.*.{{t}}.>"))
            out.append(Place(topo.DLQ_STREAM, f"{topo.DLQ_PREFIX}.*.{d}.*.{{t}}.>"))
        out += [Place(f"KV_{bucket}", f"$KV.{bucket}.{keys}") for bucket, keys in self.keys]
        return out


DATA_CLASSES: tuple[DataClass, ...] = (
    DataClass(
        "tasks",
        "task payloads: goals, plans, step outputs and checkpoints, retrievals, checks, progress events, "
        "recorded model calls",
        domains=("task", "step", "rag", "check", "event", "control"),
        keys=(
            ("tasks", "{t}.>"),
            ("steps", "{t}.>"),
            ("evidence", "{t}.>"),
            ("calls", "*.{t}.>"),
            ("ledger", "planner.{t}.>"),
            ("ledger", "worker.{t}.>"),
            ("ledger", "checker.{t}.>"),
        ),
    ),
    DataClass(
        "tools",
        "tool arguments and results, approval requests and decisions, the idempotency ledger of tool effects",
        domains=("tool", "approval"),
        keys=(("ledger", "tool-executor.{t}.>"),),
    ),
    DataClass(
        "usage",
        "token and cost usage: reservations, settlements, spend per task and per day",
        domains=("usage",),
        keys=(("budget", "usage.{t}.>"), ("budget", "tenant.{t}.>"), ("reservations", "{t}.>")),
    ),
    DataClass(
        "audit", "the tamper-evident audit chain of tool effects, approvals and trips", ("audit",), purgeable=False
    ),
)
CLASSES: dict[str, DataClass] = {c.name: c for c in DATA_CLASSES}

STATUS = Place("KV_status", "$KV.status.{t}.>")
"""Each task's status record (content-free: whether it may go on, its start, limits and labels):
kept as long as the longest-kept class of its tenant, since it is what stops a late redelivery of
any message about the task."""

NOT_TASK_DATA: dict[str, str] = {
    "workflows": "the tenant's workflow definitions: configuration, kept until the tenant removes them",
    "releases": "the tenant's releases of prompts, models and tool rules: configuration",
    "rag": "documents and their index: kept until removed or replaced (meshctl ingest)",
    "notes": "notes the tenant's tasks wrote with the notes tools: kept until removed",
    "admission": "the tenant's live admission counters",
    "quotas": "what the tenant stores, per stream: counters",
    "anchors": "the audit chain's anchors (lengths and hashes, no payload)",
    "approvals": "tool calls waiting for a person (keyed by approval id; a day's history)",
    "tenants": "the tenant's own settings (this retention)",
    "control": "kill switches",
    "tools": "the tool catalogue (no tenant data)",
    "toolservers": "the tenant's own tool servers (endpoints, names of secrets, approved definitions) and what "
    "they list: configuration, kept until the tenant removes them",
    "trust": "the trust bundle (public keys)",
    "status": "see STATUS",
}
"""Buckets no class purges, and why (``tests/contracts`` holds every bucket to a class or here)."""

MIN_RETENTION_S = 3600.0
"""The shortest retention a tenant may have for a class: an hour (a task that has not ended
keeps all of its data whatever the retention, see ``meshctl.keeper``)."""


# --- erasure (``meshctl tenant erase``) ---------------------------------------------------------

KEPT_ON_ERASURE: dict[str, str] = {
    topo.STREAMS["audit"]: "the tenant's audit chain, whole and verifiable by its hashes: the content fields of "
    "its links are sealed to the tenant's auditor key, which the erasure destroys (crypto-shredding)",
    "KV_anchors": "the chain's anchors: lengths and hashes, no payload (what proves the kept chain whole)",
    f"KV_{topo.TRUST_BUCKET}": "public keys; the tenant's auditor key is taken out of it",
    "KV_tools": "the tool catalogue: no tenant data",
}
"""What an erasure leaves, and why (every other place of the tenant is emptied)."""


def erasure_places() -> list[Place]:
    """Every place where a tenant's data may be, by subject filter: each class's (the chain's dead
    letters too, not the chain), the status records, every bucket but ``KEPT_ON_ERASURE`` (keyed
    ``<tenant>…`` or, in a shared bucket, ``<service>.<tenant>…``), the kill switch, the timers
    and the side-effect sinks. Approvals are keyed by id: found by their tenant field."""
    places = [p for c in DATA_CLASSES for p in c.places() if p.stream not in KEPT_ON_ERASURE] + [STATUS]
    places += [Place(topo.DLQ_STREAM, f"{topo.DLQ_PREFIX}.*.{d}.*.{{t}}.>") for d in [*topo.STREAMS, "timer"]]
    for b in topo.BUCKETS:
        if f"KV_{b.name}" in KEPT_ON_ERASURE:
            continue
        for prefix in [f"{s}." for s in b.per_service] or [""]:
            places += [Place(f"KV_{b.name}", f"$KV.{b.name}.{prefix}{{t}}"),
                       Place(f"KV_{b.name}", f"$KV.{b.name}.{prefix}{{t}}.>")]  # fmt: skip
    places.append(Place("KV_control", "$KV.control.kill.tenant.{t}"))
    places.append(Place(topo.TIMERS, "timer.*.{t}.>"))
    places += [Place(stream, f"{prefix}.{{t}}.>") for stream, (prefix, _) in topo.SINKS.items()]
    out: list[Place] = []
    for p in places:
        if p not in out:
            out.append(p)
    return out
