"""Stage 4: settle. What becomes of the message, and only here: acked when its handler returned;
parked at its consumer (``Park``); redelivered after a delay (``Retry``, or a failure with
attempts left: ``MESH_RETRY_DELAYS_S``); dead-lettered with the reason and TERMinated (refused
on arrival, ``Reject``, or its last attempt failed). FastStream's default for JetStream
subscribers TERMinates on any exception; here every outcome is chosen."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from mesh_contracts import ContractError, split_subject
from mesh_contracts import topology as topo
from mesh_contracts.base import ID_PATTERN
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit.connection import Connection
from mesh_kit.delivery import Incoming, Park, Reject, RejectHook, Retry
from mesh_kit.tenants import Tenancy
from mesh_kit.throttle import Throttled

log = logging.getLogger("mesh.bus")


@dataclass(frozen=True)
class Where:
    """Which delivery of which stored message: for the dead letter and the rejection hook."""

    deliveries: int
    seq: int
    stored_at: float | None


class Settle:
    def __init__(
        self,
        connection: Connection,
        tenancy: Callable[[], Tenancy | None],
        count: Callable[..., None],
        rejections: Throttled,
    ) -> None:
        self.conn, self._tenancy, self._count, self.rejections = connection, tenancy, count, rejections
        self.service, self.settings = connection.service, connection.settings

    async def handled(self, msg: Incoming) -> None:
        self._count(tel.M_HANDLED)
        await msg.ack()

    async def failed(
        self, msg: Incoming, exc: Exception, durable: topo.Durable, where: Where, on_reject: RejectHook | None
    ) -> None:
        """Judge what the handler raised."""
        raw: Msg = msg.raw_message
        if isinstance(exc, Park):
            if msg.park(exc.until):
                log.debug("%s parked: %s", raw.subject, exc)
                return  # the consumer holds it, unacknowledged, and queues it again
            raise RuntimeError("a parked message reached a consumer that cannot hold it") from exc
        if isinstance(exc, Reject):
            self._count(tel.M_DEAD_LETTERED)
            await self.give_up(msg, durable, "failed", f"rejected by handler: {exc}", where, on_reject)
            return
        if isinstance(exc, Retry):
            log.debug("%s: %s; redelivering in %.1fs", raw.subject, exc, exc.delay_s)
            await msg.nack(delay=exc.delay_s)
            return
        reason = f"{type(exc).__name__}: {exc}"
        if where.deliveries >= self.settings.max_deliver:
            self._count(tel.M_DEAD_LETTERED)
            log.error("giving up on %s after %d attempts: %s", raw.subject, where.deliveries, reason)
            await self.give_up(
                msg, durable, "failed", reason, where, on_reject, told=f"failed {where.deliveries} attempts: {reason}"
            )
            return
        self._count(tel.M_RETRIED)
        delays = self.settings.retry_delays_s or (1.0,)
        delay = delays[min(where.deliveries, len(delays)) - 1]
        log.warning("attempt %d of %s failed (%s); retrying in %.1fs", where.deliveries, raw.subject, reason, delay)
        await msg.nack(delay=delay)

    async def give_up(
        self,
        msg: Incoming,
        durable: topo.Durable,
        kind: str,
        reason: str,
        where: Where,
        on_reject: RejectHook | None,
        *,
        told: str = "",
    ) -> None:
        """Dead-letter the message, tell the durable's ``on_reject`` hook (``told``, or the
        reason), and stop its redelivery."""
        raw: Msg = msg.raw_message
        await self.dead_letter(raw, dict(raw.headers or {}), durable, kind, reason, where)
        if on_reject is not None:
            try:
                parts = split_subject(raw.subject)
            except ContractError:
                parts = None
            if parts and re.match(ID_PATTERN, parts.tenant) and re.match(ID_PATTERN, parts.task_id):
                await on_reject(parts.tenant, parts.task_id, raw.subject, told or reason)
        await msg.reject()

    async def dead_letter(
        self, raw: Msg, headers: dict[str, str], durable: topo.Durable, kind: str, reason: str, where: Where
    ) -> None:
        """Copy the message to the DLQ with why, how often, and when it was first stored: charged to
        its tenant's dead-letter quota first. Over it, the dead letter is not kept (the original
        stays in its stream for the stream's retention), and that is counted and logged: one
        tenant's failing messages must not fill the DLQ for every tenant."""
        out = {
            f"{env.ORIG_PREFIX}{k}": env.one_line(v, 4000)
            for k, v in headers.items()
            if k not in (env.MSG_ID, "Nats-Expected-Stream")
        }
        seq = where.seq
        out.update(
            {
                env.DLQ_REASON: env.one_line(reason),
                env.DLQ_KIND: kind,
                env.DLQ_SERVICE: self.service,
                env.DLQ_SUBJECT: raw.subject,
                env.DLQ_STREAM: durable.stream,
                env.DLQ_SEQ: str(seq),
                env.DLQ_DELIVERIES: str(where.deliveries),
                env.DLQ_STORED_AT: f"{where.stored_at:.6f}" if where.stored_at is not None else "",
                env.MSG_ID: f"dlq:{durable.stream}:{seq}:{self.service}" if seq else f"dlq:{time.time_ns()}",
            }
        )
        subject = topo.dlq_subject(self.service, raw.subject)
        tenant = tenant_of(raw.subject)
        quotas = self._tenancy()
        charged_at, size = 0.0, env.stored_size(subject, raw.data, out)
        if quotas is not None:
            refusal, charged_at = await quotas.charge(tenant, topo.DLQ_STREAM, size)
            if refusal is not None:
                self._count(tel.M_DLQ_DROPPED, {"tenant": tenant, "code": refusal.code})
                self.rejections.warn(
                    f"dead letter of {raw.subject} seq={seq} not kept: tenant {tenant} is over its dead-letter "
                    f"quota ({refusal.reason}); the original stays in {durable.stream}"
                )
                return
        try:
            ack = await self.conn.transport.stream(subject, raw.data, out, topo.DLQ_STREAM, 10.0)
        except Exception:
            if quotas is not None:
                await quotas.refund(tenant, topo.DLQ_STREAM, size, charged_at)
            raise
        if quotas is not None and getattr(ack, "duplicate", False):
            await quotas.refund(tenant, topo.DLQ_STREAM, size, charged_at)


def tenant_of(subject: str) -> str:
    """The tenant a message's subject names, or ``-`` for a subject of no tenant's shape."""
    try:
        tenant = split_subject(subject).tenant
    except ContractError:
        return "-"
    return tenant if re.match(ID_PATTERN, tenant) else "-"
