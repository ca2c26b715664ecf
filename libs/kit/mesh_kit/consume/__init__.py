"""Consuming, as explicit stages: decode (bounded) -> verify (identity) -> handle -> settle.

``Pipeline`` is one durable's way in: the fair consumer (``mesh_kit.fair``) hands it each
message it takes from the durable (and the in-memory test bus each message a test publishes).
Each stage is a module of its own and can be run alone:

- ``decode``: where the message came from, and its body as its contract, by the bounded decoder;
- ``verify``: the sender's token against the trust bundle and the contract's producers;
- ``handle``: the handler, in the message's context, re-run in place while the broker is away;
- ``settle``: ack, park, redeliver with a delay, or dead-letter with the reason.

What fails decode or verify is dead-lettered on its first delivery and never handled.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import propagate, trace

from mesh_contracts import ContractError, DecodeLimits, split_subject
from mesh_contracts import topology as topo
from mesh_identity import IdentityError
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit.consume import verify
from mesh_kit.consume.decode import arrival, decode, rejection
from mesh_kit.consume.handle import handle
from mesh_kit.consume.settle import Settle, Where
from mesh_kit.delivery import Delivery, Handler, Incoming, Park, Reject, RejectHook, Retry
from mesh_kit.settings import ServiceSettings
from mesh_kit.throttle import Throttled
from mesh_kit.trust import Trust

__all__ = ["Pipeline", "Settle"]


class Pipeline:
    def __init__(
        self,
        durable: topo.Durable,
        handler: Handler,
        on_reject: RejectHook | None,
        *,
        settings: ServiceSettings,
        trust: Trust,
        settle: Settle,
        limits: DecodeLimits,
        tracer: trace.Tracer,
        count: Callable[[str], None],
        rejections: Throttled,
    ) -> None:
        self.durable, self.handler, self.on_reject = durable, handler, on_reject
        self.settings, self.trust, self.settle, self.limits = settings, trust, settle, limits
        self.tracer, self._count, self.rejections = tracer, count, rejections

    async def __call__(self, msg: Incoming) -> None:
        """Take one message through the stages, inside the producer's trace (its context travels
        in the message's headers), as a consumer span."""
        raw = msg.raw_message
        parent = propagate.extract(dict(raw.headers or {}))
        with self.tracer.start_as_current_span(
            f"{raw.subject} process", context=parent, kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "nats", "messaging.destination.name": raw.subject},
        ):  # fmt: skip
            await self.process(msg)

    async def process(self, msg: Incoming) -> None:
        raw = msg.raw_message
        headers = dict(raw.headers or {})
        deliveries, stored_at, seq = arrival(raw)
        msg_id = headers.get(env.MSG_ID, "")
        try:
            # a verified re-drive is judged (and, if it fails again, recorded) at its original's time
            stored_at, bound_id = verify.redrive(self.trust, raw.subject, raw.data, headers, msg_id, stored_at)
            await self.trust.verifier.tenants.know(split_subject(raw.subject).tenant)
            model = decode(raw.subject, raw.data, self.limits, strict=self.settings.strict_contracts)
            sender = await verify.sender(self.trust, model, raw.data, headers, at=stored_at, msg_id=bound_id)
        except (ContractError, IdentityError) as exc:
            self._count(tel.M_REJECTED)
            reason = rejection(exc)
            self.rejections.warn(f"rejected {raw.subject} seq={seq}: {reason}")
            where = Where(deliveries, seq, stored_at)
            await self.settle.give_up(msg, self.durable, "rejected", reason, where, self.on_reject)
            return

        delivery = Delivery(sender, raw.subject, msg_id, deliveries, headers, msg, seq, stored_at, raw.data)
        if deliveries > 1:
            self._count(tel.M_REDELIVERED)
        with self.tracer.start_as_current_span(f"handle {model.type}") as span:
            span.set_attributes({tel.A_TENANT: model.tenant, tel.A_TASK: model.task_id, tel.A_MSG_TYPE: model.type})
            if model.release:
                span.set_attribute(tel.A_RELEASE, model.release)
            try:
                await handle(
                    self.handler, model, delivery, infra_retry_s=self.settings.infra_retry_s, count=self._count
                )
            except Exception as exc:  # noqa: BLE001 - every outcome is settle's: a bug becomes a retry, then the DLQ
                if not isinstance(exc, Park | Reject | Retry):  # a handler's say, not a failure
                    span.record_exception(exc)
                await self.settle.failed(msg, exc, self.durable, Where(deliveries, seq, stored_at), self.on_reject)
                return
        await self.settle.handled(msg)
