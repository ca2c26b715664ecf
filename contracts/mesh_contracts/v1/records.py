"""Version 1 of the records other services read from key-value buckets.

A record is a contract like a message is: one service writes it, others read it, and a change
that breaks a reader breaks the mesh. So each record here has a version, a committed JSON Schema
(``schemas/v1/record.<name>.json``, with its bucket, writer and readers) and the same
compatibility check as the messages. Evolve by adding optional fields with defaults; a breaking
change is a new ``record_version``, which readers that do not know it refuse with a clear error.

Read them only through ``mesh_kit.state`` (``task_record``, ``task_status``): the accessor is
where a reader's view of the format lives.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from mesh_contracts.stored import Sealable
from mesh_contracts.v1.common import (
    CheckResult,
    Citation,
    HeldCall,
    PlanStep,
    Replay,
    SignedRecord,
    Taint,
    TaskLimits,
    TaskPolicy,
    TokenUsage,
)
from mesh_contracts.v1.release import CanaryTest, ReleaseEvaluation

TaskStatus = Literal["planning", "running", "checking", "halted", "completed", "failed", "cancelled"]
StepStatus = Literal["pending", "dispatched", "completed", "failed", "halted"]
"""A workflow's ``timer`` or ``signal`` node is ``dispatched`` while it waits (its ``wait`` says
which; the task's ``waits`` hold what for)."""
TERMINAL: tuple[str, ...] = ("completed", "failed", "cancelled")
GUARDED: tuple[str, ...] = ("halted", "completed", "failed", "cancelled")
"""Task statuses that stop every further model or tool call (the planner writes these, and a
resume from ``halted``, to the ``status`` bucket)."""


class Record(Sealable):
    """A value of a key-value bucket that a service other than its writer reads."""

    model_config = ConfigDict(extra="allow")

    bucket: ClassVar[str]
    """The bucket (``contracts.topology.BUCKETS`` names its writer and readers)."""
    name: ClassVar[str]
    """The schema's name: ``record.<name>``."""
    key_format: ClassVar[str]
    """How the key is made, for the schema's readers."""

    record_version: Literal[1] = 1
    """Format version. A reader refuses a version it does not know instead of misreading it."""

    @classmethod
    def schema_id(cls) -> str:
        return f"record.{cls.name}/v1"

    @classmethod
    def seal_id(cls) -> str:
        return cls.schema_id()


class StepState(BaseModel):
    """One step of a task as the planner tracks it."""

    model_config = ConfigDict(extra="allow")

    step: PlanStep
    status: StepStatus = "pending"
    attempt: int = 0
    output: str = ""
    citations: list[Citation] = []
    usage: TokenUsage = TokenUsage()
    reason: str = ""
    tools: list[str] = []
    """Tools the completed attempt called, in order."""
    models: list[str] = []
    """``provider/model`` of the completed attempt's model calls."""
    prompt_version: str = ""
    skipped: bool = False
    """A workflow node not run (a condition before it did not hold): ``completed`` with no output,
    so a reader that knows only the statuses sees a step that is over."""
    taint: Taint | None = None
    """What untrusted content the completed attempt read (None: not declared by its worker, so
    its output counts as untrusted); passed on to the steps that take its output."""
    held: list[HeldCall] = []
    """Calls of the completed attempt held for a human that it went on without."""
    template: str = ""
    """A workflow agent node's instruction as a reviewer edited it (its templates still to fill
    in); '' when it is the workflow's own."""
    wait: str = ""
    """A workflow node that waits for the world (``timer``, ``signal``), not work: no worker runs
    it, and the checker does not judge its output."""
    tool_denials: int = 0
    """The step's tool calls a rule or a person refused (from its ``step.completed``)."""


class WaitState(BaseModel):
    """Something a workflow task waits for (``TaskRecord.waits``): a timer node's time, a signal,
    the backoff before a node's next try, or the end of a try's time (``timeout``). A wait with a
    ``due_at`` has a wake-up scheduled on the broker (``topology.TIMERS``)."""

    step_id: str
    kind: Literal["timer", "signal", "retry", "timeout", "approval"]
    attempt: int = 1
    """The step's attempt the wait belongs to (a timeout's try; a retry's failed try)."""
    due_at: float | None = None
    signal: str = ""
    decision: str = ""
    """An approval's id, what a reviewer's decision names (``plan.reviewed``'s ``draft``)."""
    request: str = ""
    """An approval's question, filled in (what ``meshctl review`` shows)."""
    started_at: float = 0.0


