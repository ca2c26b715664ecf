"""The door: where a tenant's messages enter the mesh's streams, under the tenant's quota.

A tenant's client holds no right to publish onto a stream (``topology.Door`` says why). It
sends each message it would have published on ``<subject>`` as a core request to
``door.<subject>``. The service that consumes the contract keeps the door (every replica, a
queue group) and, for each message:

1. checks it as its consumer would: a contract this door takes, the ``Mesh-Schema`` header
   naming it, a body within the contract's limits, a ``Nats-Msg-Id``, and the sender's
   identity token (a tenant speaks only for itself);
2. charges it to the tenant's quota in the stream (``mesh_tenancy.quota``);
3. stores it on ``<subject>`` with the client's own headers (its token, id and trace), so the
   consumer sees what it always saw and the stream deduplicates a retry as before; a charge
   whose message the stream did not keep (a duplicate, a full stream) is given back;
4. answers with the stream's acknowledgement, or with why not.

The answer has the shape of JetStream's own publish answer, so a client that publishes with
its JetStream library's ``publish`` to the door subject gets an acknowledgement or an error as
usual: ``{"stream": "TASK", "seq": 12, "duplicate": false}``, or ``{"error": {"code": 429,
"err_code": 90001, "description": "quota_exceeded: ..."}, "mesh": {"code": "quota_exceeded",
"retry_after_s": 30.0}}``. Nothing refused is stored (the sender has it, and was told why), so
no dead letter is written for it either: a tenant cannot fill the DLQ through the door.

Tenants take turns: requests wait in a queue per tenant (at most ``QUEUE_PER_TENANT``; more are
answered ``busy`` at once) and the handlers take the tenants round-robin, so one tenant's flood
delays another tenant's message by one turn, not by the flood. A ``busy`` answer's
``retry_after_s`` is the refused client's own place on the drain of its tenant's queue (how long
a request takes here, shared among the tenants waiting, over the handlers; ``mesh_tenancy.retry_after``),
so clients turned away together do not all come back together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from opentelemetry import propagate, trace

from mesh_contracts import ContractError, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.base import ID_PATTERN
from mesh_contracts.registry import BY_SUBJECT_KEY, split_subject
from mesh_identity import IdentityError
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit.settings import BROKER_UNAVAILABLE, STREAM_FULL_CODE
from mesh_tenancy import metrics
from mesh_tenancy.errors import TenancyError
from mesh_tenancy.quota import Quotas
from mesh_tenancy.retry_after import RetryLine

if TYPE_CHECKING:
    from mesh_host import Mesh

log = logging.getLogger("mesh.door")

QUEUE_PER_TENANT = 64
"""Requests of one tenant waiting at one replica's door; more are answered ``busy``."""
BUSY_FLOOR_S = 0.05
BUSY_CEILING_S = 5.0
"""Bounds of a ``busy`` answer's ``retry_after_s``: the moment its tenant's queue is drained is
taken as at most ``BUSY_CEILING_S`` away, and the client's place at most that much after it."""
ID = re.compile(ID_PATTERN)

ERR_CODES = {
    "quota_exceeded": 90001,
    "rate_limited": 90002,
    "invalid": 90003,
    "forbidden": 90004,
    "busy": 90005,
    "unavailable": 90006,
    "suspended": 90007,
}
"""``err_code`` of each refusal, for clients that switch on JetStream's error codes (a full
stream answers with JetStream's own, ``STREAM_FULL_CODE``)."""
STATUS = {"quota_exceeded": 429, "rate_limited": 429, "busy": 429, "invalid": 400, "forbidden": 403, "suspended": 403}


