"""Streams, durable consumers and KV buckets, derived from the contract declarations.

Provisioning (``meshctl provision``), the NATS permission policy and every service's
subscriptions read this module, so a contract's ``producers``/``consumers`` are the
only place where "who talks to whom" is written down.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh_contracts.base import AUTHOR, CLIENT, SERVICES, Contract
from mesh_contracts.registry import VERSIONS

# One stream per domain; it spans every major version of that domain.
STREAMS: dict[str, str] = {
    "task": "TASK",
    "step": "STEP",
    "tool": "TOOL",
    "rag": "RAG",
    "check": "CHECK",
    "usage": "USAGE",
    "control": "CONTROL",
    "approval": "APPROVAL",
    "event": "EVENTS",
    "audit": "AUDIT",
}
DLQ_STREAM = "DLQ"
DLQ_PREFIX = "dlq"
DOOR_PREFIX = "door"


def dlq_subject(service: str, original_subject: str) -> str:
    """Where ``service`` dead-letters a message that arrived on ``original_subject``."""
    return f"{DLQ_PREFIX}.{service}.{original_subject}"


@dataclass(frozen=True)
class Durable:
    """A pre-provisioned durable pull consumer shared by all replicas of one service."""

    service: str
    stream: str
    name: str
    filter_subject: str
    contract: type[Contract]


@dataclass(frozen=True)
class Door:
    """Where a tenant's client hands in a message it may not store itself.

    Tenants hold no right to publish onto any stream: NATS caps a stream as a whole, an exact
    subject or an account, never one tenant's share of a stream that every tenant writes to,
    so a tenant publishing there directly could fill it for everyone (issue 36). A client sends
    a core request to ``door.<subject>`` instead; the service that consumes the contract keeps
    the door (queue group ``<service>-door``): it checks the message and the tenant's quota, stores
    it on ``<subject>`` and answers with the stream's acknowledgement (``mesh_tenancy.door``)."""

    service: str
    stream: str
    contract: type[Contract]
    pattern: str
    """What the service subscribes to: every major version of the contract (``door.task.*.*.*.submitted``)."""


def door_subject(subject: str) -> str:
    """The door a client sends a message for ``subject`` to."""
    return f"{DOOR_PREFIX}.{subject}"


def stored_subject(door: str) -> str:
    """The stream subject a message handed in at ``door`` is stored on."""
    return door.removeprefix(f"{DOOR_PREFIX}.")


def doors() -> list[Door]:
    """One door per contract a tenant's client produces onto a stream, kept by its consumer."""
    seen: dict[str, Door] = {}
    for c in stream_contracts():
        if not {CLIENT, AUTHOR} & set(c.spec.producers):  # an author's change travels over the client's connection
            continue
        keepers = [s for s in c.spec.consumers if s in SERVICES]
        if not keepers:
            raise LookupError(f"{c.type_name()} is written by clients and consumed by no service: no door keeper")
        pattern = f"{DOOR_PREFIX}.{c.spec.domain}.*.*.*.{c.spec.event}"
        seen.setdefault(pattern, Door(keepers[0], STREAMS[c.spec.domain], c, pattern))
    return list(seen.values())


def doors_of(service: str) -> list[Door]:
    return [d for d in doors() if d.service == service]


def door_of(contract: type[Contract]) -> Door | None:
    """The door ``contract`` is handed in at, or None (not written by clients)."""
    for d in doors():
        if (d.contract.spec.domain, d.contract.spec.event) == (contract.spec.domain, contract.spec.event):
            return d
    return None


def door_streams() -> list[str]:
    """Streams a tenant's messages are stored in (through a door): what a tenant's quota bounds."""
    return sorted({d.stream for d in doors()})