class SignalState(BaseModel):
    """A signal the task received (``TaskRecord.signals``): kept until its node is reached, then taken."""

    payload: Any = None
    by: str = ""
    at: float = 0.0
    msg_id: str = ""
    taken_by: str = ""
    """The node that took it ('' while it is kept)."""


class OutboxItem(BaseModel):
    """A message decided in a state transition but not yet confirmed published."""

    type: str
    key: str
    body: dict[str, Any]
    causation: str = ""


class TaskRecord(Record):
    """The planner's record of a task: the only truth about its progress (compare-and-set on the
    key's revision). Read by the tool-executor (the goal, for tool policy) and the budget
    (limits, start time)."""

    bucket: ClassVar[str] = "tasks"
    name: ClassVar[str] = "task"
    key_format: ClassVar[str] = "<tenant>.<task_id>"
    sealed: ClassVar[tuple[str, ...]] = (
        "goal", "reason", "steps", "feedback", "checks", "outbox", "inputs", "draft", "signals",
    )  # fmt: skip

    tenant: str
    task_id: str
    goal: str
    limits: TaskLimits = TaskLimits()
    policy: TaskPolicy = TaskPolicy()
    status: TaskStatus = "planning"
    reason: str = ""
    steps: dict[str, StepState] = {}
    planner_usage: TokenUsage = TokenUsage()
    check_attempt: int = 0
    feedback: dict[str, str] = {}
    """Checker reasons per step being redone, passed to the step as its ``feedback`` (untrusted)."""
    checks: list[CheckResult] = []
    """The last verdict's results."""
    judge_score: float | None = None
    prompt_versions: dict[str, str] = {}
    """Prompt version per agent role used by the task's model calls."""
    check_usage: TokenUsage = TokenUsage()
    """Model usage of the checker's judge over every verdict."""
    created_at: float = 0.0
    finished_at: float = 0.0
    outbox: list[OutboxItem] = []
    priority: int = 5
    """From ``task.submitted``: the priority the task's steps are dispatched with."""
    labels: dict[str, str] = {}
    """From ``task.submitted``: the tenant's labels (team, user...), which the budget's spend
    records and metrics carry."""
    replay: Replay | None = None
    """From ``task.submitted``: the task replays an earlier one (its steps and check carry it)."""
    release: str = ""
    """The release of the tenant's behaviour the task runs (``v1.release``), chosen when it was
    admitted ('' : the packaged one): its messages carry it, and it finishes on it whatever is
    promoted or rolled back meanwhile."""
    workflow: str = ""
    """``name@version`` of the registered workflow the task runs, pinned when it started ('': the
    model plans it). Its steps are the workflow's nodes; which run is decided as nodes end."""
    inputs: dict[str, Any] = {}
    """From ``task.submitted``: the workflow's inputs."""
    answer_step: str = ""
    """The step whose output is the answer when not the last ``answer`` step (a workflow's output node)."""
    draft: list[PlanStep] = []
    """A plan waiting for review (``MESH_PLAN_REVIEW``): the steps as drafted or last edited."""
    draft_hash: str = ""
    """The waiting draft's hash (``draft_hash``), or the approved one's once the task runs."""
    draft_revision: int = 0
    reviewed_by: str = ""
    """Who approved the plan that runs ('' when the plan was not reviewed)."""
    step_shares: dict[str, float] = {}
    """A workflow's nodes' ``budget_share`` by node id (from its pinned definition; the status
    record carries it to the budget)."""
    waits: dict[str, WaitState] = {}
    """What the task waits for now, by wait id (a workflow's timers, signals, retries, timeouts)."""
    signals: dict[str, SignalState] = {}
    """Signals received, by name: kept until a node takes them."""

    @staticmethod
    def key(tenant: str, task_id: str) -> str:
        return f"{tenant}.{task_id}"

    def total_usage(self) -> TokenUsage:
        total = self.planner_usage + self.check_usage
        for s in self.steps.values():
            total = total + s.usage
        return total


class StatusRecord(Record):
    """Whether a task may go on, and nothing of its content: what every service's guard reads
    before a model or tool call, and what the budget knows of a task before its first call (it
    holds no right to the task records, which carry the goal and the step outputs). Written by
    the planner when a task starts (before its first model call), is halted, resumed or ends."""

    bucket: ClassVar[str] = "status"
    name: ClassVar[str] = "status"
    key_format: ClassVar[str] = "<tenant>.<task_id>"

    status: str
    reason: str = ""
    created_at: float = 0.0
    """When the task started (its deadline runs from here): the task record's ``created_at``."""
    limits: TaskLimits | None = None
    """The task's limits (``None``: written before they were recorded here)."""
    labels: dict[str, str] = {}
    """The tenant's labels for the task (the budget's spend records and metrics carry them)."""
    step_shares: dict[str, float] = {}
    """A workflow's nodes' ``budget_share`` by node id: the share of the task's token and cost
    ceilings each may spend, enforced by the budget per step like the task's own."""


