"""The declarative identity policy: NATS permissions for every principal.

Derived entirely from the contracts' producer/consumer declarations and the topology
(streams, durables, buckets), so adding a contract or a consumer changes permissions in
exactly one place. ``meshctl policy`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh_contracts import APPROVER, AUTHOR, CLIENT, SERVICES, Contract, lifecycle
from mesh_contracts import topology as topo
from mesh_contracts.registry import VERSIONS
from mesh_contracts.v1 import ApprovalDecided, AuditRecorded, ControlCancel, TaskSubmitted, TokenDelta
from mesh_kit.settings import inbox_prefix

ADMIN = "admin"
KEEPER = "keeper"
EDGE = "edge"
A2A = "a2a"


@dataclass
class Permissions:
    """Publish/subscribe allow-lists of one NATS user (everything else is denied)."""

    principal: str
    role: str
    tenant: str | None = None
    pub: list[str] = field(default_factory=list)
    sub: list[str] = field(default_factory=list)
    allow_responses: bool = False

    def add_pub(self, *subjects: str) -> None:
        self.pub += [s for s in subjects if s not in self.pub]

    def add_sub(self, *subjects: str) -> None:
        self.sub += [s for s in subjects if s not in self.sub]


def _contracts() -> list[tuple[int, type[Contract]]]:
    return [(major, c) for major, cs in VERSIONS.items() for c in cs]


def service_permissions(service: str) -> Permissions:
    """A service's NATS user: its own inbox, the messages it produces and serves, its durables,
    what it watches and reads, its doors, where it stores, its timers and its buckets."""
    p = Permissions(service, role=service)
    p.add_sub(f"{inbox_prefix(service)}.>")
    _message_rights(p, service)
    _durable_rights(p, service)
    _watch_rights(p, service)
    _door_rights(p, service)
    _store_rights(p, service)
    _timer_rights(p, service)
    _bucket_rights(p, service)
    return p


def _message_rights(p: Permissions, service: str) -> None:
    """Publish what it produces; take (and answer) the requests it serves."""
    for major, c in _contracts():
        s = c.spec
        if service in s.producers and s.transport in ("stream", "request", "core"):
            p.add_pub(f"{s.domain}.v{major}.*.*.{s.event}")
            if s.routed:  # and to any worker pool (its sixth token)
                p.add_pub(f"{s.domain}.v{major}.*.*.{s.event}.*")
        if service in s.consumers and s.transport == "request":
            p.add_sub(f"{s.domain}.*.*.*.{s.event}")
            p.allow_responses = True


def pool_permissions(pool: str) -> Permissions:
    """A worker pool's NATS user (``worker-<pool>``, issue 48): a worker's rights, except that it
    pulls from its pool's own durables (``topology.pool_durables``) and from no shared one."""
    shared = service_permissions(topo.POOLED)
    durables = {f".{d.stream}.{d.name}" for d in topo.durables_of(topo.POOLED)}
    p = Permissions(topo.pool_principal(pool), role=topo.POOLED)
    p.add_pub(*(s for s in shared.pub if not any(s.endswith(d) or f"{d}." in s for d in durables)))
    p.add_sub(*shared.sub)
    p.allow_responses = shared.allow_responses
    _durable_rights(p, topo.POOLED, pool)
    return p


def _durable_rights(p: Permissions, service: str, pool: str = "") -> None:
    """Pull from and acknowledge on its own durables, by name (no right to create one)."""
    for d in topo.pool_durables(pool) if pool else topo.durables_of(service):
        p.add_pub(
            f"$JS.API.CONSUMER.INFO.{d.stream}.{d.name}",
            f"$JS.API.CONSUMER.MSG.NEXT.{d.stream}.{d.name}",
            f"$JS.ACK.{d.stream}.{d.name}.>",
            f"$JS.ACK.*.*.{d.stream}.{d.name}.>",
        )