@dataclass(frozen=True)
class Bucket:
    """A JetStream KV bucket with one writer service and read-only services.

    A bucket with ``per_service`` set is shared: each listed service may read and write only
    keys that start with its own name (``<service>.<...>``), which the permissions enforce.
    """

    name: str
    writer: str = ""
    readers: tuple[str, ...] = ()
    history: int = 5
    description: str = ""
    per_service: tuple[str, ...] = ()
    ttl_s: float = 0.0
    records: bool = False
    """Per-task records (a task's record, its steps' checkpoints, its status): kept as long as
    ``meshctl provision --record-retention-days`` says (0, the default: until deleted)."""
    scanners: tuple[str, ...] = ()
    """Principals that may read the whole bucket, in order or as its current values (direct gets
    by sequence and ``multi_last``; no consumer), e.g. to see every pending approval."""
    followers: tuple[str, ...] = ()
    """Principals told of every write at once on a core subscription to ``$KV.<bucket>.>`` (a
    doorbell: they read the entry they are told of, and re-read it now and then)."""
    leader_readers: tuple[str, ...] = ()
    """Principals that may also read a key from the stream's leader (``$JS.API.STREAM.MSG.GET``,
    last by subject): a read that sees every acknowledged write, where a direct get may be
    answered by a replica still catching up (a node that just rejoined its cluster)."""
    tenant_keys: bool = False
    """Each tenant's client reads its own tenant's keys (``<tenant>.…``), one key per read (a direct
    get by subject: no whole-bucket read, which would not be bounded to its keys)."""
    fed: tuple[str, ...] = ()
    """Principals that subscribe to the bucket's republished feed (``watch_feed("KV_<bucket>")``):
    every write the bucket stored, with its revision and the key's previous revision, so a
    reader keeps the keys it read current without reading them again (``mesh_durable.view``)."""
    synced: bool = True
    """Each write synced to disk before the broker acknowledges it (``sync_interval: always``).
    False: written back asynchronously (``persist_mode: async``, single-replica meshes): for what a
    broker crash may lose the last second of without losing work, an effect or money promised."""


TRUST_BUCKET = "trust"
CALLS_BUCKET = "calls"
TRUST_KEY = "bundle"