class AdmissionRecord(Record):
    """One tenant's admission state, kept by the planner (compare-and-set): the tasks it admitted
    that have not ended (and which of them hold a run slot), its submission token bucket, and
    what it admitted and refused. Read by ``meshctl status``; every planner replica follows it."""

    bucket: ClassVar[str] = "admission"
    name: ClassVar[str] = "admission"
    key_format: ClassVar[str] = "<tenant>"

    in_flight: dict[str, float] = {}
    """Task id -> when the admission lapses at the latest (admitted at + the task's deadline + a
    grace): a task whose end was never recorded stops counting then."""
    tokens: float = 0.0
    refilled_at: float = 0.0
    admitted: int = 0
    refused: dict[str, int] = {}
    """Refusals by code (``too_many_in_flight``, ``rate_limited``)."""
    mean_task_s: float = 0.0
    """Moving average of how long its admitted tasks took (for ``retry_after_s``)."""
    running: dict[str, float] = {}
    """With run slots (``MESH_RUN_SLOTS``): the admitted tasks that hold one (task id -> when it
    lapses, as in ``in_flight``). The rest of ``in_flight`` waits for a slot, queued."""
    last_ended_at: float = 0.0
    """When one of its tasks last ended: a tenant between two tasks still counts as wanting run
    slots for a while (``MESH_RUN_SLOTS_ALONE`` is for a tenant that is really alone)."""
    idle: dict[str, float] = {}
    """With run slots: started tasks that wait only for the world (a workflow's timer, signal,
    approval or retry backoff, or a draft plan's reviewer), task id -> when it lapses, as in
    ``in_flight``. They keep their admission but hold no run slot, and do not queue for one: a task
    waiting a day for an approval does not keep another tenant's task from starting. Back at work
    (the wait ended), a task takes its slot again at once (in ``running``), even over the cap."""


class QuotaRecord(Record):
    """What one tenant made one service store in one stream, kept by that service (compare-and-set):
    the bytes and messages it charged per time slot, for as long as the stream may hold them (a
    slot is forgotten once everything charged in it has aged out of the stream), and a token
    bucket for bytes per minute. ``meshctl status`` reads it (``mesh_tenancy.quota``)."""

    bucket: ClassVar[str] = "quotas"
    name: ClassVar[str] = "quota"
    key_format: ClassVar[str] = "<service>.<tenant>.<stream>"

    slot_s: float = 0.0
    """Width of a slot (the stream's max_age / 64, at least a minute)."""
    held: dict[str, list[int]] = {}
    """Slot index (start time // ``slot_s``) -> [bytes, messages] charged in it and still possibly held."""
    tokens: float = 0.0
    """Bytes the tenant may still write this minute (refilled at ``limit_bytes_per_min`` a minute)."""
    refilled_at: float = 0.0
    limit_bytes: int = 0
    """The quota in force at the last charge (0: none), for readers: bytes held ..."""
    limit_msgs: int = 0
    """... messages held ..."""
    limit_bytes_per_min: int = 0
    """... and bytes per minute."""
    window_s: float = 0.0
    """The stream's max_age at the last charge: how long a charge is held."""
    charged: int = 0
    """Messages charged, ever (refunds excluded)."""
    refused: dict[str, int] = {}
    """Refusals by code (``quota_exceeded``, ``rate_limited``)."""

    @staticmethod
    def key(service: str, tenant: str, stream: str) -> str:
        return f"{service}.{tenant}.{stream}"

    def held_now(self) -> tuple[int, int]:
        """Bytes and messages held (as of the last charge)."""
        return sum(v[0] for v in self.held.values()), sum(v[1] for v in self.held.values())


class Evidence(Record):
    """The retrieval records one step attempt read, as rag signed them; the planner hands them to
    the checker in the check request."""

    bucket: ClassVar[str] = "evidence"
    name: ClassVar[str] = "evidence"
    key_format: ClassVar[str] = "<tenant>.<task_id>.<step_id>.<attempt>"
    sealed: ClassVar[tuple[str, ...]] = ("records",)

    records: list[SignedRecord] = []

    @staticmethod
    def key(tenant: str, task_id: str, step_id: str, attempt: int) -> str:
        return f"{tenant}.{task_id}.{step_id}.{attempt}"


