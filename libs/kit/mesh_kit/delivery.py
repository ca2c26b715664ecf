"""What a handler deals in: the delivery it gets beside the message, and the exceptions it raises
to say what should become of the message (the settle stage, ``mesh_kit.consume.settle``, acts on
them)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mesh_contracts import Contract
from mesh_identity import Principal
from mesh_kit.errors import KitError


class Reject(KitError):
    """Raise from a handler for input that can never succeed: dead-letter now, no retry."""


class Retry(KitError):
    """Raise to have the message redelivered after ``delay_s`` without logging a failure
    (e.g. another replica is performing the same work right now)."""

    delay_s = 1.0


class Park(KitError):
    """Raise from a handler for a message it cannot take up yet (the planner's task waiting for a
    run slot): the message waits at its consumer, alive, out of the handlers' way (they take
    other work meanwhile) and with no attempt spent, until ``until()`` returns, and is then
    handled again."""

    def __init__(self, until: Callable[[], Awaitable[None]], reason: str = "") -> None:
        super().__init__(reason or "waits to be taken up")
        self.until = until


class PermissionViolation(RuntimeError, KitError):
    """The broker refused an operation this identity is not allowed to do."""


class Incoming(Protocol):
    """A message a consumer hands the pipeline: the nats-py message and its controls. The fair
    consumer's ``Fetched`` is one; so is the in-memory test bus's message."""

    raw_message: Any

    async def ack(self) -> None: ...
    async def nack(self, delay: float | None = None) -> None: ...
    async def reject(self) -> None: ...
    def hold(self) -> contextlib.AbstractContextManager[None]: ...
    def park(self, until: Callable[[], Awaitable[None]]) -> bool: ...


@dataclass
class Delivery:
    """What a handler gets besides the model: sender, ids, and the delivery's controls."""

    sender: Principal
    subject: str
    msg_id: str
    deliveries: int
    headers: dict[str, str]
    _msg: Incoming | None = None
    seq: int = 0
    stored_at: float | None = None
    """When JetStream stored the message (None for core request/reply)."""
    body: bytes = b""
    """The message's body as it arrived (and as its sender signed it)."""

    @property
    def owner(self) -> str:
        """Identity of the message (not of this delivery): its subject and stream sequence."""
        return f"{self.subject}@{self.seq}"

    @contextlib.asynccontextmanager
    async def keepalive(self) -> AsyncIterator[None]:
        """A long call on purpose (a model or tool call, a full stream): the consumer, which beats
        for every message it holds (``mesh_kit.fair``), keeps this one alive past
        ``MESH_HOLD_MAX_S`` while the block runs, instead of taking its handler for stuck."""
        with self._msg.hold() if self._msg is not None else contextlib.nullcontext():
            yield


Handler = Callable[[Any, Delivery], Awaitable[None]]
RequestHandler = Callable[[Any, Delivery], Awaitable[Contract]]
RejectHook = Callable[[str, str, str, str], Awaitable[None]]  # (tenant, task, subject, reason)