BUCKETS: tuple[Bucket, ...] = (
    Bucket(
        "tasks",
        writer="planner",
        readers=("tool-executor",),  # the task's policy (the budget reads the content-free status record)
        records=True,
        description="Task records: plan, step states, status (CAS on revision).",
    ),
    Bucket(
        "status",
        writer="planner",
        readers=("worker", "checker", "rag", "tool-executor", "budget"),
        leader_readers=("budget",),  # a task's start, limits and labels, before its first reservation
        fed=SERVICES,  # every service's guard (the planner's too)
        records=True,
        description="Whether a task may go on (key <tenant>.<task>: started, halted, ended or resumed, and why), "
        "with its start time, limits and labels and nothing of its content: what every service's guard reads "
        "before a model or tool call, and what the budget knows of a task.",
    ),
    Bucket(
        "evidence",
        writer="planner",
        history=1,
        ttl_s=30 * 24 * 3600.0,
        description="The retrieval records each step attempt read, as rag signed them (key "
        "<tenant>.<task>.<step>.<attempt>): the planner puts them in the check request. No other reader.",
    ),
    Bucket(
        "admission",
        writer="planner",
        history=1,
        scanners=("planner",),  # every replica's view of the run slots all tenants hold (MESH_RUN_SLOTS) ...
        fed=("planner",),  # ... kept current
        description="Per tenant (key <tenant>): the tasks the planner admitted that have not ended (and which hold "
        "a run slot), the tenant's submission token bucket and its admitted/refused counts (compare-and-set). "
        "meshctl status reads it.",
    ),
    Bucket(
        "workflows",
        writer="planner",
        readers=("worker",),  # the agent profile version a step runs
        history=5,
        tenant_keys=True,
        description="The registry of what a tenant runs: its workflow versions (key <tenant>.wf.<name>.<version>: the "
        "definition, immutable, and its status) and catalogue (key <tenant>.catalog: every version of each "
        "workflow in publication order), and its agent profiles (key <tenant>.agent.<name>.<version>: a profile, "
        "immutable; <tenant>.agents: each profile's current version and changes). A tenant's client reads its own "
        "keys (direct gets by key).",
    ),
    Bucket(
        "releases",
        writer="planner",
        readers=("worker", "checker", "tool-executor"),
        history=5,
        tenant_keys=True,
        fed=("planner",),  # every replica sees a canary start, end or rollback within milliseconds
        description="Each tenant's releases of behaviour (issue 41): every version (key <tenant>.v.<version>: the "
        "bundle of prompts, model routes and tool rules, immutable, its evaluations and story) and the channel (key "
        "<tenant>.channel: the current version, a canary with its share, its sequential test and live signals). "
        "The services read the version each task runs; a tenant's client reads its own keys.",
    ),
    Bucket("steps", writer="worker", records=True, description="Agent-loop checkpoints, one key per step."),
    Bucket(
        "anchors",
        writer="budget",
        history=64,
        description="Audit chain anchors, one key per tenant: the budget's signed statement of a chain's length "
        "and head hash, written now and then. meshctl audit verify holds the chain to them (a cut tail shows).",
    ),
    Bucket("budget", writer="budget", description="Settled spend per task and per tenant-day, breaker trips."),
    Bucket(
        "reservations",
        writer="budget",
        history=1,
        ttl_s=24 * 3600.0,
        scanners=("budget",),  # a rebuilt view reads the holds granted in the last ttl, in batches
        description="Reservations, one key per call (<tenant>.<task>.<call>), kept a day: the durable copy of "
        "the budget's Redis view, so a lost Redis never forgets money promised to a call in flight (a "
        "settled one is known by its task's record in the budget bucket).",
    ),
    Bucket(
        "control",
        writer="",  # operators only (admin identity, ``meshctl kill-switch``)
        readers=SERVICES,
        fed=SERVICES,  # the guard's view
        history=10,
        description="Kill switches: kill.global and kill.tenant.<tenant>. Every service checks them "
        "before each model or tool call.",
    ),
    Bucket(
        "tenants",
        writer="",  # operators only (admin identity, ``meshctl tenant add | suspend | resume | retention | remove``)
        readers=SERVICES,  # a tenant's record, read when a service first meets the tenant
        followers=SERVICES,  # and every later write of it, at once
        history=10,
        description="The tenant registry (key <tenant>), each record signed by an operator: a tenant added at "
        "runtime's keys, its status (active, suspended), its admission limits and its retention per data class. "
        "Every service reads a tenant's record when it first meets the tenant and follows it; the keeper "
        "(meshctl keeper) removes each tenant's data older than its retention.",
    ),
    Bucket(
        "approvals",
        writer="tool-executor",
        history=5,
        scanners=("tool-executor", "approver"),
        followers=("tool-executor",),  # every replica learns of a new or decided approval at once
        description="Tool calls waiting for a human and their decisions, one key per approval id: a "
        "restart of the tool-executor loses no wait; approvers list and read them here.",
    ),
    Bucket(
        "tools",
        writer="tool-executor",
        readers=("worker", "planner"),
        history=1,
        description="The tool catalogue (key: catalogue): every tool's schema, risk class and policy, "
        "built-ins and mounted MCP tools, as the tool-executor serves them.",
    ),
    Bucket(
        "toolservers",
        writer="tool-executor",
        readers=("worker", "planner"),
        history=10,
        tenant_keys=True,
        scanners=("tool-executor",),  # every replica mounts every tenant's servers at start ...
        followers=("tool-executor",),  # ... and each change at once
        description="Each tenant's own tool servers (issue 44): the server (key <tenant>.server.<name>: endpoints, "
        "auth by mounted secret names, rules, the approved definitions of its tools, a version per change), what "
        "it lists and how its replicas are (<tenant>.state.<name>) and the tools the tenant's tasks may use "
        "(<tenant>.catalogue). A tenant's client reads its own keys.",
    ),
    Bucket(
        "notes",
        writer="tool-executor",
        scanners=("tool-executor",),  # note_list reads the tenant's keys
        history=5,
        description="Tenant-scoped notes written by the notes tools (<tenant>.<note>).",
    ),
    Bucket(
        "rag",
        writer="rag",
        history=1,
        description="Per-tenant retrieval indexes: a manifest per tenant (<tenant>.manifest) and each "
        "document version's chunks and embeddings (<tenant>.doc.<doc hash>.<version>.<part>); every rag "
        "replica loads a tenant's index from here.",
    ),
    Bucket(
        TRUST_BUCKET,
        writer="",  # operators only (admin identity: meshctl up, rotate, revoke)
        readers=SERVICES,
        followers=SERVICES,
        history=5,
        description="The trust bundle as the operator last published it (key: bundle), signed by an operator: "
        "every service follows it, so a rotated or revoked key takes effect without a restart.",
    ),
    Bucket(
        "quotas",
        per_service=SERVICES,
        scanners=("planner", "rag", "tool-executor"),  # the door keepers: what each tenant made every service store
        history=1,
        description="What each tenant made the mesh store, per stream (key <service>.<tenant>.<stream>): the bytes "
        "and messages stored for it within the stream's max_age and its rate bucket, kept by the service that "
        "stored them (every service for what it stores for the tenant's tasks and its dead letters; a door keeper "
        "also for what the tenant hands in). The door keepers read all of it; meshctl status shows it.",
    ),
    Bucket(
        "ledger",
        # planner, worker, checker: their model calls' records before the ``calls`` bucket (read by a
        # replay of a task recorded then; this release only)
        per_service=("planner", "worker", "checker", "tool-executor"),
        history=1,
        ttl_s=30 * 24 * 3600.0,
        description="Idempotency ledger: claim and result of every side effect, by deterministic key. "
        "Keys outlive the stream dedup window by far.",
    ),
    Bucket(
        CALLS_BUCKET,
        per_service=("planner", "worker", "checker"),
        history=1,
        ttl_s=30 * 24 * 3600.0,
        synced=False,
        description="Recorded model calls (key <service>.<tenant>.<task>.llm.<call>): each paid call's response and "
        "usage, so a redelivered call is answered without paying again and a replay answers from the recording. "
        "Written back asynchronously: a broker crash may lose the last recordings (a redelivery then pays again, a "
        "replay calls live), never an effect.",
    ),
)