class WorkflowEvent(BaseModel):
    """One change of a workflow version, as the registry applied it."""

    model_config = ConfigDict(extra="allow")

    action: str
    by: str
    at: float
    reason: str = ""
    change_id: str = ""
    """The ``workflow.change``'s task id: its link on the audit chain."""


class WorkflowVersion(Record):
    """One version of a tenant's workflow: its definition (immutable: the version is its digest)
    and its status. Written by the planner (create-only, then compare-and-set on the status);
    read by the planner when a task names it and by the tenant's ``meshctl workflow``."""

    bucket: ClassVar[str] = "workflows"
    name: ClassVar[str] = "workflow"
    key_format: ClassVar[str] = "<tenant>.wf.<name>.<version>"

    tenant: str
    workflow: str
    """The workflow's name."""
    version: str
    definition: dict[str, Any]
    """The definition in canonical form (``WorkflowDefinition.canonical``): its SHA-256 is the version."""
    status: Literal["active", "deprecated", "deleted"] = "active"
    """``active``: tasks may start it; ``deprecated`` and ``deleted``: no new task may (tasks that
    started it run on); ``deleted`` also leaves ``list`` (the definition stays, for the tasks that
    ran it and for the audit)."""
    published_by: str = ""
    published_at: float = 0.0
    history: list[WorkflowEvent] = []
    """Every change, the publication first."""

    @staticmethod
    def key(tenant: str, name: str, version: str) -> str:
        return f"{tenant}.wf.{name}.{version}"


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str
    status: str = "active"
    published_at: float = 0.0
    published_by: str = ""


class WorkflowCatalog(Record):
    """A tenant's workflows: every version of each, in the order published, with its status (one
    key per tenant, compare-and-set). ``name@latest`` is the last one published that is active."""

    bucket: ClassVar[str] = "workflows"
    name: ClassVar[str] = "workflow-catalog"
    key_format: ClassVar[str] = "<tenant>.catalog"

    workflows: dict[str, list[CatalogEntry]] = {}

    @staticmethod
    def key(tenant: str) -> str:
        return f"{tenant}.catalog"

    def latest(self, name: str) -> str:
        """The version ``name@latest`` names, or '' if none is active."""
        return next((e.version for e in reversed(self.workflows.get(name, [])) if e.status == "active"), "")


class ReleaseEvent(BaseModel):
    """One change of a tenant's releases, as the planner applied it (also a link of the audit chain)."""

    model_config = ConfigDict(extra="allow")

    action: str
    """``draft``, ``evaluated``, ``canary``, ``promote``, ``rollback``, ``promoted`` or ``rolled_back``
    (the last two: decided by the canary's sequential test)."""
    version: str = ""
    by: str = ""
    at: float = 0.0
    reason: str = ""
    change_id: str = ""
    forced: bool = False
    current: str = ""
    """A decision: the version current after it."""
    tasks: int = 0
    """A decision: the canary tasks observed, ``bad`` of them gone badly, the test's log-likelihood
    ratio ``llr`` against its boundaries ``lower`` and ``upper``."""
    bad: int = 0
    llr: float = 0.0
    lower: float = 0.0
    upper: float = 0.0


class ReleaseVersion(Record):
    """One version of a tenant's behaviour (``release.ReleaseBundle``, immutable: the version is its
    digest), its evaluations and its story. Written by the planner (create-only, then
    compare-and-set); read by the worker, checker and tool-executor for the tasks that run it, and
    by the tenant's ``meshctl release``."""

    bucket: ClassVar[str] = "releases"
    name: ClassVar[str] = "release"
    key_format: ClassVar[str] = "<tenant>.v.<version>"

    tenant: str
    version: str
    bundle: dict[str, Any]
    """The bundle in canonical form: its SHA-256 is the version."""
    drafted_by: str = ""
    drafted_at: float = 0.0
    evaluations: list[ReleaseEvaluation] = []
    """Every ``meshctl release eval`` recorded, the latest last (the gate reads the latest)."""
    history: list[ReleaseEvent] = []

    @staticmethod
    def key(tenant: str, version: str) -> str:
        return f"{tenant}.v.{version}"

    def evaluation(self) -> ReleaseEvaluation | None:
        return self.evaluations[-1] if self.evaluations else None


