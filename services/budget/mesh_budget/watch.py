"""The watch: every message about every task, read from the streams, folded by the monitor, and
the trips it reports acted on.

Every replica follows ENVELOPES (every message of the seven content streams without its body)
and USAGE from ``MESH_BUDGET_LOOKBACK_S`` ago, with direct gets (no consumer: the budget holds
no right to create, change or delete consumers), so the monitor's state (``mesh_budget.monitor``)
is rebuilt from them on every start: nothing to persist, nothing to lose. The usage records are
also folded into the spend records (``mesh_budget.accounts``). A trip is acted on with a
progress event, a cancel or halt under a deterministic id (every replica reaches the same
verdict from the same streams; JetStream keeps one) and a link of the tenant's audit chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.metrics import Counter

from mesh_budget.accounts import Accounts
from mesh_budget.ledger import Durable, Held
from mesh_budget.monitor import Monitor, Seen, Trip
from mesh_budget.partition import Partition
from mesh_budget.settings import BudgetSettings
from mesh_contracts import ContractError, contract_for_subject, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.v1 import ControlCancel, ControlHalt, UsageRecorded
from mesh_contracts.v1.records import TERMINAL
from mesh_durable import chain, records
from mesh_durable.tail import Reader, Stored, Tail
from mesh_host import Mesh
from mesh_identity import IdentityError
from mesh_kit import envelope as env
from mesh_kit import tasks

log = logging.getLogger("mesh.budget")
FOLLOWED = (topo.ENVELOPES, topo.STREAMS["usage"])
"""What the monitor reads, every replica all of it, with direct gets (no consumers): every
message of the seven content streams without its body, and the usage records whole."""
ENDS = frozenset({"task.completed", "task.failed", "task.rejected"})


class Watch:
    """The streams followed for the monitor and the spend records; trips acted on (``act``)."""

    def __init__(
        self,
        mesh: Mesh,
        settings: BudgetSettings,
        monitor: Monitor,
        partition: Partition,
        trips: Counter,
        accounts: Callable[[], Accounts | None],
        status: Callable[[], Any],
        *,
        ended: Callable[[str, str], None] | None = None,
    ) -> None:
        """``trips``: the trips counter; ``accounts``, ``status``: the spend records and KV
        ``status``, as they are once the service started; ``ended(tenant, task_id)``: told of
        each task's end seen."""
        self.mesh = mesh
        self.audit = chain.of(mesh)
        self.settings = settings
        self.monitor = monitor
        self.partition = partition
        self.m_trips = trips
        self._accounts, self._status, self._ended = accounts, status, ended
        self.detections: list[tuple[str, float]] = []  # (kind, seconds from cause to action), for /status
        self._tails: list[Tail] = []
        self._ticker: asyncio.Task[None] | None = None
        self._started_at = 0.0

    async def start(self, mark: int) -> None:
        """Follow the envelopes and the usage stream from ``lookback_s`` ago, then look for what
        is overdue every ``tick_s``. The usage stream is read from the spend records' ``mark``
        too, if that is earlier: what came after it is folded into them (``mesh_budget.accounts``).
        The content streams themselves it cannot read: ENVELOPES holds their messages' headers
        (``Mesh-Facts``), never a body."""
        self._started_at = time.time()
        start = self._started_at - self.settings.budget_lookback_s
        for stream in FOLLOWED:
            start_seq = None
            if stream == topo.STREAMS["usage"]:
                first = await Reader(self.mesh.nc, stream).read(start_time=start, batch=1)
                at_lookback = first.messages[0].seq if first.messages else mark + 1
                start_seq = max(1, min(mark + 1, at_lookback))

            async def on_msg(msg: Stored, stream: str = stream) -> None:
                await self._on_watched(msg, stream)

            tail = Tail(
                self.mesh.nc, stream, on_msg, start_seq=start_seq, start_time=None if start_seq else start,
                feed=topo.watch_feed(stream), poll_s=self.settings.budget_watch_poll_s,
            )  # fmt: skip
            tail.start()
            self._tails.append(tail)
        if self.partition.count > 1:
            # A reservation for one of our tasks may reach a replica of another partition: the
            # hold it stores says the step started (out of its queue), for our monitor to see.
            holds = Tail(self.mesh.nc, f"KV_{Durable.BUCKET}", self._on_hold, start_time=time.time())
            holds.start()
            self._tails.append(holds)
        self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        """Stop looking for what is overdue, then following the streams."""
        await tasks.stop(self._ticker)
        for tail in self._tails:
            await tail.stop()

    async def _on_hold(self, msg: Stored) -> None:
        parts = msg.subject.split(".")  # $KV.reservations.<tenant>.<task>.<call>
        if len(parts) != 5 or not self.partition.owns(parts[2]) or msg.operation or not msg.data:
            return
        try:
            held = Held.model_validate_json(msg.data)
        except ValueError:
            return
        self.monitor.started(held.tenant, held.task_id, held.step_id, msg.time)

    async def _on_watched(self, msg: Stored, stream: str) -> None:
        accounts = self._accounts()
        usage_stream = accounts is not None and stream == topo.STREAMS["usage"]
        parts = msg.subject.split(".")  # <domain>.v<major>.<tenant>.<task>.<event>
        if self.partition.count > 1 and len(parts) == 5 and not self.partition.owns(parts[2]):
            if usage_stream and accounts is not None:
                accounts.seen(msg.seq)  # another partition's records
            return  # another partition's tenant: not even parsed
        if len(parts) == 5:
            await self.mesh.verifier.tenants.know(parts[2])  # a tenant added at runtime: its client's key, read once
        try:
            if stream == topo.ENVELOPES:  # a message's headers: no body to parse, its facts instead
                contract = contract_for_subject(msg.subject)
                _, told = self.mesh.verifier.verify_envelope(
                    msg.headers.get(env.IDENTITY), msg.headers.get(env.FACTS), contract, parts[2], at=msg.time
                )
                seen, model = Seen(contract.type_name(), parts[2], parts[3], told), None
            else:
                model = parse_message(msg.subject, msg.data)
                self.mesh.verifier.verify(msg.headers.get(env.IDENTITY), msg.data, model, at=msg.time)
                seen = Seen.of(model)
        except (ContractError, IdentityError):
            if usage_stream and accounts is not None:
                accounts.seen(msg.seq)  # nothing to fold: the records are complete past it
            return  # its consumer dead-letters it; the monitor only folds in verified facts
        if accounts is not None:
            if isinstance(model, UsageRecorded):
                await accounts.fold(model, msg.seq, msg.time)  # waits for the broker if it must
            elif usage_stream:
                accounts.seen(msg.seq)
            elif seen.type in ENDS:
                accounts.ended(seen.tenant, seen.task_id)
        if seen.type in ENDS and self._ended is not None:
            self._ended(seen.tenant, seen.task_id)
        if msg.time < self._started_at - self.settings.budget_lookback_s:
            return  # read for the spend records only (before the monitor's look-back)
        if not self.partition.owns(seen.tenant):
            return
        try:
            trips = self.monitor.observe(seen, msg.time)
        except Exception:
            log.exception("monitor failed on %s", msg.subject)
            return
        for trip in trips:
            await self.act(trip)

    def caught_up(self) -> bool:
        """Replay done: every stream was read to its end once (or 2 s passed: the broker is slow
        to answer, and the monitor must not stay blind to deadlines meanwhile)."""
        return all(t.caught_up.is_set() for t in self._tails) or time.time() - self._started_at > 2.0

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_tick_s)
            if not self.caught_up():
                continue
            now = time.time()
            for trip in self.monitor.tick(now):
                await self.act(trip)
            self.monitor.forget(now - 600)

    async def act(self, trip: Trip) -> None:
        """Publish the reasoned event and the control message (deterministic ids: every replica
        reaches the same verdict from the same stream; JetStream keeps one)."""
        try:
            rec = await records.task_status(self._status(), trip.tenant, trip.task_id)
            if rec is not None and rec.status in TERMINAL:
                return  # replayed history, or the task ended meanwhile
            after = max(0.0, time.time() - trip.closed_at) if trip.closed_at else 0.0
            self.detections.append((trip.kind, after))
            self.detections = self.detections[-1000:]
            self.m_trips.add(1, {"tenant": trip.tenant, "kind": trip.kind, "action": trip.action})
            self.mesh.count(f"mesh.budget.trips.{trip.kind}")
            log.warning("%s/%s: %s -> %s", trip.tenant, trip.task_id, trip.reason, trip.action)
            await self.mesh.progress(
                trip.tenant,
                trip.task_id,
                f"budget.{trip.kind}",
                trip.reason,
                key=trip.kind,
                detail={"action": trip.action, "members": list(trip.members), "detected_after_s": round(after, 4)},
            )
            if trip.action == "cancel":
                await self.mesh.publish(
                    ControlCancel(tenant=trip.tenant, task_id=trip.task_id, reason=trip.reason),
                    key=f"budget:{trip.kind}",
                )
            elif trip.action == "halt":
                await self.mesh.publish(
                    ControlHalt(tenant=trip.tenant, task_id=trip.task_id, reason=trip.reason), key=f"budget:{trip.kind}"
                )
            # After acting (a chain that cannot be appended to must not delay the brake): the
            # trip as a link of the tenant's audit chain; every replica's copy is stored once.
            await self.audit.append(
                trip.tenant, trip.task_id, f"budget.{trip.kind}", f"budget:{trip.kind}", actor="budget",
                detail={"reason": trip.reason, "action": trip.action, "members": list(trip.members)},
            )  # fmt: skip
        except Exception:
            log.exception("could not act on %s for %s/%s", trip.kind, trip.tenant, trip.task_id)
