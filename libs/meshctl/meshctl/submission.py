"""One task's submission as a tenant's client makes it (``TenantClient.submit``): handed in at its
door, handed in again after a refusal that waiting cures (``Resubmit``, opt-in), and followed to
its outcome; ``Followed`` is what the client saw of the task.

Following is live (core subscriptions), and live delivery has a gap while the client
reconnects (its server restarted, or a cluster node died). An outcome published in that gap
is still stored in the ``TASK`` stream, so after every reconnect, and once more before giving
up, the client reads the task's stored outcome (``DIRECT.GET``, the one read its identity
allows). A task that finished is never reported as timed out.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh_contracts import Contract, ContractError
from mesh_contracts.v1 import (
    ProgressEvent,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TaskSubmitted,
    TokenDelta,
    UsageRecorded,
)
from mesh_identity import IdentityError
from mesh_kit import envelope as env
from mesh_kit.settings import StreamFull
from mesh_tenancy.door import DoorRefused, Stored


class Client(Protocol):
    """What a submission needs of its tenant's client (``meshctl.client.TenantClient``): its
    connection and tenant, handing a message in, and believing what it reads."""

    nc: NATS | None
    tenant: str
    _reconnected: asyncio.Event

    async def publish(self, model: Contract, key: str = "1", *, trace: str | None = None) -> Stored: ...

    def _believe(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Contract: ...

    async def _stored_outcome(self, task_id: str) -> tuple[str, bytes, dict[str, str] | None] | None: ...


TERMINAL = (TaskCompleted, TaskFailed, TaskRejected)
STORE_FULL_RETRY_S = 30.0
"""The ``retry_after_s`` of a submission the TASK stream refused (full): as the planner's own
``overloaded`` refusal (``MESH_STORE_HIGH_WATER``) says."""


@dataclass
class Followed:
    """What a client saw of one task."""

    task_id: str
    outcome: Contract | None = None
    events: list[ProgressEvent] = field(default_factory=list)
    submitted_at: float = 0.0
    finished_at: float = 0.0
    rejected_messages: list[str] = field(default_factory=list)
    tokens: list[TokenDelta] = field(default_factory=list)
    """Streamed model output, in arrival order (live only: nothing replays it)."""
    first_token_at: float = 0.0
    """When the first streamed token arrived (``time.time()``), or 0."""
    usage: list[UsageRecorded] = field(default_factory=list)
    """Every model call of the task as its caller recorded it (``usage.recorded``, live only), in
    arrival order: what the budget service accounts, call by call."""
    attempts: int = 1
    """Submissions made (``Resubmit``: the first and every resubmission, all of the same task id)."""
    refusals: list[TaskRejected] = field(default_factory=list)
    """The refusals that were followed by a resubmission, in order (the last refusal, if the task
    ended refused, is ``outcome``)."""
    taken_up: bool = False
    """The planner took the last submission up: something about the task other than a refusal
    arrived (without ``follow``: only while waiting ``refusal_wait_s``)."""
    taken_up_at: float = 0.0
    """When that first arrived (``time.time()``), or 0."""

    def spent(self) -> tuple[int, float]:
        """Tokens and cost of the calls seen so far, each call id counted once."""
        calls = {u.call_id: u for u in self.usage}
        return sum(u.input_tokens + u.output_tokens for u in calls.values()), sum(u.cost_usd for u in calls.values())

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.submitted_at

    def streamed_text(self, call_id: str) -> str:
        """The text one model call streamed, after any reset (what the client should show)."""
        text: list[str] = []
        for t in self.tokens:
            if t.call_id == call_id:
                if t.kind == "reset":
                    text.clear()
                elif t.kind == "delta":
                    text.append(t.text)
        return "".join(text)


RETRYABLE = frozenset({"too_many_in_flight", "rate_limited", "overloaded", "busy", "quota_exceeded"})
"""Refusals that waiting can cure, when they say how long (``retry_after_s`` > 0): not ``invalid``
or ``forbidden`` (the message itself is refused), nor a refusal without a retry-after (e.g. a
submission larger than the tenant's whole quota)."""


@dataclass(frozen=True)
class Resubmit:
    """Opt-in: resubmit a refused task by itself, under the same task id, so never a second task.

    After a refusal that waiting can cure (``RETRYABLE``, with a ``retry_after_s``), the client
    waits what the refusal says (up to a fifth longer, never less) and submits again: at most
    ``attempts`` more times, and at most ``max_wait_s`` seconds of waiting in all (following, also
    within the ``timeout``). A refusal whose wait would pass a bound ends the submission as it is.

    One task at most, however the attempts go: each attempt is the same submission under a
    message id of its own (``task.submitted:<tenant>:<task>:<attempt>``; the same id would be
    dropped by the stream's duplicate window, and the planner never see it), and the planner keeps
    one task record per task id: an attempt that finds the task admitted or ended is a copy of it
    (``_on_submitted``), never a new task. A refusal is matched to its attempt (it names the
    submission it answers, ``Mesh-Causation``), so a late copy of an earlier refusal is not taken
    for the answer to a later attempt."""

    attempts: int = 3
    max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.max_wait_s < 0:
            raise ValueError(f"attempts and max_wait_s must be >= 0, not {self.attempts} and {self.max_wait_s}")

    def pause(self, refusal: TaskRejected, resubmitted: int, waited_s: float) -> float | None:
        """How long to wait before resubmitting after ``refusal``, having resubmitted
        ``resubmitted`` times and waited ``waited_s`` so far; None: not again."""
        after = refusal.retry_after_s or 0.0
        if resubmitted >= self.attempts or refusal.code not in RETRYABLE or after <= 0:
            return None
        pause = later(after)
        return pause if waited_s + pause <= self.max_wait_s else None


def later(retry_after_s: float) -> float:
    """When to come back after being told ``retry_after_s``: never sooner, up to a fifth later.
    The mesh already spreads the clients it refuses; this spreads those told the same anyway (a
    fixed wait such as ``overloaded``'s, or an older planner's)."""
    return retry_after_s * random.uniform(1.0, 1.2)


async def _first(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout``."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def traceparent() -> str:
    """The W3C trace context a submission starts its task's trace with: the caller's current
    span when the application traces (its trace then holds the whole task), otherwise a new
    trace. ``meshctl trace`` follows it through every message of the task."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class Submission:
    """One submission of ``TenantClient.submit``: ``seen`` what the client saw of the task, ``done``
    set by the current attempt's outcome, ``taken`` by the planner taking the task up. The client's
    own helper: it believes what it reads through the client's verifier and reads the client's
    stored outcomes."""

    def __init__(self, client: Client, submitted: TaskSubmitted, on_event: Callable[[Contract], None] | None) -> None:
        self.client, self.submitted, self.on_event = client, submitted, on_event
        self.seen = Followed(submitted.task_id)
        self.done = asyncio.Event()  # an outcome of the current attempt
        self.taken = asyncio.Event()  # the planner took the task up
        self.msg_id = ""  # the current attempt's submission
        self.earlier = env.message_id(TaskSubmitted.type_name(), client.tenant, submitted.task_id, "")
        self._ids: set[str] = set()
        """Message ids seen: a stored message's live copies (republished by a planner that did not
        know it was sent: the stream dropped them) and its stored copy read back count once."""

    async def run(
        self, again: Resubmit, *, follow: bool, progress: bool, timeout: float, refusal_wait_s: float
    ) -> Followed:
        """Hand the submission in (and in again, as ``again`` allows) and wait as ``submit`` says."""
        subs = []
        if follow or refusal_wait_s > 0:  # subscribe before publishing so nothing is missed
            subs = await self._listen(follow=follow, progress=progress)
        self.seen.submitted_at = time.time()
        try:
            await self._attempts(again, follow=follow, timeout=timeout, refusal_wait_s=refusal_wait_s)
        finally:
            for s in subs:
                await s.unsubscribe()
        return self.seen

    async def _listen(self, *, follow: bool, progress: bool) -> list[Subscription]:
        nc, tenant, task_id = self.client.nc, self.client.tenant, self.seen.task_id
        assert nc is not None
        subs = [await nc.subscribe(f"task.*.{tenant}.{task_id}.>", cb=self.on_msg)]
        if progress or not follow:  # not following, its events say the planner took it up
            subs.append(await nc.subscribe(f"event.*.{tenant}.{task_id}.>", cb=self.on_msg))
        if progress and follow:
            subs += [
                await nc.subscribe(f"live.*.{tenant}.{task_id}.>", cb=self.on_msg),
                await nc.subscribe(f"usage.*.{tenant}.{task_id}.>", cb=self.on_msg),
            ]
        await nc.flush()
        return subs

    async def _attempts(self, again: Resubmit, *, follow: bool, timeout: float, refusal_wait_s: float) -> None:
        seen, done = self.seen, self.done
        deadline, waited = 0.0, 0.0
        trace = traceparent()  # one trace for every attempt: refusals and the run, one story
        while True:
            key = str(seen.attempts)  # the first is "1", as it always was
            self.msg_id = env.message_id(self.submitted.type, self.client.tenant, seen.task_id, key)
            refused = await self._hand_in(key, trace)
            # ``timeout`` runs from the first submission's hand-in (which may wait out a broker restart)
            deadline = deadline or time.monotonic() + timeout
            if refused is not None:
                seen.outcome, seen.finished_at = refused, time.time()
                done.set()
            if follow:
                await self._until_outcome(deadline)
            elif refusal_wait_s > 0 and not done.is_set():
                await _first(done, self.taken, timeout=refusal_wait_s)
            out = seen.outcome
            if not isinstance(out, TaskRejected):
                break
            pause = again.pause(out, seen.attempts - 1, waited)
            if pause is None or (follow and time.monotonic() + pause >= deadline):
                break
            seen.refusals.append(out)
            seen.outcome, seen.finished_at, seen.taken_up = None, 0.0, False
            done.clear()
            self.taken.clear()
            await asyncio.sleep(pause)
            waited += pause
            seen.attempts += 1

    def accept(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        seen = self.seen
        msg_id = (headers or {}).get(env.MSG_ID, "")
        if msg_id in self._ids:
            return
        try:
            model = self.client._believe(subject, data, headers)
        except (ContractError, IdentityError) as exc:
            seen.rejected_messages.append(f"{subject}: {exc}")
            return
        if msg_id:  # counted once it is believed: a forgery cannot shadow the real message
            self._ids.add(msg_id)
        if isinstance(model, TaskRejected):
            cause = (headers or {}).get(env.CAUSATION, "")
            if cause.startswith(self.earlier) and cause != self.msg_id:
                return  # a copy of an earlier attempt's refusal, arriving late (or stored)
        elif not isinstance(model, TaskSubmitted):  # (its own submission, as stored, comes back too)
            self.taken.set()
            if not seen.taken_up:
                seen.taken_up, seen.taken_up_at = True, time.time()
        if isinstance(model, TokenDelta):
            if model.kind == "delta" and not seen.first_token_at:
                seen.first_token_at = time.time()
            seen.tokens.append(model)
        elif isinstance(model, ProgressEvent):
            seen.events.append(model)
        elif isinstance(model, UsageRecorded):
            seen.usage.append(model)
        elif isinstance(model, TERMINAL) and seen.outcome is None:
            seen.outcome, seen.finished_at = model, time.time()
            self.done.set()
        if self.on_event is not None:
            self.on_event(model)

    async def on_msg(self, msg: Msg) -> None:
        self.accept(msg.subject, msg.data, msg.headers)

    async def catch_up(self) -> None:
        """Read the stored outcome, if there is one (it may have been published unseen)."""
        stored = await self.client._stored_outcome(self.seen.task_id)
        if stored is not None:
            self.accept(*stored)

    async def _hand_in(self, key: str, trace: str) -> TaskRejected | None:
        """Hand the submission in at its door under message id ``key``: None once stored, or the
        refusal (the door's, or a full TASK stream's) as the ``TaskRejected`` it amounts to."""
        submitted, tenant = self.submitted, self.client.tenant
        try:
            await self.client.publish(submitted, key, trace=trace)
        except DoorRefused as exc:
            # Refused at the door (the tenant's quota, a message the mesh cannot take): nothing was
            # stored and nothing runs; the same outcome as a refusal by the planner's admission.
            code = {"forbidden": "invalid", "unavailable": "overloaded"}.get(exc.code, exc.code)
            return TaskRejected(
                tenant=tenant, task_id=submitted.task_id, source_subject=submitted.subject(), code=code,
                reason=f"refused at the door: {exc.reason}",
                retry_after_s=exc.retry_after_s if code not in ("invalid", "suspended") else None,
            )  # fmt: skip
        except StreamFull as exc:
            # Refused by the store itself, before any planner saw it: the same answer as the
            # planner's ``overloaded`` (nothing was stored, nothing runs), said here.
            return TaskRejected(
                tenant=tenant, task_id=submitted.task_id, source_subject=submitted.subject(), code="overloaded",
                reason=f"the mesh refuses new tasks: {exc}", retry_after_s=STORE_FULL_RETRY_S,
            )  # fmt: skip
        return None

    async def _until_outcome(self, deadline: float) -> None:
        """Wait for the outcome until ``deadline``, reading the stored one after every reconnect
        (live delivery has a gap then) and once more before giving up."""
        done = self.done
        while not done.is_set() and (left := deadline - time.monotonic()) > 0:
            reconnected = asyncio.create_task(self.client._reconnected.wait())
            outcome = asyncio.create_task(done.wait())
            await asyncio.wait({reconnected, outcome}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for t in (reconnected, outcome):
                t.cancel()
            if reconnected.done() and not reconnected.cancelled() and not done.is_set():
                await self.catch_up()
        if not done.is_set():
            await self.catch_up()  # last look before reporting no outcome
