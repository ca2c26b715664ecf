"""Consumer-less reads of a stream: batched direct gets (``$JS.API.DIRECT.GET.<stream>``).

A JetStream consumer is a server-side object, and the right to create one
(``$JS.API.CONSUMER.CREATE.<stream>``) is also the right to *update* any durable on that stream
(a create request naming an existing consumer changes it) and to create push consumers that
deliver into somebody else's inbox. NATS permissions cannot tell these apart. So nothing in
the mesh that merely *reads* (the budget's monitor, the trust bundle, approvals, note lists)
holds that right: it reads with direct gets, which can read and nothing else.

``Reader.read`` asks for up to ``batch`` stored messages from a sequence (or a time, or the
last message of every subject matching a filter) in one request; the server answers with
one message per stored message and an end-of-batch status. ``Tail`` follows a stream with
it: in order, with no gaps and no duplicates (it asks from the sequence after the last one it
saw), across reconnects and leader changes, polling again at once while there is a backlog and
backing off (``idle_s``) when there is none. Needs ``allow_direct`` on the stream and NATS
server 2.11 or later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS

from mesh_durable.errors import DurableError
from mesh_kit import tasks

log = logging.getLogger("mesh.tail")

STATUS = "Status"
KV_OPERATION = "KV-Operation"
MAX_BATCH = 1024
"""The server answers at most this many messages to one request (its own cap)."""


class DirectGetError(DurableError):
    """The stream could not be read (no such stream, no direct gets, refused, or too many results)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message as a direct get returns it."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int
    time: float
    """When the stream stored it (seconds since the epoch)."""
    pending: int
    """How many stored messages after this one match the request."""

    @property
    def operation(self) -> str | None:
        """``DEL`` or ``PURGE`` for a key-value deletion marker, else ``None``."""
        return self.headers.get(KV_OPERATION)

    def key(self, bucket: str) -> str:
        """The key of a key-value entry (the subject without ``$KV.<bucket>.``)."""
        return self.subject.removeprefix(f"$KV.{bucket}.")


@dataclass(frozen=True, slots=True)
class Batch:
    messages: list[Stored]
    pending: int
    """Messages still pending after the batch (0: the reader is at the end of the stream)."""
    complete: bool
    """The server said the batch was over (False: the answer was cut short, ask again)."""


