"""The JetStream rights each principal is *meant* to hold, written out by hand.

This table is the security model in the README, spelled as NATS subjects. It deliberately does
not read the contracts or the topology (which is what ``meshctl.policy`` derives permissions
from): a test comparing the generated policy with itself could never fail. When a change to
the contracts or the topology changes a principal's JetStream rights, this table must be
edited too, and the reviewer sees the new right spelled out.

Only ``$JS.*`` subjects are listed (the JetStream API, acks, flow control). Publishing events
and key-value writes are covered by the subject-level permission matrix.

What no principal but the admin may hold, whatever this table says: any consumer create,
update, delete, pause, unpin or step-down; any stream create, update, delete, message delete,
snapshot or restore; the account-wide listings; and purge, except the keeper's (issue 42), of
the streams and buckets that hold tenants' data, never of the audit chain.
"""

from __future__ import annotations


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    p, t = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


def fetch(stream: str, durable: str) -> set[str]:
    """Fetch from, inspect and acknowledge one durable that provisioning created (both ack
    reply-subject layouts, with and without domain and account hash)."""
    return {
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
        f"$JS.ACK.*.*.{stream}.{durable}.>",
    }


def kv_read(bucket: str) -> set[str]:
    """Read any key by name (direct get, last message of the key's subject)."""
    return {f"$JS.API.DIRECT.GET.KV_{bucket}.>"}


