"""Fair scheduling: one tenant's burst does not starve another, and priorities order a tenant's work.

A durable consumer hands out messages in the order they were stored, so a tenant that submits
300 tasks puts every other tenant's next step behind 300 of its own. ``FairConsumer`` fetches
up to ``window`` messages ahead from the service's durable (batched pull requests, the same
durable and rights as before) and keeps them in one queue per tenant (the subject's tenant
token). Its handlers take the next message from the tenants in turn (round robin), and within a
tenant a redelivered message first, then the highest ``Mesh-Priority`` (0 to 9, default 5), then
stored order.

Why redelivered first: a replica that dies (kill -9, OOM) takes the messages waiting in its queue
with it; they come back after ``ack_wait`` with one delivery spent although no handler ever ran.
Messages travel in cohorts (fetched together, redelivered together), so a cohort that waits in
queue after queue behind fresh work can spend its deliveries in a crash loop and reach the
server's cap without one attempt. Taking redelivered work first bounds that to one spent
delivery per crash of the replica actually handling it, as without fetching ahead (and it is the
oldest work anyway). ``topology.SERVER_MAX_DELIVER`` leaves room for those spent deliveries.

A handler may park a message it cannot take up yet (``mesh_kit.delivery.Park``: the planner's run
slots): it waits out of the handlers' way, kept alive like the others and not counted in the
window, until the park's ``until()`` returns, and then queues for its tenant's turn again.

Nothing is lost or reordered across a failure: a fetched message stays unacknowledged until its
handler acks it, the ones waiting here are kept alive with in-progress acks (so ``ack_wait``
does not redeliver them elsewhere), and on stop the waiting ones are handed back at once (a
NAK without delay) for another replica to take.

Failing over in seconds: every ``ack_wait / 4`` the consumer beats for each message it holds,
waiting or handled (a handler for up to ``hold_max_s`` unless in a long call, ``Fetched.hold``;
fencing keeps a stuck one's successor single), so ``ack_wait`` is short: a dead replica's messages go to a live one ``ack_wait`` after
its last beat. The price: an in-progress ack per held message per beat (none if handled sooner).
Sooner still when the dead process is restarted: it lists what it holds in its hand-off journal
(``mesh_host.handoff``), and its successor hands those messages back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import nats

from mesh_kit import tasks
from mesh_kit.telemetry import M_KEPT_ALIVE as KEPT_ALIVE

log = logging.getLogger("mesh.fair")

PRIORITY = "Mesh-Priority"
DEFAULT_PRIORITY = 5
BEATS_PER_ACK_WAIT = 4
"""In-progress acks per ``ack_wait`` for a held message: a beat may be up to two intervals late
(an event loop busy for ``ack_wait / 2``) before the message is taken for dead."""
IDLE_FETCH_S = 5.0
"""How long an idle consumer's lingering pull request (for one message) waits before it asks again."""
BUSY_FETCH_S = 0.25
"""A busy consumer's pull for a batch: returns as soon as the server has drained what is there;
this bounds how long it can hold a message when the server does not say so."""


class Journal(Protocol):
    """Where this process lists the messages it holds, for its successor to hand back at once
    (``mesh_host.handoff.Journal``)."""

    def hold(self, stream: str, durable: str, seq: int, reply: str) -> None: ...

    def release(self, stream: str, durable: str, seq: int) -> None: ...

    def alive(self) -> None: ...

    def watch(self, psub: Any, arrived: Callable[[Any], None]) -> bool:
        """Call ``arrived`` with each message as the client reads it (False: cannot)."""
        ...


def priority_of(headers: dict[str, str] | None) -> int:
    try:
        p = int((headers or {}).get(PRIORITY, DEFAULT_PRIORITY))
    except ValueError:
        return DEFAULT_PRIORITY
    return min(9, max(0, p))


def tenant_of(subject: str) -> str:
    """``<domain>.v<major>.<tenant>.<task>.<event>`` -> tenant ('' for anything else)."""
    parts = subject.split(".")
    return parts[2] if len(parts) >= 5 else ""