def _watch_rights(p: Permissions, service: str) -> None:
    """What it reads without a consumer: the streams it watches, the envelopes, the buckets it
    scans, follows or is fed, an audit chain's head, the store gauges and the control plane."""
    for domain in topo.WATCHERS.get(service, ()):
        # Whole streams in order, with batched direct gets (the budget's usage records), and how
        # far accounting has got (the reservation expiry horizon). No consumer-create right: on
        # NATS it is also the right to update any durable on the stream and to point a push
        # consumer at anybody's inbox.
        p.add_pub(f"$JS.API.DIRECT.GET.{topo.STREAMS[domain]}")
        p.add_sub(topo.watch_feed(topo.STREAMS[domain]))  # the stream republishes what it stores
    if service in topo.ENVELOPE_READERS:
        # Every task's messages without their bodies (the budget's monitor): a bare direct get on
        # ENVELOPES reads anything it holds, and it holds no content. No right on the streams
        # the envelopes come from: there a bare direct get reads every tenant's bodies.
        p.add_pub(f"$JS.API.DIRECT.GET.{topo.ENVELOPES}")
        p.add_sub(topo.watch_feed(topo.ENVELOPES))
    for b in topo.BUCKETS:
        if service in b.scanners:
            p.add_pub(*_scan(b.name))
        if service in b.followers:
            p.add_sub(f"$KV.{b.name}.>")
        if service in b.fed:
            p.add_sub(topo.watch_feed(f"KV_{b.name}"))  # the bucket republishes what it stores
    if service in AuditRecorded.spec.producers:
        # Appending to a tenant's audit chain: read its last record (a subject-form direct get,
        # which reads nothing but a chain's head), then publish under a compare-and-set on it.
        p.add_pub(f"$JS.API.DIRECT.GET.{topo.STREAMS['audit']}.{AuditRecorded.spec.domain}.v1.*.>")
    if service in topo.STORE_GAUGES:
        p.add_pub(*(f"$JS.API.STREAM.INFO.{s}" for s in [*topo.STREAMS.values(), topo.DLQ_STREAM]))
    if service in topo.CONTROL_OBSERVERS:
        p.add_sub("control.*.*.*.*")


def _door_rights(p: Permissions, service: str) -> None:
    """Keep its doors: take what a tenant's client sends, store what passes, answer the client."""
    if topo.doors_of(service):
        # Every stream's caps, to refuse a tenant whose tasks stored too much anywhere (the whole
        # quota book, counts and no content, it scans as the bucket's scanner).
        p.add_pub(*(f"$JS.API.STREAM.INFO.{s}" for s in [*topo.STREAMS.values(), topo.DLQ_STREAM]))
    for door in topo.doors_of(service):
        # Keep the door (queue group), store what passes on the stream subject, answer the client,
        # and read the stream's caps and max_age (its tenants' quotas are shares of them).
        p.add_sub(door.pattern)
        s = door.contract.spec
        p.add_pub(
            *(
                f"{s.domain}.v{major}.*.*.{s.event}"
                for major, c in _contracts()
                if (c.spec.domain, c.spec.event) == (s.domain, s.event)
            )
        )
        p.add_pub(f"$JS.API.STREAM.INFO.{door.stream}")
        p.allow_responses = True


def _store_rights(p: Permissions, service: str) -> None:
    """Its dead letters and the sinks it writes, and the caps of every stream it stores in."""
    # The caps and max_age of the DLQ and of every stream it stores messages in: what it stores for
    # a tenant (its dead letters too) counts against the tenant's quota there, a share of them.
    p.add_pub(f"$JS.API.STREAM.INFO.{topo.DLQ_STREAM}")
    p.add_pub(*sorted({f"$JS.API.STREAM.INFO.{topo.STREAMS[c.spec.domain]}" for _, c in _contracts()
                       if service in c.spec.producers and c.spec.transport == "stream"}))  # fmt: skip
    p.add_pub(topo.dlq_subject(service, ">"))
    for prefix, writer in topo.SINKS.values():
        if service == writer:
            p.add_pub(f"{prefix}.>")


def _timer_rights(p: Permissions, service: str) -> None:
    """The timer keeper's: store a wake-up's schedule (never a wake-up itself: the broker fires
    those), take the fired ones from its durable."""
    if service != topo.TIMER_KEEPER:
        return
    timer = topo.TIMER_DURABLE
    p.add_pub(
        topo.timer_subject("*", "*", "*", "at"),
        f"$JS.API.CONSUMER.INFO.{topo.TIMERS}.{timer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{topo.TIMERS}.{timer}",
        f"$JS.ACK.{topo.TIMERS}.{timer}.>",
        f"$JS.ACK.*.*.{topo.TIMERS}.{timer}.>",
    )