@dataclass(frozen=True)
class DoorRefused(TenancyError):
    """The door did not store the message, and why: ``code`` (``quota_exceeded``,
    ``rate_limited``, ``busy``, ``invalid``, ``forbidden``, ``unavailable``, ``suspended``), one line, and when to
    try again (0: not by waiting)."""

    code: str
    reason: str
    retry_after_s: float = 0.0

    def __str__(self) -> str:
        retry = f" (retry after {self.retry_after_s:g}s)" if self.retry_after_s else ""
        return f"{self.code}: {self.reason}{retry}"


@dataclass(frozen=True)
class Stored:
    """The stream's acknowledgement of a message handed in at a door."""

    stream: str
    seq: int
    duplicate: bool = False


def ack_body(stream: str, seq: int, duplicate: bool) -> bytes:
    return json.dumps({"stream": stream, "seq": seq, "duplicate": duplicate}).encode()


def refusal_body(refused: DoorRefused) -> bytes:
    status = STATUS.get(refused.code, 503)
    error = {"code": status, "err_code": ERR_CODES.get(refused.code, 0), "description": str(refused)}
    return json.dumps({"error": error, "mesh": {"code": refused.code, "retry_after_s": refused.retry_after_s}}).encode()


def full_body(stream: str, description: str) -> bytes:
    """JetStream's own answer for a stream at its cap (``StreamFull.of`` knows it)."""
    error = {"code": 503, "err_code": STREAM_FULL_CODE, "description": description}
    return json.dumps({"error": error, "stream": stream}).encode()


def read_reply(data: bytes) -> Stored:
    """A door's answer: the acknowledgement, or ``DoorRefused`` / ``StreamFull``."""
    from mesh_kit.settings import StreamFull

    try:
        answer = json.loads(data)
    except ValueError:
        raise DoorRefused("unavailable", f"unreadable answer from the door: {data[:80]!r}") from None
    error = answer.get("error")
    if error is None:
        return Stored(str(answer.get("stream", "")), int(answer.get("seq", 0)), bool(answer.get("duplicate")))
    if error.get("err_code") == STREAM_FULL_CODE:
        raise StreamFull(str(answer.get("stream", "")), str(error.get("description", "full")))
    mesh = answer.get("mesh") or {}
    code = str(mesh.get("code") or "unavailable")
    reason = str(error.get("description", "")).removeprefix(f"{code}: ")
    reason = re.sub(r" \(retry after [0-9.]+s\)$", "", reason)
    raise DoorRefused(code, reason, float(mesh.get("retry_after_s") or 0.0))