def _stream_seq(raw: Any) -> int:
    try:
        return int(raw.metadata.sequence.stream)
    except Exception:  # noqa: BLE001 - not a JetStream message: never taken for another's copy
        return 0


def _deliveries(raw: Any) -> int:
    try:
        return int(raw.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message (reply subject without metadata)
        return 1


class Fetched:
    """A fetched JetStream message with the controls the mesh's dispatch uses (the same names as
    FastStream's ``NatsMessage``)."""

    __slots__ = ("beat_at", "calls", "consumer", "fetched_at", "priority", "raw_message", "redelivered", "seq",
                 "taken_at", "tenant")  # fmt: skip

    def __init__(self, raw: Any, consumer: FairConsumer | None = None) -> None:
        self.raw_message, self.consumer = raw, consumer
        self.seq = _stream_seq(raw)
        self.tenant = tenant_of(raw.subject)
        self.priority = priority_of(raw.headers)
        self.redelivered = _deliveries(raw) > 1
        self.fetched_at = self.beat_at = self.taken_at = time.monotonic()
        self.calls = 0
        """Long calls its handler has said it is in (``hold``): kept alive past ``hold_max_s``."""

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Its handler is in a long call on purpose (a model, a tool, a full stream): the consumer
        keeps beating for it however long that takes, not only for ``hold_max_s``."""
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1

    async def ack(self) -> None:
        await self.raw_message.ack()
        self._released()

    async def nack(self, delay: float | None = None) -> None:
        await self.raw_message.nak(delay=delay)
        self._released()

    async def reject(self) -> None:
        await self.raw_message.term()
        self._released()

    def _released(self) -> None:
        if self.consumer is not None and self.consumer.journal is not None:
            self.consumer.journal.release(self.consumer.stream, self.consumer.durable, self.seq)

    async def in_progress(self) -> None:
        await self.raw_message.in_progress()
        self.beat_at = time.monotonic()

    def park(self, until: Callable[[], Awaitable[None]]) -> bool:
        """Wait at the consumer, unacknowledged and alive, until ``until()`` returns, then queue
        again (False: not fetched by a fair consumer; the caller holds it itself)."""
        if self.consumer is None:
            return False
        self.consumer.park(self, until)
        return True


class FairQueue:
    """One queue per tenant (redelivered first, then highest priority, then arrival), round robin."""

    def __init__(self) -> None:
        self._queues: dict[str, list[tuple[bool, int, int, Fetched]]] = {}
        self._turn: deque[str] = deque()
        self._order = itertools.count()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def put(self, item: Fetched) -> None:
        q = self._queues.get(item.tenant)
        if q is None:
            q = self._queues[item.tenant] = []
            self._turn.append(item.tenant)
        heapq.heappush(q, (not item.redelivered, -item.priority, next(self._order), item))
        self._n += 1

    def pop(self) -> Fetched:
        tenant = self._turn.popleft()
        q = self._queues[tenant]
        *_, item = heapq.heappop(q)
        self._n -= 1
        if q:
            self._turn.append(tenant)  # its next message waits for every other tenant's turn
        else:
            del self._queues[tenant]
        return item

    def items(self) -> list[Fetched]:
        return [entry[-1] for q in self._queues.values() for entry in q]

    def drain(self) -> list[Fetched]:
        out = self.items()
        self._queues.clear()
        self._turn.clear()
        self._n = 0
        return out


class FairConsumer:
    def __init__(
        self,
        nc: Callable[[], Any],
        stream: str,
        durable: str,
        inbox_prefix: str,
        dispatch: Callable[[Fetched], Awaitable[None]],
        *,
        workers: int,
        window: int,
        ack_wait_s: float,
        graceful_s: float,
        hold_max_s: float = 600.0,
        count: Callable[[str], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._nc, self.stream, self.durable, self.prefix = nc, stream, durable, inbox_prefix
        self.dispatch, self.workers, self.window = dispatch, workers, max(window, workers)
        self.ack_wait_s, self.graceful_s, self.hold_max_s = ack_wait_s, graceful_s, hold_max_s
        self._count = count
        self.journal = journal
        """Where this process lists what it holds, for its successor (``mesh_host.handoff``)."""
        self.queue = FairQueue()
        self.running: dict[asyncio.Task[None], Fetched] = {}
        """Messages being handled, by the task handling each."""
        self.parked: dict[Fetched, asyncio.Task[None]] = {}
        """Messages a handler parked (``Fetched.park``), each with what waits for its turn."""
        self.held: dict[int, Fetched] = {}
        """Messages waiting here (queued or parked), by stream sequence. A redelivery of one of
        them (its keepalives were lost: a broker node died, the connection dropped for longer
        than ``ack_wait``) becomes its delivery instead of a second copy: JetStream extends only
        the newest delivery's ``ack_wait``, and two copies of one message meant two handlings
        (a submission parked twice for a planning slot, each copy taking one in turn)."""
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._keepalive: asyncio.Task[None] | None = None
        self._psub: Any = None
        self._busy = False
        """Whether the last pull brought work (then ask for a batch; otherwise for one, lingering)."""
        self._stopping = False
        self._on_arrival = False
        """Whether each message is listed in the journal as it arrives (``mesh_host.handoff.watch``)."""

    def _arrived(self, m: Any) -> None:
        if self.journal is not None and (m.reply or "").startswith("$JS.ACK."):
            self.journal.hold(self.stream, self.durable, _stream_seq(m), m.reply)

    async def start(self) -> None:
        js = self._nc().jetstream()  # the connection as it is once the mesh has connected
        self._psub = await js.pull_subscribe_bind(
            durable=self.durable, stream=self.stream, inbox_prefix=self.prefix.encode()
        )
        if self.journal is not None:
            self._on_arrival = self.journal.watch(self._psub, self._arrived)
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name=f"fetch-{self.durable}"),
            asyncio.create_task(self._dispatch_loop(), name=f"dispatch-{self.durable}"),
        ]
        # Apart: it beats for the running handlers until they have drained on stop.
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name=f"keepalive-{self.durable}")

    def _room(self) -> int:
        return self.window - len(self.queue) - len(self.running)

    async def _fetch_loop(self) -> None:
        while not self._stopping:
            room = self._room()
            if room <= 0:
                self._changed.clear()
                await self._changed.wait()
                continue
            # Busy (the last pull brought work): a pull request for as many as the handlers can
            # take at once, never the whole window: the server serves waiting requests in turn,
            # so with small requests every replica gets its share of a backlog (one replica asking
            # for 256 would take it all while the others idle, and replicas would add nothing).
            # Idle: a lingering request for one message, which returns the moment one arrives.
            # A lingering request for several holds what arrived until the rest come or it
            # expires: nats-py's fetch waits out the request after its first message unless the
            # server says it has drained, so a step arriving at an idle worker could wait up to
            # the whole 5 s (seen: 3.1 and 4.7 s). The short busy timeout bounds that case too.
            batch, timeout = (min(room, self.workers), BUSY_FETCH_S) if self._busy else (1, IDLE_FETCH_S)
            try:
                msgs = await self._psub.fetch(batch=batch, timeout=timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # nats-py's fetch waits with asyncio.wait_for, which on Python 3.11 can turn a
                    # cancellation into a timeout: without this the loop outlived its cancel (a
                    # consumer never stopped hung the event loop's close for minutes).
                    raise asyncio.CancelledError from None
                self._busy = False  # nothing came: wait for the next message on its own
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker went away, a leader moved: ask again
                log.debug("fetch from %s failed (%s); fetching again", self.durable, exc)
                await asyncio.sleep(0.5)
                continue
            self._busy = True
            for m in msgs:
                item = Fetched(m, self)
                if self.journal is not None and not self._on_arrival:
                    self.journal.hold(self.stream, self.durable, item.seq, m.reply or "")
                waiting = self.held.get(item.seq) if item.seq else None
                if waiting is not None:
                    waiting.raw_message = m  # the newest delivery: acks and keepalives go to it
                    continue
                if item.seq:
                    self.held[item.seq] = item
                self.queue.put(item)
            self._changed.set()

    async def _dispatch_loop(self) -> None:
        while True:
            if not self.queue or len(self.running) >= self.workers:
                self._changed.clear()
                await self._changed.wait()
                continue
            item = self.queue.pop()
            if self.held.get(item.seq) is item:
                del self.held[item.seq]  # handled now: a redelivery from here on is a copy of its own
            item.taken_at = time.monotonic()
            task = asyncio.create_task(self._run(item))
            self.running[task] = item

    async def _run(self, item: Fetched) -> None:
        try:
            await self.dispatch(item)
        except asyncio.CancelledError:
            raise
        except Exception:  # the dispatch acks or naks itself; anything escaping it is redelivered
            log.exception("dispatch failed on %s", item.raw_message.subject)
        finally:
            self.running.pop(asyncio.current_task(), None)  # type: ignore[arg-type,unused-ignore]
            self._changed.set()

    def park(self, item: Fetched, until: Callable[[], Awaitable[None]]) -> None:
        if item.seq and self.held.get(item.seq, item) is not item:
            # Redelivered while its handler ran, and that copy waits here already: it is the one
            # that waits (this delivery's acks still count, but its keepalives no longer would).
            log.debug("%s: a newer delivery waits here already; not parked twice", item.raw_message.subject)
            return
        if item.seq:
            self.held[item.seq] = item
        self.parked[item] = asyncio.create_task(self._unpark(item, until), name=f"parked-{self.durable}")

    async def _unpark(self, item: Fetched, until: Callable[[], Awaitable[None]]) -> None:
        try:
            await until()
        except asyncio.CancelledError:
            raise  # stopping: stop() hands it back
        except Exception:  # the wait broke: let a handler decide again now
            log.exception("waiting to take up %s failed", item.raw_message.subject)
        self.parked.pop(item, None)
        if self._stopping:
            with contextlib.suppress(Exception):
                await item.nack()
            return
        self.queue.put(item)
        self._changed.set()

    async def _keepalive_loop(self) -> None:
        """Every message held here is alive, waiting or being handled: its ``ack_wait`` must not
        run out while this process lives (and must soon after it dies)."""
        every = self.ack_wait_s / BEATS_PER_ACK_WAIT
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            handled = [i for i in self.running.values() if i.calls or now - i.taken_at < self.hold_max_s]
            if self.journal is not None and len(handled) < len(self.running):
                for stuck in set(self.running.values()).difference(handled):  # not kept alive: not handed back
                    self.journal.release(self.stream, self.durable, stuck.seq)
            for item in [*self.queue.items(), *self.parked, *handled]:
                if now - item.beat_at >= every:
                    try:
                        await item.in_progress()
                    except nats.errors.Error as exc:  # the broker is away: the next round may reach it
                        log.debug("in-progress for %s not sent: %s", item.raw_message.subject, exc)
                        break
                    if self._count is not None:
                        self._count(KEPT_ALIVE)
            else:
                if self.journal is not None:
                    self.journal.alive()  # every message here was beaten in time: its successor may hand back

    async def stop(self) -> None:
        """Stop fetching, hand back what waits here, let running handlers finish (graceful)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            await tasks.stop(t)
        if self._psub is not None:
            # First: a pull request of ours still waiting at the server would be handed the very
            # messages NAKed below, into an inbox about to go away (back only after ack_wait).
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
                await self._nc().flush()
        parked = list(self.parked.items())
        self.parked.clear()
        self.held.clear()
        for _, waiter in parked:
            waiter.cancel()
        for item in [*self.queue.drain(), *(item for item, _ in parked)]:
            with contextlib.suppress(Exception):
                await item.nack()  # another replica (or this one, restarted) takes it at once
        if self.running:
            await asyncio.wait(set(self.running), timeout=self.graceful_s)
        if self._keepalive is not None:
            self._keepalive.cancel()
            await tasks.stop(self._keepalive)