def parse_time(stamp: str) -> float:
    """RFC 3339 with nanoseconds (``2026-11-23T09:32:59.301783449Z``) to epoch seconds."""
    stamp = stamp.strip().removesuffix("Z")
    whole, _, frac = stamp.partition(".")
    dt = datetime.fromisoformat(whole).replace(tzinfo=UTC)
    return dt.timestamp() + (int(frac[:9].ljust(9, "0")) / 1e9 if frac else 0.0)


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Reader:
    """Batched direct gets on one stream over one connection (one request at a time)."""

    def __init__(self, nc: NATS, stream: str, *, batch: int = 256, timeout: float = 2.0) -> None:
        self.nc, self.stream = nc, stream
        self.batch, self.timeout = min(batch, MAX_BATCH), timeout
        self._sub: Any = None
        self._inbox = ""
        self._n = 0
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def read(
        self,
        *,
        seq: int | None = None,
        start_time: float | None = None,
        subject: str | None = None,
        last_of: list[str] | None = None,
        batch: int | None = None,
    ) -> Batch:
        """Up to ``batch`` messages from ``seq`` (or the first stored at/after ``start_time``),
        only those matching ``subject`` if given; or, with ``last_of``, the last message of every
        subject matching those filters (a key-value bucket's current values)."""
        req: dict[str, Any] = {}
        if last_of is not None:
            req["multi_last"] = last_of
        else:
            req["batch"] = min(batch or self.batch, MAX_BATCH)
            if start_time is not None and seq is None:
                req["start_time"] = _rfc3339(start_time)
            else:
                req["seq"] = max(1, seq or 1)
            if subject:
                req["next_by_subj"] = subject
        async with self._lock:
            return await self._request(json.dumps(req).encode())

    async def matching(self, subject: str) -> list[Stored]:
        """Every stored message whose subject matches ``subject``, oldest first (batches from the
        stream's start; the server's per-subject index skips the rest)."""
        out: list[Stored] = []
        seq = 1
        while True:
            b = await self.read(seq=seq, subject=subject, batch=MAX_BATCH)
            out += b.messages
            if b.messages:
                seq = b.messages[-1].seq + 1
            if b.complete and (not b.pending or not b.messages):
                return out

    async def last(self, subject: str) -> Stored | None:
        """The last stored message whose subject matches ``subject`` (wildcards allowed), if any."""
        async with self._lock:
            b = await self._request(json.dumps({"last_by_subj": subject}).encode(), single=True)
        return b.messages[-1] if b.messages else None

    async def _request(self, body: bytes, *, single: bool = False) -> Batch:
        if self._sub is None:
            self._inbox = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(f"{self._inbox}.*")
        self._n += 1
        reply = f"{self._inbox}.{self._n}"
        await self.nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", body, reply=reply)
        out: list[Stored] = []
        while True:
            try:
                msg = await self._sub.next_msg(timeout=self.timeout)
            except nats.errors.TimeoutError:
                if out:  # cut short: what arrived is good, the caller asks again from there
                    return Batch(out, out[-1].pending, complete=False)
                raise DirectGetError(f"no answer from {self.stream} within {self.timeout:g} s") from None
            if msg.subject != reply:
                continue  # the rest of an earlier answer we gave up on
            headers = dict(msg.headers or {})
            status = headers.get(STATUS)
            if status is None:
                try:
                    out.append(
                        Stored(
                            subject=headers.get("Nats-Subject", ""),
                            data=msg.data,
                            headers=headers,
                            seq=int(headers.get("Nats-Sequence", "0")),
                            time=parse_time(headers.get("Nats-Time-Stamp", "1970-01-01T00:00:00Z")),
                            pending=int(headers.get("Nats-Num-Pending", "0")),
                        )
                    )
                except ValueError as exc:
                    raise DirectGetError(f"unreadable direct get answer from {self.stream}: {exc}") from None
                if single:
                    return Batch(out, 0, complete=True)
                continue
            if status == "204":  # end of batch
                return Batch(out, int(headers.get("Nats-Num-Pending", "0") or 0), complete=True)
            if status == "404":  # nothing at or after that point
                return Batch(out, 0, complete=True)
            description = str(headers.get("Description", "")).strip() or "error"
            if status == "503":
                description = "no responders (no such stream, or direct gets not allowed on it)"
            raise DirectGetError(f"direct get on {self.stream}: {status} {description}")

    async def current(self, bucket: str, keys: str = ">") -> dict[str, Stored]:
        """The live entries of a key-value bucket whose keys match ``keys`` (deletions left out).

        The server filters (``multi_last``); past its limit of results in one answer this folds
        the bucket's history instead, so the answer never depends on how big the bucket is."""
        filt = f"$KV.{bucket}.{keys}"
        try:
            entries = (await self.read(last_of=[filt])).messages
        except DirectGetError as exc:
            if " 413 " not in f"{exc} ":
                raise
            entries = await self.matching(filt)
        latest: dict[str, Stored] = {}
        for e in entries:
            latest[e.key(bucket)] = e
        return {k: e for k, e in latest.items() if e.operation is None}


Callback = Callable[[Stored], Awaitable[None]]


