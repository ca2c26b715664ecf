"""A tenant's client: submit a task and follow it live (what ``meshctl submit`` uses).

It holds only the tenant's client identity: it can publish that tenant's task
submissions and control messages, and read that tenant's events and task outcomes.
Everything it reads is verified against the trust bundle before it is believed.

A submission, its resubmissions and its following are ``meshctl.submission``'s; here are the
connection, the door every message is handed in at, and the other requests (halt, resume and
cancel, signals, documents, workflow and release changes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import ssl
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh_contracts import Contract, ContractError, parse_message, sealing
from mesh_contracts.topology import STREAMS, door_subject
from mesh_contracts.v1 import (
    AgentChange,
    AgentChanged,
    ControlCancel,
    ControlHalt,
    ControlResume,
    IngestCompleted,
    IngestRequested,
    ProgressEvent,
    ReleaseChange,
    ReleaseChanged,
    Replay,
    TaskLimits,
    TaskPolicy,
    TaskRejected,
    TaskSignal,
    TaskSubmitted,
    ToolsChange,
    ToolsChanged,
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
from meshctl.submission import TERMINAL, Followed, Resubmit, Submission, later, traceparent

if TYPE_CHECKING:
    from meshctl.identity import Identities

CONNECT_TIMEOUT_S = 30.0
"""How long a client tries to make its first connection before it gives up (a broker restarting
comes back within it; once connected, it reconnects for as long as it lives)."""
DOOR_TIMEOUTS_S = (1.0, 2.0, 5.0)
"""How long each try of a hand-in waits for the door's answer (the last repeats). A door answers
in milliseconds; one killed while it held the request never answers, and a submission waited the
whole 5 s for it (the failover bench's slowest tasks: a planner killed as they were submitted).
A retry of one that did land is stored once (its message id is deterministic)."""


def stored_at(headers: dict[str, str] | None) -> float | None:
    """When a message read back from its stream was stored (its ``Nats-Time-Stamp``), or None
    for one delivered live."""
    stamp = (headers or {}).get("Nats-Time-Stamp")
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()  # nanoseconds: Python keeps microseconds
    except ValueError:
        return None


class ConnectFailed(ConnectionError, MeshctlError):
    """The client could not connect, in one line saying why (a certificate no CA given to the client
    vouches for, or the last error seen before its connect timeout)."""


def jitter(backoff_s: float) -> float:
    """A pause of our own choosing (the broker away): somewhere in its second half."""
    return backoff_s * random.uniform(0.5, 1.0)


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
        """The tenant's own client with the identity a mesh home holds for it (not yet connected);
        the process seals and opens tenants' content with the home's keys, unless it holds some."""
        if sealing.installed() is None:
            ids.install_keyring()
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
        deadline, backoff, tries = time.monotonic() + within_s, 0.1, 0
        door = door_subject(model.subject())
        while True:
            wait = DOOR_TIMEOUTS_S[min(tries, len(DOOR_TIMEOUTS_S) - 1)]
            tries += 1
            try:
                reply = await self.nc.request(door, body, headers=headers, timeout=wait)
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
        agent: str | None = None,
    ) -> Followed:
        """Publish ``task.submitted`` and (optionally) follow the task to its outcome.
        ``replay`` makes it a replay of an earlier task (``meshctl replay``). ``workflow`` names a
        registered workflow of the tenant to run (``name[@latest|@<version>]``), with its ``inputs``.
        ``release`` pins a drafted release of the tenant's behaviour (``meshctl release eval``).
        ``agent`` hands the goal to one of the tenant's agent profiles as one step (``name[@version]``).

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
        submitted = TaskSubmitted(
            tenant=self.tenant,
            task_id=task_id or f"t-{uuid.uuid4().hex[:12]}",
            goal=goal,
            limits=limits or TaskLimits(),
            policy=policy or TaskPolicy(),
            labels=labels or {},
            priority=priority,
            replay=replay,
            workflow=workflow,
            inputs=inputs or {},
            release=release,
            agent=agent,
        )
        return await Submission(self, submitted, on_event).run(
            resubmit or Resubmit(attempts=0), follow=follow, progress=progress, timeout=timeout,
            refusal_wait_s=refusal_wait_s,
        )  # fmt: skip

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

    async def change_agent(
        self, change: AgentChange, author: Signer, *, timeout: float = 30.0
    ) -> AgentChanged | TaskRejected:
        """Hand an author's change to the tenant's agent profiles in and wait for the planner's
        answer: ``agent.changed`` (applied, or refused with why), or ``task.rejected``."""
        answer = await self._change(change, author, AgentChanged, "agent change", timeout)
        assert isinstance(answer, AgentChanged | TaskRejected)
        return answer

    async def change_tools(
        self, change: ToolsChange, person: Signer, *, timeout: float = 30.0
    ) -> ToolsChanged | TaskRejected:
        """Hand a person's change to the tenant's tool servers in and wait for the tool-executor's
        answer: ``tools.changed`` (applied, or refused with why), or ``task.rejected``."""
        answer = await self._change(change, person, ToolsChanged, "tools change", timeout)
        assert isinstance(answer, ToolsChanged | TaskRejected)
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
        A message read back from its stream (a direct get: it carries ``Nats-Time-Stamp``) is
        judged as of when it was stored, so an outcome read an hour later still verifies (its
        token was valid then; judged now it would have expired). A token the client's bundle
        cannot verify sends it back to the trust-bundle file once: a rotation (``meshctl
        rotate``) has published newer keys there."""
        model = parse_message(subject, data)
        token = (headers or {}).get(env.IDENTITY)
        at = stored_at(headers)
        try:
            self.verifier.verify(token, data, model, at=at)
        except IdentityError:
            newer = TrustBundle.from_file(self.trust_bundle)
            if newer.revision <= self.verifier.bundle.revision:
                raise
            self.verifier.bundle = newer
            self.verifier.verify(token, data, model, at=at)
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
