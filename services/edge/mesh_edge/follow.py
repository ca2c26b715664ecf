"""A task's events as a browser wants them: what is stored already (a late or resumed follower
misses nothing durable), then what comes live, each believed (its sender's token verified
against the trust bundle) and opened before it leaves the edge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from mesh_contracts import Contract, ContractError
from mesh_contracts.topology import STREAMS
from mesh_contracts.v1 import (
    ApprovalDecided,
    ApprovalRequested,
    ProgressEvent,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TokenDelta,
)
from mesh_identity import IdentityError
from meshctl.client import TenantClient

log = logging.getLogger("mesh.edge")

TERMINAL = (TaskCompleted, TaskFailed, TaskRejected)
DURABLE = ("event", "task", "approval")
"""The domains whose stored messages a browser is shown (merged in the order they were stored)."""
APPROVAL_FIELDS = {"approval_id", "step_id", "tool", "arguments", "reason", "risk", "injection_score", "sources",
                   "timeout_s"}  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``kind`` is ``progress``, ``token``, ``approval`` (a tool call waits
    for a person's decision), ``decision`` (one was made) or ``outcome``; ``id`` is the
    message's ``Nats-Msg-Id`` for what is stored (resume after it), '' for live tokens."""

    kind: str
    data: dict[str, Any]
    id: str = ""

    @property
    def last(self) -> bool:
        return self.kind == "outcome"


def shown(model: Contract) -> tuple[str, dict[str, Any]] | None:
    """What a browser is shown of a message (None: nothing)."""
    if isinstance(model, ProgressEvent):
        return "progress", model.model_dump(mode="json", include={"source", "stage", "message", "step_id"})
    if isinstance(model, TokenDelta):
        return "token", model.model_dump(mode="json", include={"step_id", "call_id", "seq", "text", "kind", "model"})
    if isinstance(model, ApprovalRequested):
        return "approval", model.model_dump(mode="json", include=APPROVAL_FIELDS)
    if isinstance(model, ApprovalDecided):
        return "decision", model.model_dump(mode="json", include={"approval_id", "approved", "decided_by", "comment"})
    if isinstance(model, TERMINAL):
        return "outcome", model.model_dump(mode="json", exclude={"tenant"})
    return None


def believed(client: TenantClient, subject: str, data: bytes, headers: dict[str, str] | None) -> Event | None:
    """The event a browser is shown of a message its sender's token vouches for (None: not
    believed, which is logged, or nothing to show)."""
    try:
        model = client._believe(subject, data, headers)
    except (ContractError, IdentityError) as exc:
        log.warning("not shown (%s): %s", subject, exc)
        return None
    out = shown(model)
    if out is None:
        return None
    stored = not subject.startswith(f"{TokenDelta.spec.domain}.")  # a live token is never stored: no id
    return Event(out[0], out[1], (headers or {}).get("Nats-Msg-Id", "") if stored else "")


class Follow:
    """Follows one task of one tenant for one event stream."""

    def __init__(self, client: TenantClient, task_id: str, after: str = "") -> None:
        self.client, self.task_id, self.after = client, task_id, after
        self.queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=10_000)
        self.seen: set[str] = set()
        self.subs: list[Any] = []

    async def _stored(self) -> list[tuple[str, bytes, dict[str, str] | None]]:
        """The task's stored messages in the order they were stored (direct gets by subject, each
        domain's stream in sequence, merged by the time each was stored)."""
        assert self.client.nc is not None
        js = self.client.nc.jetstream(timeout=5.0)
        found: list[tuple[float, int, tuple[str, bytes, dict[str, str] | None]]] = []
        for domain in DURABLE:
            subject, seq = f"{domain}.v1.{self.client.tenant}.{self.task_id}.>", 1
            while True:
                try:
                    got = await js.get_msg(STREAMS[domain], seq=seq, subject=subject, next=True, direct=True)
                except (nats.js.errors.NotFoundError, nats.errors.Error, TimeoutError):
                    break
                if got.seq is None:
                    break
                at = got.time.timestamp() if got.time else 0.0
                found.append((at, len(found), (got.subject or subject, got.data or b"", got.headers)))
                seq = got.seq + 1
        return [m for _, _, m in sorted(found)]

    async def start(self) -> None:
        """Subscribe to the task's live and stored subjects (before anything is read: what comes
        while the stored part is read waits in the queue, and a task submitted after this misses
        nothing, its streamed tokens included)."""
        nc = self.client.nc
        assert nc is not None

        async def put(msg: Msg) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # a browser that stopped reading loses live tokens only
                self.queue.put_nowait(msg)

        t = self.client.tenant
        self.subs = [await nc.subscribe(f"{d}.v1.{t}.{self.task_id}.>", cb=put) for d in ("live", *DURABLE)]

    async def close(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.subs = []

    async def _messages(self) -> AsyncGenerator[tuple[str, bytes, dict[str, str] | None], None]:
        """What is stored (after ``after``, or all of it if it names none of this task's), then
        what comes live, each message once."""
        stored = await self._stored()
        ids = [(headers or {}).get("Nats-Msg-Id", "") for _, _, headers in stored]
        self.seen.update(ids)
        for message in stored[ids.index(self.after) + 1 if self.after in ids else 0 :]:
            yield message
        while True:
            msg = await self.queue.get()
            mid = (msg.headers or {}).get("Nats-Msg-Id", "")
            if mid:
                if mid in self.seen:
                    continue
                self.seen.add(mid)
            yield msg.subject, msg.data, msg.headers

    async def events(self) -> AsyncGenerator[Event, None]:
        """The task's events, ending with its outcome (``start`` first)."""
        async for subject, data, headers in self._messages():
            event = believed(self.client, subject, data, headers)
            if event is not None:
                yield event
                if event.last:
                    return