# Side-effect sinks: streams that stand for the outside world (an email provider, say). Each
# stored message is one observed effect; the sink deduplicates on the idempotency key it is
# given (Nats-Msg-Id) for its window only, as a provider honouring idempotency keys would.
SINKS: dict[str, tuple[str, str]] = {"OUTBOX": ("outbox", "tool-executor")}  # stream -> (subject prefix, writer)


TIMERS = "TIMERS"
"""Durable timers (issue 40): when a workflow task starts to wait (a ``timer`` node, the backoff
before a node's next try, a node's timeout), the planner stores a message schedule for its
wake-up on ``timer.v1.<tenant>.<task>.<wait>.at`` (``Nats-Schedule: @at <time>``; a later one on
the same subject replaces it). At that time the broker stores the wake-up on the schedule's
target, ``...<wait>.due``, which the planner's durable ``planner--timer-due`` delivers; once it is
acknowledged the stream forgets it (work-queue retention). Both survive the restart of any
service and of the broker. A wake-up carries no authority: the planner acts only on a wait its
task record holds and that is due by then, so a stray or repeated one changes nothing."""
TIMER_KEEPER = "planner"
"""The only service that may store schedules on TIMERS and consume its wake-ups."""
TIMER_DURABLE = "planner--timer-due"


def timer_subject(tenant: str, task_id: str, wait_id: str, which: str) -> str:
    """``which``: ``at`` (the schedule the planner stores) or ``due`` (the wake-up the broker stores)."""
    return f"timer.v1.{tenant}.{task_id}.{wait_id}.{which}"