class Door:
    """One service's doors (every tenant-written contract it consumes), kept from ``start`` to ``stop``."""

    def __init__(self, mesh: Mesh, doors: list[topo.Door], quotas: Quotas) -> None:
        self.mesh, self.doors, self.quotas = mesh, doors, quotas
        self._subs: list[Any] = []
        self._queues: OrderedDict[str, deque[Msg]] = OrderedDict()
        """Per tenant, requests waiting here, tenants in turn order."""
        self._ready = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        """Requests being handled now (a stop lets them finish)."""
        self.handle_s = 0.005
        """How long a request takes to handle here (moving average): the drain of a ``busy`` answer."""
        self.line = RetryLine(BUSY_FLOOR_S, BUSY_CEILING_S)

    async def start(self) -> None:
        nc = self.mesh.nc
        for d in self.doors:
            self._subs.append(await nc.subscribe(d.pattern, queue=f"{self.mesh.service}-door", cb=self._arrived))
        self._workers = [
            asyncio.create_task(self._work(), name=f"door-{i}") for i in range(self.mesh.settings.max_workers)
        ]

    async def stop(self) -> None:
        """Take no more; finish what is queued (the graceful timeout), then stop the handlers."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.mesh.settings.graceful_timeout_s):
                while self._busy or any(self._queues.values()):
                    await asyncio.sleep(0.05)
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        self._workers.clear()

    async def _arrived(self, raw: Msg) -> None:
        """The subscription's callback: queue the request under its tenant, at once (a flood of
        one tenant's requests must not stand between another tenant's request and a handler)."""
        tokens = raw.subject.split(".")
        tenant = tokens[3] if len(tokens) == 6 else ""
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
        if len(q) >= QUEUE_PER_TENANT:
            self.mesh.count(metrics.M_DOOR_REFUSED, {"tenant": tenant or "-", "code": "busy"})
            why = f"tenant {tenant} has {len(q)} messages waiting at this door"
            await self._answer(raw, refusal_body(DoorRefused("busy", why, self.busy_for(tenant, len(q)))))
            return
        q.append(raw)
        self._ready.set()

    def busy_for(self, tenant: str, waiting: int, now: float | None = None) -> float:
        """The ``retry_after_s`` of one more of ``tenant``'s requests turned away while ``waiting``
        of its requests wait here: the handlers take one of its requests every ``handle_s`` x
        tenants waiting / handlers, so its queue has room again once those are taken, and each
        client turned away is given its own place after that."""
        per_request = self.handle_s * max(1, len(self._queues)) / max(1, len(self._workers))
        at = time.monotonic() if now is None else now
        return self.line.place(tenant, at, per_request, min(BUSY_CEILING_S, waiting * per_request))

    def _next(self) -> Msg | None:
        """The next request, tenants in turn: the first tenant with one waiting goes to the back."""
        for tenant in list(self._queues):
            q = self._queues[tenant]
            if not q:
                del self._queues[tenant]
                continue
            raw = q.popleft()
            self._queues.move_to_end(tenant)
            return raw
        return None

    async def _work(self) -> None:
        while True:
            raw = self._next()
            if raw is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            self._busy += 1
            started = time.monotonic()
            try:
                await self._handle(raw)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the door: the client is told and may retry
                log.exception("door: handling %s failed", raw.subject)
                await self._answer(raw, refusal_body(DoorRefused("unavailable", "the door failed; retry", 1.0)))
            finally:
                self._busy -= 1
                self.handle_s = 0.95 * self.handle_s + 0.05 * (time.monotonic() - started)

    async def _handle(self, raw: Msg) -> None:
        parent = propagate.extract(dict(raw.headers or {}))
        with self.mesh.tracer.start_as_current_span(
            f"{raw.subject} door", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"messaging.system": "nats", "messaging.destination.name": raw.subject},
        ):  # fmt: skip
            try:
                stored = await self._admit(raw)
            except DoorRefused as refused:
                tenant = raw.subject.split(".")[3] if raw.subject.count(".") == 5 else "-"
                self.mesh.count(metrics.M_DOOR_REFUSED, {"tenant": tenant, "code": refused.code})
                self.mesh.rejections.warn(f"door refused {raw.subject}: {refused}")
                await self._answer(raw, refusal_body(refused))
                return
            await self._answer(raw, stored)

    async def _admit(self, raw: Msg) -> bytes:
        """Check, charge and store one request; the answer's body, or ``DoorRefused``."""
        subject = topo.stored_subject(raw.subject)
        headers = dict(raw.headers or {})
        try:
            parts = split_subject(subject)
        except ContractError as exc:
            raise DoorRefused("invalid", str(exc)) from None
        if not ID.match(parts.tenant) or not ID.match(parts.task_id):
            raise DoorRefused("invalid", f"tenant and task ids must match {ID_PATTERN}")
        mesh = self.mesh
        await mesh.verifier.tenants.know(parts.tenant)  # a tenant added at runtime: its record, read once
        contract = BY_SUBJECT_KEY.get((parts.domain, parts.major, parts.event))
        if parts.domain != "control" and mesh.verifier.tenants.status(parts.tenant) == "suspended":
            # New work only: a suspended tenant may still halt or cancel what it has running.
            raise DoorRefused("suspended", f"tenant {parts.tenant} is suspended: no new work until an operator "
                              "resumes it (meshctl tenant resume)")  # fmt: skip
        door = next((d for d in self.doors if contract is not None and topo.door_of(contract) == d), None)
        if contract is None or door is None:
            raise DoorRefused("invalid", f"no contract of this door is sent on {subject}")
        if headers.get(env.SCHEMA) != contract.schema_id():
            raise DoorRefused(
                "invalid", f"header {env.SCHEMA} must be {contract.schema_id()!r}, not {headers.get(env.SCHEMA)!r}"
            )
        if any(h in headers for h in (env.REDRIVE, env.REDRIVE_OF, env.ORIGINAL_STORED_AT)):
            # Only an operator re-drives a dead letter (``meshctl dlq retry``, straight onto the
            # stream with the admin identity); from a tenant these headers can only be an attempt to
            # have a captured token judged at another time.
            raise DoorRefused("forbidden", "re-drive headers: only an operator re-drives a message (meshctl dlq retry)")
        msg_id = headers.get(env.MSG_ID, "")
        if not msg_id:
            raise DoorRefused("invalid", f"header {env.MSG_ID} is missing: a retry could not be told from a copy")
        try:
            model = parse_message(subject, raw.data, strict=mesh.settings.strict_contracts, limits=mesh.limits)
        except ContractError as exc:
            raise DoorRefused("invalid", env.one_line(str(exc), 500)) from None
        try:
            await mesh.verify_current(
                lambda: mesh.verifier.verify_with_facts(
                    headers.get(env.IDENTITY), raw.data, model, headers.get(env.FACTS), msg_id=msg_id
                )
            )
        except IdentityError as exc:
            raise DoorRefused("forbidden", f"identity: {env.one_line(str(exc), 300)}") from None
        except ContractError as exc:  # its facts (what the budget is told) contradict its body
            raise DoorRefused("invalid", env.one_line(str(exc), 300)) from None
        quotas = self.quotas
        size = env.stored_size(subject, raw.data, headers)
        # What its tasks stored in the streams it never writes to: no new work while over a share
        # there (a halt or cancel is not new work: it is never refused for that).
        refusal = await quotas.footprint(parts.tenant) if door.contract.spec.domain != "control" else None
        if refusal is not None:
            raise DoorRefused(refusal.code, f"tenant {parts.tenant}: {refusal.reason}", refusal.retry_after_s)
        refusal, charged_at = await quotas.charge(parts.tenant, door.stream, size)
        if refusal is not None:
            raise DoorRefused(refusal.code, f"tenant {parts.tenant} in {door.stream}: {refusal.reason}",
                              refusal.retry_after_s)  # fmt: skip
        try:
            ack = await mesh.connection.js().publish(
                subject, raw.data, headers=headers, stream=door.stream, timeout=5.0
            )
        except nats.js.errors.APIError as exc:
            await quotas.refund(parts.tenant, door.stream, size, charged_at)
            if exc.err_code == STREAM_FULL_CODE:
                mesh.count(tel.M_STREAM_FULL, {"stream": door.stream})
                return full_body(door.stream, exc.description or "full")
            raise DoorRefused("unavailable", f"{door.stream}: {exc.description}", 1.0) from None
        except BROKER_UNAVAILABLE as exc:
            await quotas.refund(parts.tenant, door.stream, size, charged_at)
            raise DoorRefused("unavailable", f"{door.stream} did not answer ({type(exc).__name__})", 1.0) from None
        if ack.duplicate:
            await quotas.refund(parts.tenant, door.stream, size, charged_at)
        mesh.count(metrics.M_DOOR_STORED, {"tenant": parts.tenant, "stream": door.stream})
        return ack_body(ack.stream, ack.seq, bool(ack.duplicate))

    async def _answer(self, raw: Msg, body: bytes) -> None:
        if not raw.reply:
            return  # published without asking for an answer: nobody to tell
        with contextlib.suppress(nats.errors.Error):
            await self.mesh.nc.publish(raw.reply, body)