class Tail:
    """Follow one stream (optionally one subject filter) in order, from a sequence or a time.

    ``cb`` gets every stored message exactly once per ``Tail``, in stream order (a failing
    ``cb`` is logged and the tail moves on: a reader must not stall on one bad message).
    ``caught_up`` is set once the tail has read everything that was stored when it started.

    Without a ``feed`` the tail polls: straight on while there is a backlog, then after
    ``idle_s[0]`` doubling up to ``idle_s[1]``. With a ``feed`` (a core subject the stream
    republishes every stored message to, with its sequence in ``Nats-Sequence``; or any subject
    whose messages merely say "something was written") it waits instead: a fed message that is
    the next one is handed over as it is (no request at all), a gap or a plain doorbell makes
    it read the stream with direct gets, and so does ``poll_s`` of silence (a fed message lost
    in a reconnect or to a slow consumer is therefore late by at most ``poll_s``, never lost).
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        cb: Callback,
        *,
        subject: str | None = None,
        start_seq: int | None = None,
        start_time: float | None = None,
        idle_s: tuple[float, float] = (0.005, 0.1),
        feed: str | None = None,
        poll_s: float = 2.0,
        batch: int = 256,
    ) -> None:
        self.nc = nc
        self.reader = Reader(nc, stream, batch=batch)
        self.stream, self.cb, self.subject = stream, cb, subject
        self.next_seq, self.start_time = start_seq, start_time
        self.idle_min, self.idle_max = idle_s
        self.feed, self.poll_s = feed, poll_s
        self.caught_up = asyncio.Event()
        self._stopping = False
        self.read_count = 0
        self.requests = 0
        """Direct get requests made (a fed tail makes few: a gap, a doorbell, a silent ``poll_s``)."""
        self._task: asyncio.Task[None] | None = None
        self._fed: asyncio.Queue[Stored | None] = asyncio.Queue(maxsize=65536)
        self._sub: Any = None

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self.run(), name=f"tail-{self.stream}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            # Cancelled until it is done: nats-py turns a cancellation that meets a closed
            # connection into ConnectionClosedError, which the read loop treats as a broker
            # hiccup and reads again, so one cancel alone could leave this waiting forever.
            await tasks.stop(self._task)
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        await self.reader.close()

    async def _on_feed(self, msg: Any) -> None:
        headers = dict(msg.headers or {})
        item: Stored | None = None
        if "Nats-Sequence" in headers:
            try:
                item = Stored(
                    subject=headers.get("Nats-Subject", ""),
                    data=msg.data,
                    headers=headers,
                    seq=int(headers["Nats-Sequence"]),
                    time=parse_time(headers.get("Nats-Time-Stamp", "1970-01-01T00:00:00Z")),
                    pending=0,
                )
            except ValueError:
                item = None
        try:
            self._fed.put_nowait(item)  # None: a doorbell, read the stream
        except asyncio.QueueFull:
            pass  # the next read (a gap, or poll_s of silence) fetches it from the stream

    async def _deliver(self, m: Stored) -> None:
        self.next_seq = m.seq + 1
        self.read_count += 1
        try:
            await self.cb(m)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tail of %s: handler failed on %s (seq %d)", self.stream, m.subject, m.seq)

    async def _read(self) -> bool:
        """Read from where the tail is until the end of the stream; False if the broker failed."""
        while True:
            self.requests += 1
            try:
                if self.next_seq is None and self.start_time is not None:
                    b = await self.reader.read(start_time=self.start_time, subject=self.subject)
                else:
                    b = await self.reader.read(seq=self.next_seq or 1, subject=self.subject)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker went away, a leader moved: ask again
                log.debug("tail of %s interrupted (%s); reading again", self.stream, exc)
                return False
            for m in b.messages:
                await self._deliver(m)
            if not (b.messages and (b.pending or not b.complete)):
                self.caught_up.set()
                return True

    async def run(self) -> None:
        if self.feed is not None:
            self._sub = await self.nc.subscribe(self.feed, cb=self._on_feed, pending_msgs_limit=1 << 20)
        idle = self.idle_min
        while not await self._read():
            if self._stopping:
                return
            await asyncio.sleep(1.0)
        while not self._stopping:
            if self.feed is None:
                before = self.read_count
                await asyncio.sleep(idle)
                ok = await self._read()
                idle = self.idle_min if self.read_count > before else min(self.idle_max, idle * 2)
                if not ok:
                    await asyncio.sleep(1.0)
                continue
            try:  # one waiting already is taken as it is: no timer per message under load
                item = self._fed.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    item = await asyncio.wait_for(self._fed.get(), self.poll_s)
                except TimeoutError:
                    item = None
            if item is not None and self.next_seq is not None and self.subject is None:
                if item.seq < self.next_seq:
                    continue  # already read from the stream
                if item.seq == self.next_seq:
                    await self._deliver(item)
                    continue
            # a gap (something fed was lost), a doorbell, or silence: read the stream
            if not await self._read():
                await asyncio.sleep(1.0)
