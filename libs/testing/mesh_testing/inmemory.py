"""A service's handlers on a bus in memory: fast handler tests, no server.

``InMemoryBus(mesh)`` takes the place of the mesh's transport while it is open. What the mesh
publishes is recorded and, as a JetStream server would, handed to the mesh's own durables whose
filter matches, through the same pipeline every message takes in production
(``mesh_kit.consume``: decode, verify, handle, settle), and to the captures a test opened. A
test publishes what another service would have sent with ``publish``.

It is not a broker: nothing persists, a message is delivered once (what settle decided is in
``outcomes``: acked, nacked, rejected or parked), a parked message is handed in again when its
wait ends, and the same message id published twice is stored once (``PubAck.duplicate``), as
the server's deduplication window would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from nats.js.api import PubAck

from mesh_host import Mesh
from mesh_kit import envelope as env
from mesh_kit.connection import Transport
from mesh_testing.rights import matches


@dataclass
class Raw:
    """What nats-py hands a consumer, as far as the pipeline reads it."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int
    stored_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(
            num_delivered=1, timestamp=self.stored_at, sequence=SimpleNamespace(stream=self.seq, consumer=self.seq)
        )


class Message:
    def __init__(self, bus: InMemoryBus, raw: Raw, durable: str) -> None:
        self.bus, self.raw_message, self.durable = bus, raw, durable

    def _settled(self, how: str) -> None:
        self.bus.outcomes.append((self.raw_message.subject, self.durable, how))

    async def ack(self) -> None:
        self._settled("acked")

    async def nack(self, delay: float | None = None) -> None:
        self._settled("nacked")

    async def reject(self) -> None:
        self._settled("rejected")

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # nothing redelivers here: nothing to keep alive

    def park(self, until: Callable[[], Awaitable[None]]) -> bool:
        self._settled("parked")

        async def later() -> None:
            await until()
            await self.bus.mesh.pipelines[self.durable](self)

        self.bus.parked.append(asyncio.create_task(later()))
        return True


class InMemoryBus:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.published: list[tuple[str, bytes, dict[str, str]]] = []
        """Everything published while open (by the mesh or the test), in order."""
        self.outcomes: list[tuple[str, str, str]] = []
        """(subject, durable, acked | nacked | rejected | parked) of every delivery, in order."""
        self.parked: list[asyncio.Task[None]] = []
        self._captures: list[tuple[str, list[tuple[dict[str, Any], dict[str, str]]]]] = []
        self._ids: set[str] = set()
        self._seq = 0
        self._saved: Transport | None = None

    async def __aenter__(self) -> InMemoryBus:
        self._saved = self.mesh.connection.transport
        self.mesh.connection.transport = self
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.parked:
            task.cancel()
        if self._saved is not None:
            self.mesh.connection.transport = self._saved

    def capture(self, pattern: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """Every message published on subjects matching ``pattern`` from now on: (body as JSON,
        headers). A body that is not JSON is kept as ``{"raw": <text>}``."""
        seen: list[tuple[dict[str, Any], dict[str, str]]] = []
        self._captures.append((pattern, seen))
        return seen

    async def publish(self, body: bytes, subject: str, headers: dict[str, str] | None = None) -> PubAck:
        """Store a message as another service would have: the mesh's durables get it."""
        return await self.stream(subject, body, dict(headers or {}), "", 5.0)

    # --- the transport the mesh publishes through ------------------------------------------------

    async def core(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        await self.stream(subject, body, headers, "", 5.0)

    async def stream(self, subject: str, body: bytes, headers: dict[str, str], stream: str, timeout: float) -> PubAck:
        msg_id = headers.get(env.MSG_ID, "")
        if msg_id and msg_id in self._ids:
            return PubAck(stream=stream, seq=self._seq, duplicate=True)
        if msg_id:
            self._ids.add(msg_id)
        self._seq += 1
        seq = self._seq
        self.published.append((subject, body, headers))
        for pattern, seen in self._captures:
            if matches(pattern, subject):
                try:
                    seen.append((json.loads(body), headers))
                except (ValueError, RecursionError):  # a hostile body, captured as it is
                    seen.append(({"raw": body.decode("utf-8", "replace")}, headers))
        for name, pipeline in list(self.mesh.pipelines.items()):
            if matches(pipeline.durable.filter_subject, subject):
                await pipeline(Message(self, Raw(subject, body, headers, seq), name))
        return PubAck(stream=stream, seq=seq, duplicate=False)