CONTROL_OBSERVERS: tuple[str, ...] = SERVICES
"""Services that see every control message on a core subscription (besides the planner's
durable), so a halt stops their next model or tool call at once."""


STORE_GAUGES: tuple[str, ...] = ("planner",)
"""Services that read how full every stream is (``$JS.API.STREAM.INFO.<stream>``: its caps and
counts, not a message): the planner refuses new tasks while one nears its cap."""


WATCHERS: dict[str, tuple[str, ...]] = {
    "budget": ("usage",),
}
"""Services that read whole domains in order with direct gets (``$JS.API.DIRECT.GET.<stream>``:
no consumer, so no right to create, change or delete one), bodies included: the budget reads
the usage stream, its own record of spend (token counts, no tenant content)."""

ENVELOPES = "ENVELOPES"
"""Every message of the ``ENVELOPED`` domains without its body: its headers (``Mesh-Facts``,
the identity token, ids) and ``Nats-Msg-Size``. The broker fills it (the stream sources each
domain's stream through a headers-only durable that provisioning makes), so a reader of it can
follow every task and read nothing of what any task is about."""
ENVELOPED: tuple[str, ...] = ("task", "step", "tool", "rag", "check", "control", "approval")
UNSYNCED: frozenset[str] = frozenset({STREAMS["event"], ENVELOPES})
"""Streams written back to disk asynchronously (``persist_mode: async``, single-replica meshes),
not synced per message as the work streams are, because nothing anybody was promised rests on
them: EVENTS (progress for people following a task; a broker crash may lose its last events,
never an outcome, which a client's catch-up reads from TASK) and ENVELOPES (a view the broker
sources again after a crash). Buckets say it with ``Bucket.synced``."""
ENVELOPE_READERS: tuple[str, ...] = ("budget",)
"""Services that read the ENVELOPES stream (direct gets, and its feed): the budget's monitor
derives breakers, deadlocks and stalls from it (``mesh_contracts.facts``)."""


def envelope_source(domain: str) -> tuple[str, str]:
    """The headers-only durable ENVELOPES sources ``domain``'s stream through (provisioning makes
    it; the server's sourcing alone consumes it), and the subject it delivers to."""
    return f"envelopes--{domain}", f"$MESH.ENVELOPES.{STREAMS[domain]}"


def watch_feed(stream: str) -> str:
    """Where a watched stream republishes every message it stores (with ``Nats-Sequence``), for
    its watchers' core subscriptions: they read the stream itself only to fill a gap."""
    return f"$MESH.WATCH.{stream}.>"


def watched_streams() -> set[str]:
    """Streams that republish what they store (to ``watch_feed``): ENVELOPES, and those read whole."""
    return {STREAMS[d] for domains in WATCHERS.values() for d in domains} | {ENVELOPES}


def stream_contracts() -> list[type[Contract]]:
    """Every contract that travels on JetStream (all versions)."""
    return [c for cs in VERSIONS.values() for c in cs if c.spec.transport == "stream"]


HEADER_ALLOWANCE = 64 * 1024
"""Room for a message's headers (identity token, trace context, dead-letter metadata)."""


def max_message_bytes(domain: str) -> int:
    """The stream's ``max_msg_size``: the largest body any contract on it may have, plus headers.
    The broker refuses anything bigger at publish time (the backstop of the bounded decoder)."""
    sizes = [c.spec.max_bytes for c in stream_contracts() if c.spec.domain == domain]
    return max(sizes, default=0) + HEADER_ALLOWANCE


