"""A tenant's client: submit a task and follow it live (what ``meshctl submit`` uses).

It holds only the tenant's client identity: it can publish that tenant's task
submissions and control messages, and read that tenant's events and task outcomes.
Everything it reads is verified against the trust bundle before it is believed.

Following is live (core subscriptions), and live delivery has a gap while the client
reconnects (its server restarted, or a cluster node died). An outcome published in that gap
is still stored in the ``TASK`` stream, so after every reconnect, and once more before giving
up, the client reads the task's stored outcome (``DIRECT.GET``, the one read its identity
allows). A task that finished is never reported as timed out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh_contracts import Contract, ContractError, parse_message
from mesh_contracts.topology import STREAMS, door_subject
from mesh_contracts.v1 import (
    ControlCancel,
    ControlHalt,
    ControlResume,
    IngestCompleted,
    IngestRequested,
    ProgressEvent,
    ReleaseChange,
    ReleaseChanged,
    Replay,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    TaskPolicy,
    TaskRejected,
    TaskSignal,
    TaskSubmitted,
    TokenDelta,
    UsageRecorded,
    WorkflowChange,
    WorkflowChanged,
)
from mesh_identity import IdentityError, Signer, TrustBundle, Verifier
from mesh_kit import envelope as env
from mesh_kit import wire
from mesh_kit.fair import PRIORITY
from mesh_kit.settings import (
    BROKER_UNAVAILABLE,
    StreamFull,
    inbox_prefix,
    log_nats_error,
    nats_servers,
    tls_context,
)
from mesh_tenancy.door import DoorRefused, Stored, read_reply
from meshctl.errors import MeshctlError

if TYPE_CHECKING:
    from meshctl.identity import Identities

TERMINAL = (TaskCompleted, TaskFailed, TaskRejected)
STORE_FULL_RETRY_S = 30.0
"""The ``retry_after_s`` of a submission the TASK stream refused (full): as the planner's own
``overloaded`` refusal (``MESH_STORE_HIGH_WATER``) says."""
CONNECT_TIMEOUT_S = 30.0
"""How long a client tries to make its first connection before it gives up (a broker restarting
comes back within it; once connected, it reconnects for as long as it lives)."""


class ConnectFailed(ConnectionError, MeshctlError):
    """The client could not connect, in one line saying why (a certificate no CA given to the client
    vouches for, or the last error seen before its connect timeout)."""


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


def jitter(backoff_s: float) -> float:
    """A pause of our own choosing (the broker away): somewhere in its second half."""
    return backoff_s * random.uniform(0.5, 1.0)


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


class TenantClient:
    def __init__(
        self, nats_url: str, tenant: str, creds: Path, signing_key: Path, trust_bundle: Path, tls_ca: Path | None = None,
        *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:  # fmt: skip
        """``tls_ca``: the mesh's CA certificate (``.mesh/tls/ca.pem``, minted by ``meshctl init``);
        without it the broker's certificate is checked against the system's CAs, which a mesh's own
        CA is not among. ``connect_timeout_s`` bounds the first connection (``ConnectFailed``)."""
        self.nats_url, self.tenant, self.tls_ca = nats_url, tenant, tls_ca
        self.connect_timeout_s = connect_timeout_s
        self.principal = f"client.{tenant}"
        self.creds = creds
        self.signer = Signer.from_file(self.principal, signing_key)
        self.trust_bundle = trust_bundle
        self.verifier = Verifier(TrustBundle.from_file(trust_bundle))
        self.nc: NATS | None = None
        self._reconnected = asyncio.Event()  # replaced on every reconnect: waiters see each one

    @classmethod
    def of(cls, ids: Identities, nats_url: str, tenant: str) -> TenantClient:
        """The tenant's own client with the identity a mesh home holds for it (not yet connected)."""
        p = f"client.{tenant}"
        tls_ca = ids.tls_ca if ids.tls_ca.exists() else None
        return cls(nats_url, tenant, ids.creds(p), ids.signing_key(p), ids.trust_bundle, tls_ca)

    async def _on_reconnect(self) -> None:
        self._reconnected.set()
        self._reconnected = asyncio.Event()

    async def __aenter__(self) -> TenantClient:
        wire.install()  # the faster header parser: a client following a task reads every event
        self.nc = await self._connect()
        return self

    async def _connect(self) -> NATS:
        """Connect, or raise ``ConnectFailed`` within ``connect_timeout_s``. Once connected the
        client reconnects without end (a broker restart, a cluster node lost); but nats-py applies
        that to the first connection too, retrying silently forever, e.g. a TLS handshake that can
        never succeed because the client was given no CA. A certificate the client cannot verify
        ends the attempt at once (trying again cannot change it); anything else, at the timeout."""
        untrusted: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        last: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            last[:] = [exc]
            if isinstance(exc, ssl.SSLCertVerificationError) and not untrusted.done():
                untrusted.set_result(exc)
            await log_nats_error(exc)

        nc = NATS()
        connecting = asyncio.create_task(nc.connect(
            nats_servers(self.nats_url),
            user_credentials=str(self.creds),
            name=self.principal,
            inbox_prefix=inbox_prefix(self.principal),
            max_reconnect_attempts=-1,
            connect_timeout=max(1, min(5, int(self.connect_timeout_s))),
            error_cb=on_error,
            reconnected_cb=self._on_reconnect,
            tls=tls_context(self.tls_ca),
        ))  # fmt: skip
        racing: set[asyncio.Future[None] | asyncio.Future[Exception]] = {connecting, untrusted}
        await asyncio.wait(racing, timeout=self.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if connecting.done():
            connecting.result()  # raises what the first connection failed with, if it did
            return nc
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise ConnectFailed(self._why_not(untrusted.result() if untrusted.done() else (last[0] if last else None)))

    def _why_not(self, exc: Exception | None) -> str:
        where = f"cannot connect to {self.nats_url}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = exc.verify_message or str(exc)
            if self.tls_ca is None:
                return (f"{where}: the broker's TLS certificate is not trusted ({detail}) and this client was "
                        "given no CA: pass the mesh's CA (tls_ca=.mesh/tls/ca.pem, minted by meshctl init; "
                        "MESH_TLS_CA_FILE for meshctl)")  # fmt: skip
            return f"{where}: the broker's TLS certificate is not signed by the CA in {self.tls_ca} ({detail})"
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "no answer"
        return f"{where} within {self.connect_timeout_s:g} s ({why})"

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def publish(
        self, model: Contract, key: str = "1", *, within_s: float = 60.0, trace: str | None = None,
        signer: Signer | None = None,
    ) -> Stored:  # fmt: skip
        """Hand the message in at its door (``mesh_tenancy.door``: a tenant writes to no stream itself)
        until the stream acknowledges it. While the broker or the door's keeper is unavailable (a
        restart, a cluster electing a new leader after a node died) it retries for up to
        ``within_s``: the message id is deterministic, so a retry of one that did land is stored
        once. ``DoorRefused`` when the door says no (the tenant's quota, a bad message), with
        ``code`` and ``retry_after_s``; ``StreamFull`` when the stream is at its cap. A submission
        starts its task's trace (``trace``, a W3C traceparent; by default ``traceparent()``).
        ``signer``: a person's key (an author's change) instead of the client's own."""
        assert self.nc is not None
        body = model.to_bytes()
        headers = env.headers_for(
            signer or self.signer, model, body, env.message_id(model.type, model.tenant, model.task_id, key)
        )
        if isinstance(model, TaskSubmitted):
            headers[PRIORITY] = str(model.priority)  # the planner's fair queue reads it unparsed
            headers["traceparent"] = trace or traceparent()  # the task's trace starts here
        deadline, backoff = time.monotonic() + within_s, 0.1
        door = door_subject(model.subject())
        while True:
            try:
                reply = await self.nc.request(door, body, headers=headers, timeout=5.0)
                return read_reply(reply.data)
            except StreamFull:
                raise  # not an outage: it stays full until there is room
            except DoorRefused as exc:
                if exc.code not in ("unavailable", "busy"):
                    raise
                # busy: the door gave this client its own place on its queue's drain; come then
                pause = later(exc.retry_after_s) if exc.code == "busy" and exc.retry_after_s else jitter(backoff)
                if time.monotonic() + pause > deadline:
                    raise
            except BROKER_UNAVAILABLE:
                pause = jitter(backoff)
                if time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            backoff = min(backoff * 2, 2.0)

    async def submit(
        self,
        goal: str,
        *,
        task_id: str | None = None,
        limits: TaskLimits | None = None,
        policy: TaskPolicy | None = None,
        priority: int = 5,
        labels: dict[str, str] | None = None,
        follow: bool = True,
        progress: bool = True,
        timeout: float = 120.0,
        on_event: Callable[[Contract], None] | None = None,
        replay: Replay | None = None,
        resubmit: Resubmit | None = None,
        refusal_wait_s: float = 0.0,
        workflow: str | None = None,
        inputs: dict[str, Any] | None = None,
        release: str = "",
    ) -> Followed:
        """Publish ``task.submitted`` and (optionally) follow the task to its outcome.
        ``replay`` makes it a replay of an earlier task (``meshctl replay``). ``workflow`` names a
        registered workflow of the tenant to run (``name[@latest|@<version>]``), with its ``inputs``.
        ``release`` pins a drafted release of the tenant's behaviour (``meshctl release eval``).

        ``progress=False`` waits for the outcome alone: no progress events, usage records or
        streamed tokens reach this client, so it verifies a few messages a task instead of dozens (a program that
        needs only the result).

        A submission refused at the door (over the tenant's tasks in flight or submissions per
        second, or the mesh near a stream's cap) ends at once with a ``TaskRejected`` outcome
        whose ``code`` says which and whose ``retry_after_s`` says when to try again; so does
        one the TASK stream itself refuses because it is full (``overloaded``). With ``resubmit``
        (opt-in) such a refusal is followed by a resubmission of the same task after that wait,
        within the policy's bounds (``Resubmit``); ``attempts`` and ``refusals`` say how it went.

        Without ``follow`` it returns once the submission is stored; ``refusal_wait_s`` > 0 waits
        up to that long, after each submission, for the planner's decision: a refusal (the
        ``outcome``, and a resubmission if ``resubmit`` allows) or a sign it took the task up
        (``taken_up``). A decision still not made then (the planner behind a backlog, or the task
        waiting for a run slot) may be a refusal later."""
        assert self.nc is not None
        task_id = task_id or f"t-{uuid.uuid4().hex[:12]}"
        seen = Followed(task_id)
        done = asyncio.Event()  # an outcome of the current attempt
        taken = asyncio.Event()  # the planner took the task up
        current = {"msg_id": ""}  # the current attempt's submission
        earlier = env.message_id(TaskSubmitted.type_name(), self.tenant, task_id, "")

        def accept(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            try:
                model = self._believe(subject, data, headers)
            except (ContractError, IdentityError) as exc:
                seen.rejected_messages.append(f"{subject}: {exc}")
                return
            if isinstance(model, TaskRejected):
                cause = (headers or {}).get(env.CAUSATION, "")
                if cause.startswith(earlier) and cause != current["msg_id"]:
                    return  # a copy of an earlier attempt's refusal, arriving late (or stored)
            elif not isinstance(model, TaskSubmitted):  # (its own submission, as stored, comes back too)
                taken.set()
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
                done.set()
            if on_event is not None:
                on_event(model)

        async def on_msg(msg: Msg) -> None:
            accept(msg.subject, msg.data, msg.headers)

        async def catch_up() -> None:
            """Read the stored outcome, if there is one (it may have been published unseen)."""
            stored = await self._stored_outcome(task_id)
            if stored is not None:
                accept(*stored)

        subs = []
        if follow or refusal_wait_s > 0:  # subscribe before publishing so nothing is missed
            subs = [await self.nc.subscribe(f"task.*.{self.tenant}.{task_id}.>", cb=on_msg)]
            if progress or not follow:  # not following, its events say the planner took it up
                subs.append(await self.nc.subscribe(f"event.*.{self.tenant}.{task_id}.>", cb=on_msg))
            if progress and follow:
                subs += [
                    await self.nc.subscribe(f"live.*.{self.tenant}.{task_id}.>", cb=on_msg),
                    await self.nc.subscribe(f"usage.*.{self.tenant}.{task_id}.>", cb=on_msg),
                ]
            await self.nc.flush()
        seen.submitted_at = time.time()
        submitted = TaskSubmitted(
            tenant=self.tenant,
            task_id=task_id,
            goal=goal,
            limits=limits or TaskLimits(),
            policy=policy or TaskPolicy(),
            labels=labels or {},
            priority=priority,
            replay=replay,
            workflow=workflow,
            inputs=inputs or {},
            release=release,
        )
        again = resubmit or Resubmit(attempts=0)
        deadline, waited = 0.0, 0.0
        trace = traceparent()  # one trace for every attempt: refusals and the run, one story
        try:
            while True:
                key = str(seen.attempts)  # the first is "1", as it always was
                current["msg_id"] = env.message_id(submitted.type, self.tenant, task_id, key)
                refused = await self._hand_in(submitted, key, trace)
                # ``timeout`` runs from the first submission's hand-in (which may wait out a broker restart)
                deadline = deadline or time.monotonic() + timeout
                if refused is not None:
                    seen.outcome, seen.finished_at = refused, time.time()
                    done.set()
                if follow:
                    await self._until_outcome(done, deadline, catch_up)
                elif refusal_wait_s > 0 and not done.is_set():
                    await _first(done, taken, timeout=refusal_wait_s)
                out = seen.outcome
                if not isinstance(out, TaskRejected):
                    break
                pause = again.pause(out, seen.attempts - 1, waited)
                if pause is None or (follow and time.monotonic() + pause >= deadline):
                    break
                seen.refusals.append(out)
                seen.outcome, seen.finished_at, seen.taken_up = None, 0.0, False
                done.clear()
                taken.clear()
                await asyncio.sleep(pause)
                waited += pause
                seen.attempts += 1
        finally:
            for s in subs:
                await s.unsubscribe()
        return seen

    async def _hand_in(self, submitted: TaskSubmitted, key: str, trace: str) -> TaskRejected | None:
        """Hand the submission in at its door under message id ``key``: None once stored, or the
        refusal (the door's, or a full TASK stream's) as the ``TaskRejected`` it amounts to."""
        try:
            await self.publish(submitted, key, trace=trace)
        except DoorRefused as exc:
            # Refused at the door (the tenant's quota, a message the mesh cannot take): nothing was
            # stored and nothing runs; the same outcome as a refusal by the planner's admission.
            code = {"forbidden": "invalid", "unavailable": "overloaded"}.get(exc.code, exc.code)
            return TaskRejected(
                tenant=self.tenant, task_id=submitted.task_id, source_subject=submitted.subject(), code=code,
                reason=f"refused at the door: {exc.reason}",
                retry_after_s=exc.retry_after_s if code != "invalid" else None,
            )  # fmt: skip
        except StreamFull as exc:
            # Refused by the store itself, before any planner saw it: the same answer as the
            # planner's ``overloaded`` (nothing was stored, nothing runs), said here.
            return TaskRejected(
                tenant=self.tenant, task_id=submitted.task_id, source_subject=submitted.subject(), code="overloaded",
                reason=f"the mesh refuses new tasks: {exc}", retry_after_s=STORE_FULL_RETRY_S,
            )  # fmt: skip
        return None

    async def _until_outcome(self, done: asyncio.Event, deadline: float, catch_up: Callable[[], Any]) -> None:
        """Wait for the outcome until ``deadline``, reading the stored one after every reconnect
        (live delivery has a gap then) and once more before giving up."""
        while not done.is_set() and (left := deadline - time.monotonic()) > 0:
            reconnected = asyncio.create_task(self._reconnected.wait())
            outcome = asyncio.create_task(done.wait())
            await asyncio.wait({reconnected, outcome}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for t in (reconnected, outcome):
                t.cancel()
            if reconnected.done() and not reconnected.cancelled() and not done.is_set():
                await catch_up()
        if not done.is_set():
            await catch_up()  # last look before reporting no outcome

    async def change_workflow(
        self, change: WorkflowChange, author: Signer, *, timeout: float = 30.0
    ) -> WorkflowChanged | TaskRejected:
        """Hand an author's change in (signed with their key) and wait for the planner's answer:
        ``workflow.changed`` (applied, or refused with why), or ``task.rejected`` when the change
        could not even be read. ``TimeoutError`` when no answer came within ``timeout``."""
        answer = await self._change(change, author, WorkflowChanged, "workflow change", timeout)
        assert isinstance(answer, WorkflowChanged | TaskRejected)
        return answer

    async def change_release(
        self, change: ReleaseChange, person: Signer, *, timeout: float = 30.0
    ) -> ReleaseChanged | TaskRejected:
        """Hand a person's release change in (an author's or an approver's, signed with their key)
        and wait for the planner's answer: ``release.changed`` (applied, or refused with why), or
        ``task.rejected``. ``TimeoutError`` when no answer came within ``timeout``."""
        answer = await self._change(change, person, ReleaseChanged, "release change", timeout)
        assert isinstance(answer, ReleaseChanged | TaskRejected)
        return answer

    async def _change(
        self, change: Contract, person: Signer, answered: type[Contract], what: str, timeout: float
    ) -> Contract:
        assert self.nc is not None
        answer: asyncio.Future[Contract] = asyncio.get_running_loop().create_future()

        def accept(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            try:
                model = self._believe(subject, data, headers)
            except (ContractError, IdentityError):
                return
            if isinstance(model, answered | TaskRejected) and not answer.done():
                answer.set_result(model)

        async def on_msg(msg: Msg) -> None:
            accept(msg.subject, msg.data, msg.headers)

        sub = await self.nc.subscribe(f"task.*.{self.tenant}.{change.task_id}.>", cb=on_msg)
        try:
            await self.nc.flush()
            await self.publish(change, signer=person)
            deadline = time.monotonic() + timeout
            while not answer.done():
                try:
                    return await asyncio.wait_for(asyncio.shield(answer), timeout=min(2.0, timeout))
                except TimeoutError:
                    stored = await self._stored(answered, change.task_id)  # answered before we listened?
                    if stored is not None:
                        accept(*stored)
                    if time.monotonic() > deadline and not answer.done():
                        raise TimeoutError(f"no answer to {what} {change.task_id} within {timeout:g} s") from None
            return answer.result()
        finally:
            await sub.unsubscribe()

    async def registry(self, key: str, bucket: str = "workflows") -> dict[str, Any] | None:
        """A record of the tenant's workflow registry (KV ``workflows``, key ``<tenant>.<key>``), or
        of another bucket whose tenant keys a client reads (``releases``), or None. A client reads
        its own tenant's keys, one at a time (its only right on the bucket)."""
        assert self.nc is not None
        js = self.nc.jetstream(timeout=5.0)
        try:
            stored = await js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{self.tenant}.{key}", direct=True)
        except nats.js.errors.NotFoundError:
            return None
        if not stored.data or (stored.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return None
        value: dict[str, Any] = json.loads(stored.data)
        return value

    async def _stored(self, cls: type[Contract], task_id: str) -> tuple[str, bytes, dict[str, str] | None] | None:
        assert self.nc is not None
        subject = cls.spec.subject(self.tenant, task_id)
        try:
            stored = await self.nc.jetstream(timeout=5.0).get_last_msg(STREAMS[cls.spec.domain], subject, direct=True)
        except (nats.errors.Error, TimeoutError):
            return None
        return (subject, stored.data, stored.headers) if stored.data else None

    def _believe(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Contract:
        """Parse a message and verify its sender's token; raises ContractError / IdentityError.
        A token the client's bundle cannot verify sends it back to the trust-bundle file once: a
        rotation (``meshctl rotate``) has published newer keys there."""
        model = parse_message(subject, data)
        token = (headers or {}).get(env.IDENTITY)
        try:
            self.verifier.verify(token, data, model)
        except IdentityError:
            newer = TrustBundle.from_file(self.trust_bundle)
            if newer.revision <= self.verifier.bundle.revision:
                raise
            self.verifier.bundle = newer
            self.verifier.verify(token, data, model)
        return model

    async def _stored_outcome(self, task_id: str) -> tuple[str, bytes, dict[str, str] | None] | None:
        """The task's stored outcome as (subject, body, headers), unverified, or None."""
        assert self.nc is not None
        js = self.nc.jetstream(timeout=5.0)
        for cls in TERMINAL:
            subject = cls.spec.subject(self.tenant, task_id)
            try:
                stored = await js.get_last_msg(STREAMS[cls.spec.domain], subject, direct=True)
            except (nats.errors.Error, TimeoutError):
                continue  # not stored (or not reachable right now): live delivery may still come
            if stored.data:
                return subject, stored.data, stored.headers
        return None

    async def ingest(
        self, doc_id: str, data: bytes, media_type: str, *, title: str = "", timeout: float = 120.0
    ) -> IngestCompleted | None:
        """Hand one document to the RAG service and wait for its answer (None on timeout; ``ok`` false
        with the reason when the door refused it, e.g. over the tenant's ingest quota)."""
        assert self.nc is not None
        # One id per ingest: the same bytes ingested twice is two requests (the second one is
        # answered "unchanged"); a retry inside ``publish`` reuses the id and is stored once.
        ingest_id = f"ing-{uuid.uuid4().hex[:20]}"
        found: asyncio.Future[IngestCompleted] = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Msg) -> None:
            try:
                model = self._believe(msg.subject, msg.data, msg.headers)
            except (ContractError, IdentityError):
                return
            if isinstance(model, IngestCompleted) and not found.done():
                found.set_result(model)

        sub = await self.nc.subscribe(f"rag.*.{self.tenant}.{ingest_id}.ingested", cb=on_msg)
        try:
            await self.nc.flush()
            req = IngestRequested(
                tenant=self.tenant,
                task_id=ingest_id,
                doc_id=doc_id,
                media_type=media_type,  # type: ignore[arg-type]
                content_b64=base64.b64encode(data).decode(),
                title=title,
            )
            try:
                await self.publish(req, key=ingest_id)
            except DoorRefused as exc:  # not stored: the tenant's quota, or a request the door refuses
                return IngestCompleted(
                    tenant=self.tenant, task_id=ingest_id, doc_id=doc_id, ok=False, error=f"refused at the door: {exc}"
                )
            return await asyncio.wait_for(found, timeout)
        except TimeoutError:
            return None
        finally:
            await sub.unsubscribe()

    async def signal(
        self, task_id: str, name: str, payload: Any = None, *, key: str | None = None, timeout: float = 10.0
    ) -> ProgressEvent | Contract | None:
        """Send signal ``name`` (its ``payload`` any JSON value) to one of the tenant's workflow
        tasks and wait for what the planner made of it: the ``signal.taken``, ``signal.kept`` or
        ``signal.refused`` event (its message says why), the stored outcome if the task had
        already finished, or None if nothing was said within ``timeout``. ``key`` names the
        signal for deduplication (a retry with the same key is stored once; default: a new one)."""
        assert self.nc is not None
        stored = await self._stored_outcome(task_id)
        if stored is not None:
            return self._believe(*stored)
        key = key or uuid.uuid4().hex[:16]
        found: asyncio.Future[Contract] = asyncio.get_running_loop().create_future()
        wanted = ("signal.taken", "signal.kept", "signal.refused")

        async def on_msg(msg: Msg) -> None:
            try:
                model = self._believe(msg.subject, msg.data, msg.headers)
            except (ContractError, IdentityError):
                return
            if (
                isinstance(model, ProgressEvent)
                and model.stage in wanted
                and name in model.message
                and not found.done()
            ):
                found.set_result(model)

        sub = await self.nc.subscribe(f"event.*.{self.tenant}.{task_id}.>", cb=on_msg)
        try:
            await self.nc.flush()
            await self.publish(TaskSignal(tenant=self.tenant, task_id=task_id, name=name, payload=payload), key=key)
            return await asyncio.wait_for(found, timeout)
        except TimeoutError:
            return None
        finally:
            await sub.unsubscribe()

    async def control(self, action: str, task_id: str, reason: str, *, timeout: float = 10.0) -> Contract | None:
        """Halt, resume or cancel one of the tenant's tasks and wait until the planner has applied
        it: returns the ``task.halted`` / ``task.resumed`` event or the ``task.failed`` outcome,
        the stored outcome if the task had already finished, or None if nothing happened in
        ``timeout`` (an unknown task, or a resume of a task that is not halted)."""
        assert self.nc is not None
        stored = await self._stored_outcome(task_id)
        if stored is not None:
            return self._believe(*stored)
        cls = {"halt": ControlHalt, "resume": ControlResume, "cancel": ControlCancel}[action]
        wanted = {"halt": "task.halted", "resume": "task.resumed"}.get(action)
        found: asyncio.Future[Contract] = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Msg) -> None:
            try:
                model = self._believe(msg.subject, msg.data, msg.headers)
            except (ContractError, IdentityError):
                return
            hit = isinstance(model, ProgressEvent) and model.stage == wanted
            if (hit or isinstance(model, TERMINAL)) and not found.done():
                found.set_result(model)

        subs = [
            await self.nc.subscribe(f"event.*.{self.tenant}.{task_id}.>", cb=on_msg),
            await self.nc.subscribe(f"task.*.{self.tenant}.{task_id}.>", cb=on_msg),
        ]
        try:
            await self.nc.flush()
            # Each command is its own message: a second halt after a resume must not be deduplicated.
            await self.publish(cls(tenant=self.tenant, task_id=task_id, reason=reason), key=uuid.uuid4().hex[:16])
            return await asyncio.wait_for(found, timeout)
        except TimeoutError:
            return None
        finally:
            for sub in subs:
                await sub.unsubscribe()