class ArmStats(BaseModel):
    """What the tasks of one version did while a canary ran (the live signals the test and the
    dashboard read)."""

    model_config = ConfigDict(extra="allow")

    tasks: int = 0
    bad: int = 0
    """Tasks that went badly: not completed, rejected by the checker at least once, a tool call
    refused (the policy, an approver, the release), or (a canary's) costing over ``CanaryTest.max_cost_ratio`` times the current version's mean."""
    checks_passed: int = 0
    """Tasks whose first answer the checker passed."""
    judge_sum: float = 0.0
    judge_n: int = 0
    cost_usd: float = 0.0
    tool_denials: int = 0
    """Tool calls a rule or a person refused, over the version's tasks."""
    latencies: list[float] = []
    """The last ``LATENCIES_KEPT`` tasks' seconds from admission to end (p95 is read from them)."""

    def mean_cost(self) -> float:
        return self.cost_usd / self.tasks if self.tasks else 0.0

    def p95(self) -> float:
        """The 95th percentile of the kept latencies, nearest rank (0 for none)."""
        return nearest_rank(self.latencies, 0.95)


def nearest_rank(values: list[float], q: float) -> float:
    """The value at rank ``ceil(q * n)`` of the sorted values (0 for none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


class TrailPoint(BaseModel):
    """The canary's test after one observation: what the dashboard plots against the boundaries."""

    model_config = ConfigDict(extra="allow")

    at: float
    version: str
    bad: bool = False
    llr: float = 0.0
    """The canary's log-likelihood ratio after it (a current-version task leaves it, moving ``p0``)."""
    cost_usd: float = 0.0
    latency_s: float = 0.0
    judge: float | None = None


class ReleaseChannel(Record):
    """Which version a tenant's new tasks run (one key per tenant, compare-and-set): the current
    one, and a canary with its share, its sequential test and the live signals of both versions.
    Written by the planner; read by the tenant's ``meshctl release`` and the dashboard."""

    bucket: ClassVar[str] = "releases"
    name: ClassVar[str] = "release-channel"
    key_format: ClassVar[str] = "<tenant>.channel"

    tenant: str
    current: str = ""
    """'' : the packaged behaviour."""
    versions: list[str] = []
    """Every version drafted, in order (``meshctl release list``)."""
    before: list[str] = []
    """The versions current before it, the latest last: what a rollback of the current version
    goes back to."""
    canary: str = ""
    against: str = ""
    """The version the canary is compared with: what the tenant's other tasks ran when it began
    (the tenant's current release, or the mesh's default when the tenant has none)."""
    share: float = 0.0
    canary_since: float = 0.0
    canary_by: str = ""
    test: CanaryTest | None = None
    llr: float = 0.0
    arms: dict[str, ArmStats] = {}
    """By version ('' : the packaged behaviour), since the canary started."""
    trail: list[TrailPoint] = []
    """The canary's observations in order (at most ``TRAIL_KEPT``)."""
    seen: list[str] = []
    """Task ids observed lately (a task is counted once however often its end is handled)."""
    history: list[ReleaseEvent] = []
    """Every change and decision, oldest first (at most ``HISTORY_KEPT``)."""
    unannounced: list[ReleaseEvent] = []
    """Decisions written here whose ``release.decided`` and audit link are not sent yet (a crash in
    between): the next observation of the tenant sends them."""

    @staticmethod
    def key(tenant: str) -> str:
        return f"{tenant}.channel"


class CatalogueTool(BaseModel):
    """One tool the tool-executor serves, as models are offered it and operators read it."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str
    parameters: dict[str, Any]
    """The arguments' JSON schema, as the executor enforces it (closed)."""
    risk: Literal["read", "write", "external"] = "read"
    needs_approval: bool = False
    on_untrusted: Literal["approve", "allow", "deny"] = "allow"
    """What a call from a step whose context holds untrusted content gets."""
    trusted_args: list[str] = []
    rate_per_min: int = 0
    timeout_s: float = 5.0
    untrusted_output: bool = False
    """The result is outside content: the worker delimits it and taints the step."""
    source: str = "builtin"
    """``builtin`` or the MCP server it is mounted from."""


class ToolCatalogue(Record):
    """Every tool the tool-executor serves (built-ins and mounted MCP tools), written by it at start
    and when a mount changes. The worker offers steps these tools with these schemas; the planner
    tells its model which tools there are from it. One source for the catalogue."""

    bucket: ClassVar[str] = "tools"
    name: ClassVar[str] = "tool-catalogue"
    key_format: ClassVar[str] = "catalogue"

    tools: list[CatalogueTool] = []

    KEY: ClassVar[str] = "catalogue"

    def by_name(self) -> dict[str, CatalogueTool]:
        return {t.name: t for t in self.tools}


RECORDS: tuple[type[Record], ...] = (
    TaskRecord,
    StatusRecord,
    Evidence,
    AdmissionRecord,
    QuotaRecord,
    WorkflowVersion,
    WorkflowCatalog,
    ReleaseVersion,
    ReleaseChannel,
    ToolCatalogue,
)