def _bucket_rights(p: Permissions, service: str) -> None:
    """Write the buckets it owns, read those it may (by key, from the leader, or its own keys)."""
    for b in topo.BUCKETS:
        # Buckets are bound without STREAM.INFO (``state.bind``): with a subjects filter it lists
        # every key, so only a bucket's writer, who holds every key anyway, may ask for it.
        if service == b.writer:
            p.add_pub(f"$JS.API.STREAM.INFO.KV_{b.name}", f"$JS.API.DIRECT.GET.KV_{b.name}.>", f"$KV.{b.name}.>")
        if service in b.readers:
            p.add_pub(f"$JS.API.DIRECT.GET.KV_{b.name}.>")
        if service in b.leader_readers:
            p.add_pub(f"$JS.API.STREAM.MSG.GET.KV_{b.name}")
        if service in b.per_service:  # its own key prefix only
            p.add_pub(f"$JS.API.DIRECT.GET.KV_{b.name}.$KV.{b.name}.{service}.>", f"$KV.{b.name}.{service}.>")


def _scan(bucket: str) -> tuple[str, ...]:
    """Read a whole bucket: direct gets by key, and by sequence or as current values (the request
    body says which, on the bare subject). No consumers."""
    stream = f"KV_{bucket}"
    return (f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.DIRECT.GET.{stream}")


def client_permissions(tenant: str) -> Permissions:
    """A tenant's client: submit and control its own tasks (at their doors: it writes to no
    stream), read only its own events."""
    name = f"{CLIENT}.{tenant}"
    p = Permissions(name, role=CLIENT, tenant=tenant)
    p.add_sub(f"{inbox_prefix(name)}.>")
    for major, c in _contracts():
        s = c.spec
        if {CLIENT, AUTHOR} & set(s.producers) and s.transport == "stream":
            # (an author's change travels over the tenant's client connection, signed by the author)
            # Never onto a stream: through the contract's door, which keeps the tenant's quota.
            p.add_pub(topo.door_subject(f"{s.domain}.v{major}.{tenant}.*.{s.event}"))
        elif CLIENT in s.producers:
            p.add_pub(f"{s.domain}.v{major}.{tenant}.*.{s.event}")
        if CLIENT in s.consumers:
            # The whole domain for its own tenant, so it can follow one task with ``<domain>.*.<tenant>.<task>.>``.
            p.add_sub(f"{s.domain}.*.{tenant}.>")
    # Catch up on what it missed (last result of a task) without consumer rights.
    for domain in ("task", "event"):
        p.add_pub(f"$JS.API.DIRECT.GET.{topo.STREAMS[domain]}.{domain}.*.{tenant}.>")
    # Its own keys of the buckets it may read them in (the workflow registry), one key per read.
    for b in topo.BUCKETS:
        if b.tenant_keys:
            p.add_pub(f"$JS.API.DIRECT.GET.KV_{b.name}.$KV.{b.name}.{tenant}.>")
    return p


def edge_permissions() -> Permissions:
    """The edge (``services/edge``, the HTTP gateway): what a tenant's client needs to submit,
    cancel and follow a task, for every tenant (it speaks for the tenants whose client keys it
    holds; the door checks each message's token, so a tenant it holds no key of gets nothing in
    through it), and reading a task's stored events in order (direct gets by subject, on the bare
    API subject: a browser that reconnects resumes where it was); a person's approval decisions,
    signed with that person's key, which the edge holds only for the approvers a tenant gave it."""
    return _gateway_permissions(EDGE)


def _gateway_permissions(name: str) -> Permissions:
    """An HTTP gateway's rights (the edge's, the A2A gateway's): a tenant's client's, for every tenant."""
    p = Permissions(name, role=name)
    p.add_sub(f"{inbox_prefix(name)}.>")
    p.add_pub(
        topo.door_subject(f"{TaskSubmitted.spec.domain}.v1.*.*.{TaskSubmitted.spec.event}"),
        topo.door_subject(f"{ControlCancel.spec.domain}.v1.*.*.{ControlCancel.spec.event}"),
        # a person's decision on a call of their tenant, signed with their own approver key (the
        # tool-executor believes it for that tenant only), and the approval it decides
        f"{ApprovalDecided.spec.domain}.v1.*.*.{ApprovalDecided.spec.event}",
        "$JS.API.DIRECT.GET.KV_approvals.$KV.approvals.>",
    )
    for domain in ("task", "event", "approval"):
        p.add_pub(f"$JS.API.DIRECT.GET.{topo.STREAMS[domain]}", f"$JS.API.DIRECT.GET.{topo.STREAMS[domain]}.>")
        p.add_sub(f"{domain}.*.*.>")
    p.add_sub(f"{TokenDelta.spec.domain}.*.*.>")
    return p


def a2a_permissions() -> Permissions:
    """The A2A gateway (``services/a2a``): the edge's rights (it submits, cancels and follows its
    callers' tasks as their tenants, and hands on their decisions on held calls), and reading a
    tenant's workflow registry one key at a time (which workflows it exposes as agents: what a
    tenant's client reads of its own)."""
    p = _gateway_permissions(A2A)
    p.add_pub("$JS.API.DIRECT.GET.KV_workflows.$KV.workflows.>")
    return p


def approver_permissions() -> Permissions:
    p = Permissions(APPROVER, role=APPROVER)
    p.add_sub(f"{inbox_prefix(APPROVER)}.>")
    for major, c in _contracts():
        s = c.spec
        if APPROVER in s.producers:
            p.add_pub(f"{s.domain}.v{major}.*.*.{s.event}")
        if APPROVER in s.consumers:
            p.add_sub(f"{s.domain}.*.*.*.{s.event}")
    for b in topo.BUCKETS:
        if APPROVER in b.scanners:
            p.add_pub(*_scan(b.name))
    return p


def keeper_permissions() -> Permissions:
    """The data keeper (``meshctl keeper``): removes each tenant's data older than its retention.
    It reads the tenants' settings and which of their tasks have not ended, finds where a
    tenant's kept data begins in each place (a direct get at a time) and purges what is before
    it. It publishes no message, writes no record, holds no consumer, and cannot purge the audit
    chain (which refuses purges anyway)."""
    p = Permissions(KEEPER, role=KEEPER)
    p.add_sub(f"{inbox_prefix(KEEPER)}.>")
    places = {pl.stream for c in lifecycle.DATA_CLASSES if c.purgeable for pl in c.places()}
    for stream in sorted(places | {lifecycle.STATUS.stream, "KV_approvals"}):
        p.add_pub(f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.PURGE.{stream}", f"$JS.API.DIRECT.GET.{stream}")
    for bucket in ("tenants", "admission", "status", "approvals"):
        p.add_pub(*_scan(bucket))
    # What it removed goes on the tenant's audit chain (a ``retention.removed`` record).
    p.add_pub(f"{AuditRecorded.spec.domain}.v1.*.*.{AuditRecorded.spec.event}")
    p.add_pub(f"$JS.API.DIRECT.GET.{topo.STREAMS['audit']}.{AuditRecorded.spec.domain}.v1.*.>")
    return p


def admin_permissions() -> Permissions:
    """Provisioning and operations only; services never hold these credentials."""
    return Permissions(ADMIN, role=ADMIN, pub=[">"], sub=[">"])


def policy(tenants: list[str], pools: list[str] | tuple[str, ...] = ()) -> dict[str, Permissions]:
    out = {s: service_permissions(s) for s in SERVICES}
    out.update({topo.pool_principal(pool): pool_permissions(pool) for pool in pools})
    out.update({f"{CLIENT}.{t}": client_permissions(t) for t in tenants})
    out[APPROVER] = approver_permissions()
    out[KEEPER] = keeper_permissions()
    out[EDGE] = edge_permissions()
    out[A2A] = a2a_permissions()
    out[ADMIN] = admin_permissions()
    return out