def durables() -> list[Durable]:
    """One durable per (consuming service, contract), filtering every major version.

    The filter takes any version (``task.*.*.*.submitted``) so that a message of a
    version the consumer does not know is received and dead-lettered with a reason
    instead of sitting unseen in the stream.
    """
    seen: dict[str, Durable] = {}
    for c in stream_contracts():
        for svc in c.spec.consumers:
            if svc not in SERVICES:
                continue  # clients follow events with core subscriptions
            name = f"{svc}--{c.spec.domain}-{c.spec.event}"
            seen.setdefault(
                name,
                Durable(
                    service=svc,
                    stream=STREAMS[c.spec.domain],
                    name=name,
                    filter_subject=f"{c.spec.domain}.*.*.*.{c.spec.event}",
                    contract=c,
                ),
            )
    return list(seen.values())


def durables_of(service: str) -> list[Durable]:
    return [d for d in durables() if d.service == service]


POOLED = "worker"
"""The service whose deployments may be split in pools (issue 48): a pool is a worker deployment
of its own (``MESH_WORKER_POOL``), with its own identity (``worker-<pool>``) and durables, that
runs the steps of the agent profiles naming it and no others."""


def pool_principal(pool: str) -> str:
    return f"{POOLED}-{pool}"


def pool_durables(pool: str) -> list[Durable]:
    """A worker pool's own durables: its steps (``step.*.*.*.requested.<pool>``: the shared
    durable's five-token filter never matches them), and its own copy of every other message the
    workers take (tool results, retrievals, approvals), from which it handles its own steps' only
    (the shared workers skip those same messages for a pool's steps)."""
    out = []
    for d in durables_of(POOLED):
        routed = d.contract.spec.routed
        out.append(Durable(service=POOLED, stream=d.stream, name=f"{pool_principal(pool)}--{d.name.split('--', 1)[1]}",
                           filter_subject=f"{d.filter_subject}.{pool}" if routed else d.filter_subject,
                           contract=d.contract))  # fmt: skip
    return out


def durable_for(service: str, contract: type[Contract], pool: str = "") -> Durable:
    """The durable ``service`` takes ``contract`` from (a worker pool's own, given ``pool``)."""
    for d in pool_durables(pool) if pool and service == POOLED else durables_of(service):
        if (d.contract.spec.domain, d.contract.spec.event) == (contract.spec.domain, contract.spec.event):
            return d
    raise LookupError(f"{service} does not consume {contract.type_name()} (see the contract's consumers)")


def queue_group(service: str) -> str:
    """Core-NATS queue group shared by a service's replicas for request/reply subjects."""
    return f"{service}-requests"


# Delivery policy shared by provisioning (consumer config) and the runtime (retry decisions).
ACK_WAIT_S = 2.0
"""Redelivery after this long without an ack or an in-progress ack: how long a message held by a
replica that died waits before a live one gets it. A live holder beats every quarter of it for
each message it holds (``mesh_kit.fair``), so this bounds failover, not the length of a call."""
MAX_DELIVER = 5
"""Attempts before a failing message is dead-lettered by the consuming service."""
RETRY_DELAYS_S = (0.5, 2.0, 5.0, 10.0)
"""NAK delay after attempt 1, 2, 3, 4 (exponential-ish; the last one repeats)."""
SPENT_DELIVERIES = 2
"""Deliveries a message may spend without an attempt: a replica that dies holds the messages it
fetched ahead for fair scheduling (``mesh_kit.fair``), and each comes back with one delivery
spent. The server's cap leaves room for them, so a crash loop of replicas does not use up a
message no handler ever ran."""
SERVER_MAX_DELIVER = MAX_DELIVER + 1 + SPENT_DELIVERIES
"""The server's own cap, above the runtime's: if a consumer crashes on every attempt (and so
can never dead-letter), the server stops redelivering and its MAX_DELIVERIES advisory lands in
the DLQ stream instead."""