def kv_own(bucket: str) -> set[str]:
    """The bucket's writer: every key, and the stream's info (which can list the keys)."""
    return {f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.DIRECT.GET.KV_{bucket}.>"}


def kv_scan(bucket: str) -> set[str]:
    """Read the whole bucket in order or as its current values (direct gets with a body)."""
    return {f"$JS.API.DIRECT.GET.KV_{bucket}.>", f"$JS.API.DIRECT.GET.KV_{bucket}"}


def ledger(service: str, bucket: str = "ledger") -> set[str]:
    """Its own slice of the shared idempotency ledger (or of the recorded model calls, ``calls``):
    only keys under its own name."""
    return {f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{service}.>"}


def stream_read(stream: str) -> set[str]:
    """Read a whole stream in order with direct gets (no consumer)."""
    return {f"$JS.API.DIRECT.GET.{stream}"}


def purge(*streams: str) -> set[str]:
    """The keeper: a stream's config and state, a message at a time, and purges (with a filter)."""
    return {f"$JS.API.{verb}.{s}" for s in streams for verb in ("STREAM.INFO", "STREAM.PURGE", "DIRECT.GET")}


def quota(service: str, *streams: str) -> set[str]:
    """Its own slice of the tenants' quota book (``mesh_tenancy.quota``), and the caps and max_age of
    the streams it stores tenants' messages in: the DLQ (its dead letters) and every stream it
    publishes to (what it stores for a tenant counts against the tenant's share there)."""
    return {f"$JS.API.DIRECT.GET.KV_quotas.$KV.quotas.{service}.>"} | {
        f"$JS.API.STREAM.INFO.{s}" for s in ("DLQ", *streams)
    }


EVERY_SERVICE = kv_read("control") | kv_read("trust") | kv_read("tenants")  # kill switches; the published trust
# bundle; the tenant registry (a tenant added at runtime: read when first met)
GUARD = kv_read("status")  # whether a task was halted or ended (not what it is about)
# Appending to a tenant's audit chain: read its last record (the subject form: the last message
# matching ``audit.v1.<tenant>.>``, nothing by sequence), then a compare-and-set publish on it.
AUDIT_WRITER = {"$JS.API.DIRECT.GET.AUDIT.audit.v1.*.>"}

STORE_LEVELS = {
    f"$JS.API.STREAM.INFO.{s}"
    for s in ("TASK", "STEP", "TOOL", "RAG", "CHECK", "USAGE", "CONTROL", "APPROVAL", "EVENTS", "AUDIT", "DLQ")
}
# A door keeper reads the whole quota book (what each tenant made every service store: counts,
# no content) and every stream's caps: a tenant whose tasks stored too much anywhere is refused.
DOOR_KEEPER = kv_scan("quotas") | STORE_LEVELS

INTENDED: dict[str, set[str]] = {
    "planner": EVERY_SERVICE
    | fetch("TASK", "planner--task-submitted")
    | fetch("TASK", "planner--task-change")  # authors' workflow changes
    | fetch("TASK", "planner--task-agent")  # authors' agent profile changes
    | fetch("TASK", "planner--task-release")  # authors' and approvers' release changes
    | fetch("TIMERS", "planner--timer-due")  # the wake-ups of workflow timers the broker fired
    | fetch("TASK", "planner--task-signal")  # signals to workflow tasks
    | fetch("APPROVAL", "planner--approval-reviewed")  # reviewers' decisions on draft plans
    | fetch("STEP", "planner--step-completed")
    | fetch("STEP", "planner--step-failed")
    | fetch("CHECK", "planner--check-verdict")
    | fetch("CONTROL", "planner--control-halt")
    | fetch("CONTROL", "planner--control-cancel")
    | fetch("CONTROL", "planner--control-resume")
    | kv_own("tasks")
    | kv_own("status")
    | kv_own("evidence")
    | kv_own("workflows")  # the workflow registry
    | kv_own("releases")  # the tenants' releases of behaviour: versions and channels
    | kv_own("admission")  # per tenant: tasks in flight, its submission token bucket
    | kv_scan("admission")  # every tenant's run slots, read at start (then followed on its feed)
    | kv_read("tools")
    | kv_read("toolservers")  # each tenant's own tools, which its plans may name
    | AUDIT_WRITER  # control actions
    # how full each stream is (caps and counts, no message): new tasks are refused near a cap
    | STORE_LEVELS
    | ledger("planner")
    | ledger("planner", "calls")  # its model calls, recorded
    | quota("planner", "TASK", "CONTROL")  # the door of submissions and control messages
    | DOOR_KEEPER,
    "worker": EVERY_SERVICE
    | fetch("STEP", "worker--step-requested")
    | fetch("TOOL", "worker--tool-completed")
    | fetch("RAG", "worker--rag-completed")
    | fetch("APPROVAL", "worker--approval-requested")
    | GUARD
    | kv_own("steps")
    | kv_read("tools")
    | kv_read("toolservers")  # each tenant's own tools, offered to its steps only
    | kv_read("releases")  # the prompts, routes and tool rules of the release a step runs
    | kv_read("workflows")  # the agent profile version a step runs as
    | ledger("worker")
    | ledger("worker", "calls")  # its model calls, recorded
    | quota("worker", "STEP", "TOOL", "RAG", "USAGE", "EVENTS"),
    # The checker reads no stream and no task record: the passages it checks citations against
    # come in the check request, each as rag signed it.
    "checker": EVERY_SERVICE
    | fetch("CHECK", "checker--check-requested")
    | GUARD
    | kv_read("releases")  # the judge's prompts and route of the release a check runs
    | ledger("checker")
    | ledger("checker", "calls")  # its model calls, recorded
    | quota("checker", "CHECK", "USAGE", "EVENTS"),
    "rag": EVERY_SERVICE
    | fetch("RAG", "rag--rag-requested")
    | fetch("RAG", "rag--rag-ingest")
    | GUARD
    | kv_own("rag")
    | quota("rag", "RAG", "EVENTS")  # the door of ingests
    | DOOR_KEEPER,
    "tool-executor": EVERY_SERVICE
    | fetch("TOOL", "tool-executor--tool-requested")
    | fetch("APPROVAL", "tool-executor--approval-decided")
    | fetch("TASK", "tool-executor--task-tools")  # people's changes to their tenant's tool servers
    | GUARD
    | kv_read("tasks")
    | kv_read("releases")  # the tool rules of the release a call runs
    | kv_own("approvals")
    | kv_scan("approvals")
    | kv_own("tools")
    | kv_own("toolservers")  # the tenants' tool servers, their listings and catalogues
    | kv_scan("toolservers")  # every tenant's servers, mounted at start (then followed)
    | kv_own("notes")
    | kv_scan("notes")
    | AUDIT_WRITER  # tool-policy decisions and approval outcomes
    | ledger("tool-executor")
    | quota("tool-executor", "TOOL", "APPROVAL", "AUDIT", "EVENTS", "TASK", "CONTROL")
    | DOOR_KEEPER,  # the door of tools.change
    # The monitor follows every task with direct gets only: the usage records whole (its own
    # record of spend), and every other message's envelope (headers, no body: ENVELOPES). No
    # right on TASK, STEP, TOOL, RAG, CHECK, CONTROL or APPROVAL, where a bare direct get reads
    # every tenant's documents, passages, arguments, results, outputs, goals and answers; nor on
    # KV tasks (goals, step outputs): a task's start, limits and labels are in its status record.
    "budget": EVERY_SERVICE
    | fetch("USAGE", "budget--usage-recorded")
    | stream_read("USAGE")
    | stream_read("ENVELOPES")
    | GUARD
    # a task's status record from the bucket's leader, when a direct get (any replica) missed it
    | {"$JS.API.STREAM.MSG.GET.KV_status"}
    | kv_own("budget")
    | kv_own("reservations")
    | kv_scan("reservations")  # a rebuilt view reads the last ttl's holds in batches
    | kv_own("anchors")  # the audit chains' signed anchors
    | AUDIT_WRITER  # budget trips
    | quota("budget", "CONTROL", "AUDIT", "EVENTS"),
    "approver": kv_scan("approvals"),
    # Each tenant's data older than its retention, removed: every stream and bucket that holds a
    # data class (not AUDIT), the content-free status records; it reads the tenants' settings and
    # which of their tasks have not ended.
    "keeper": purge(
        "TASK",
        "STEP",
        "RAG",
        "CHECK",
        "EVENTS",
        "CONTROL",
        "TOOL",
        "APPROVAL",
        "USAGE",
        "ENVELOPES",
        "DLQ",
        "KV_tasks",
        "KV_steps",
        "KV_evidence",
        "KV_calls",
        "KV_ledger",
        "KV_budget",
        "KV_reservations",
        "KV_status",
        "KV_approvals",
    )
    | kv_scan("tenants")
    | kv_scan("admission")
    | kv_scan("status")
    | kv_scan("approvals")
    | AUDIT_WRITER,  # what it removed, on the tenant's chain
    # The edge (the HTTP gateway): a task's stored events, outcome and waiting calls in order, for a
    # browser that follows late or resumes (the bare subject: a subject filter of one task per
    # read), and the approval a person decides; every tenant's, as it speaks for several.
    "edge": stream_read("TASK")
    | stream_read("EVENTS")
    | stream_read("APPROVAL")
    | {
        "$JS.API.DIRECT.GET.TASK.>",
        "$JS.API.DIRECT.GET.EVENTS.>",
        "$JS.API.DIRECT.GET.APPROVAL.>",
        "$JS.API.DIRECT.GET.KV_approvals.$KV.approvals.>",
    },
    # The A2A gateway: the edge's, and a tenant's workflow registry (the workflows it exposes as
    # agents), one key per read, every tenant's, as it speaks for several.
    "a2a": stream_read("TASK")
    | stream_read("EVENTS")
    | stream_read("APPROVAL")
    | {
        "$JS.API.DIRECT.GET.TASK.>",
        "$JS.API.DIRECT.GET.EVENTS.>",
        "$JS.API.DIRECT.GET.APPROVAL.>",
        "$JS.API.DIRECT.GET.KV_approvals.$KV.approvals.>",
        "$JS.API.DIRECT.GET.KV_workflows.$KV.workflows.>",
    },
    # its own events and outcomes, and its own workflow registry and releases keys, one key per read
    "client.acme": {
        "$JS.API.DIRECT.GET.TASK.task.*.acme.>",
        "$JS.API.DIRECT.GET.EVENTS.event.*.acme.>",
        "$JS.API.DIRECT.GET.KV_workflows.$KV.workflows.acme.>",
        "$JS.API.DIRECT.GET.KV_releases.$KV.releases.acme.>",
        "$JS.API.DIRECT.GET.KV_toolservers.$KV.toolservers.acme.>",
    },
    "client.globex": {
        "$JS.API.DIRECT.GET.TASK.task.*.globex.>",
        "$JS.API.DIRECT.GET.EVENTS.event.*.globex.>",
        "$JS.API.DIRECT.GET.KV_workflows.$KV.workflows.globex.>",
        "$JS.API.DIRECT.GET.KV_releases.$KV.releases.globex.>",
        "$JS.API.DIRECT.GET.KV_toolservers.$KV.toolservers.globex.>",
    },
}

WHY: dict[str, str] = {
    "CONSUMER.INFO": "its own durables only: the bound pull subscriber checks the durable exists",
    "CONSUMER.MSG.NEXT": "its own durables only: fetch the next batch",
    "ACK": "its own durables only: ack, nak with delay, in-progress, term",
    "DIRECT.GET (subject form)": "read the last message of a subject it may read (KV keys, a tenant's own task, "
    "the head of a tenant's audit chain for its writers)",
    "DIRECT.GET (bare)": "batched reads by sequence/time or current values: the budget's monitor over the "
    "usage stream and the envelopes (headers without bodies) of the other 7, its accounting horizon (last "
    "stored usage sequence), the approvals bucket "
    "(tool-executor's expiry, approvers' list), notes (note_list)",
    "STREAM.INFO": "a bucket's writer only (the budget lists one task's spend keys with a subjects filter); the "
    "caps and max_age (config and counts, no message) of the streams a service stores tenants' messages in: "
    "the DLQ for every service, TASK and CONTROL for the planner's door, RAG for rag's, TASK for the tool-executor's "
    "(quotas are shares of them)",
}
"""Why each kind of right exists (for the note and the README's table)."""
