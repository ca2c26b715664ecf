"""Answering core-NATS requests (the budget's reservations, approvals): each request decoded with
limits and its sender verified like a stored message, answered signed, ``MESH_MAX_WORKERS`` at
a time.

Straight on nats-py, not a FastStream subscriber: its consume path (middlewares, a span and
metrics of its own, a task group per message) was a quarter of the budget's reservation
handling. A request that fails its contract or its identity is not answered: the requester times
out, and an unverified sender learns nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nats.aio.msg import Msg
from opentelemetry import propagate, trace

from mesh_contracts import Contract, ContractError, DecodeLimits, parse_message, split_subject
from mesh_contracts import topology as topo
from mesh_identity import IdentityError
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit.connection import Connection
from mesh_kit.consume.decode import rejection
from mesh_kit.delivery import Delivery
from mesh_kit.throttle import Throttled

log = logging.getLogger("mesh.bus")
C = TypeVar("C", bound=Contract)


class Server:
    def __init__(
        self,
        connection: Connection,
        limits: DecodeLimits,
        count: Callable[[str], None],
        rejections: Throttled,
    ) -> None:
        self.conn, self.limits, self._count, self.rejections = connection, limits, count, rejections
        self.settings = connection.settings
        self._served: list[tuple[str, Callable[[Msg], Awaitable[None]], bool]] = []
        """(subject pattern, entry, every replica) of each ``add``, subscribed by ``start``."""
        self._subs: list[Any] = []
        self._answering: set[asyncio.Task[None]] = set()

    def add(
        self, contract: type[C], handler: Callable[[C, Delivery], Awaitable[Contract]], *, every_replica: bool = False
    ) -> None:
        service = self.settings.service
        if service not in contract.spec.consumers or contract.spec.transport != "request":
            raise LookupError(f"{service} does not serve {contract.type_name()}")
        pattern = f"{contract.spec.domain}.*.*.*.{contract.spec.event}"
        conn = self.conn

        async def entry(raw: Msg) -> None:
            headers = dict(raw.headers or {})
            try:
                await conn.trust.verifier.tenants.know(split_subject(raw.subject).tenant)
                model = parse_message(raw.subject, raw.data, strict=self.settings.strict_contracts, limits=self.limits)
                sender = await conn.trust.verify_current(
                    lambda: conn.trust.verifier.verify(
                        headers.get(env.IDENTITY), raw.data, model, msg_id=headers.get(env.MSG_ID, "")
                    )
                )
            except (ContractError, IdentityError) as exc:
                self._count(tel.M_REJECTED)
                self.rejections.warn(f"rejected request on {raw.subject}: {rejection(exc)}")
                return  # the requester times out; an unverified sender learns nothing
            if not isinstance(model, contract):  # another version's message on the same subject shape
                self._count(tel.M_REJECTED)
                self.rejections.warn(f"rejected request on {raw.subject}: not a {contract.schema_id()}")
                return
            answer = await handler(
                model, Delivery(sender, raw.subject, headers.get(env.MSG_ID, ""), 1, headers, body=raw.data)
            )
            body = answer.to_bytes()
            await conn.nc.publish(raw.reply, body, headers=env.headers_for(conn.trust.signer, answer, body, ""))
            self._count(tel.M_HANDLED)

        self._served.append((pattern, entry, every_replica))

    async def start(self) -> None:
        """Subscribe every handler (a queue group shared by the replicas, or each replica answers)."""
        for pattern, entry, every_replica in self._served:
            on_request = self._answerer(entry, asyncio.Semaphore(max(1, self.settings.max_workers)))
            queue = "" if every_replica else topo.queue_group(self.settings.service)
            self._subs.append(await self.conn.nc.subscribe(pattern, queue=queue, cb=on_request))

    def _answerer(
        self, entry: Callable[[Msg], Awaitable[None]], slots: asyncio.Semaphore
    ) -> Callable[[Msg], Awaitable[None]]:
        """The subscription's callback: take a slot (all busy: the rest wait in the subscription's
        queue), answer in a task of its own, under the requester's trace. One at a time, each
        request would wait for every request ahead of it and its round trips (another tenant's
        burst too), as replicas would not."""

        async def answer(raw: Msg) -> None:
            try:
                parent = propagate.extract(dict(raw.headers or {}))
                with self.conn.tracer.start_as_current_span(
                    f"{raw.subject} process", context=parent, kind=trace.SpanKind.CONSUMER,
                    attributes={"messaging.system": "nats", "messaging.destination.name": raw.subject},
                ):  # fmt: skip
                    await entry(raw)
            except Exception:  # a handler bug or a backing service down: the requester asks again
                log.exception("answering %s failed", raw.subject)
            finally:
                slots.release()

        async def on_request(raw: Msg) -> None:
            await slots.acquire()
            task = asyncio.create_task(answer(raw))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

        return on_request

    async def stop(self) -> None:
        """Take no more requests, and let those being answered finish (the graceful timeout)."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._answering:
            await asyncio.wait(set(self._answering), timeout=self.settings.graceful_timeout_s)
