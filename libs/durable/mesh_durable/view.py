"""Read some keys of a bucket once, then keep them current from the bucket's republished feed.

A provisioned bucket with followers (``Bucket.fed``) republishes every write it stores, after
storing it, to ``$MESH.WATCH.KV_<bucket>.<key>`` with the entry's revision (``Nats-Sequence``)
and the revision of the key's previous entry (``Nats-Last-Sequence``). A write the bucket
refused (a failed compare-and-set) is never republished: the feed says only what is stored.

``KeyView.get`` answers from memory for a key it has read, as long as it can prove the memory
current:

- each fed write of a remembered key must follow the remembered revision (its
  ``Nats-Last-Sequence`` is that revision); a write that does not (one was lost) drops the key,
  and the next ``get`` reads it again;
- a reconnect drops everything remembered before it (messages published meanwhile were lost);
- a write fed while the key is being read is applied to what the read returns, so a read that
  raced a write never leaves the older value remembered;
- every remembered key is read again after ``max_age_s`` whatever happened: the bound on how
  late a write can be seen if a fed message were ever lost without a reconnect (a client-side
  slow consumer; the subscription's pending limit makes that practically impossible). So a key
  read longer ago than that is forgotten: memory holds the keys read lately, at most ``size``.

So a write is seen as soon as its fed message arrives (milliseconds), and a hot key costs one
direct get per ``max_age_s`` instead of one per call. ``max_age_s = 0`` turns the memory off:
every ``get`` is a direct get.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from mesh_contracts import topology as topo
from mesh_kit.state import KV

log = logging.getLogger("mesh.view")

KV_OPERATION = "KV-Operation"


@dataclass(slots=True)
class _Known:
    value: bytes | None
    """None: no such key, or deleted."""
    revision: int
    """The stored entry's sequence (0: the key was never written)."""
    read_at: float
    epoch: int


class KeyView:
    def __init__(self, nc: Any, kv: KV, bucket: str, *, max_age_s: float = 2.0, size: int = 50_000) -> None:
        self.nc, self.kv, self.bucket = nc, kv, bucket
        self.max_age_s, self.size = max_age_s, size
        self._pre = f"$KV.{bucket}."
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._reading: dict[str, list[tuple[int, int, bytes | None]]] = {}
        self._sub: Any = None
        self.reads = 0
        """Direct gets made (the rest were answered from memory)."""
        self.hits = 0
        self.gaps = 0
        """Fed writes that did not follow the remembered revision (the key was read again)."""

    async def start(self) -> None:
        if self.max_age_s <= 0:
            return
        # Subscribed (and the subscription known to the server) before the first read: every
        # write stored after a read is fed to this view.
        self._sub = await self.nc.subscribe(
            topo.watch_feed(f"KV_{self.bucket}"),
            cb=self._on_feed,
            pending_msgs_limit=1 << 20,
            pending_bytes_limit=1 << 30,
        )
        await self.nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _epoch(self) -> int:
        return int(self.nc.stats.get("reconnects", 0))

    async def _on_feed(self, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            key = headers["Nats-Subject"].removeprefix(self._pre)
            seq, last = int(headers["Nats-Sequence"]), int(headers.get("Nats-Last-Sequence", "0"))
        except (KeyError, ValueError):
            return
        value = None if headers.get(KV_OPERATION) else msg.data
        pending = self._reading.get(key)
        if pending is not None:
            pending.append((seq, last, value))
            return
        known = self._known.get(key)
        if known is None or seq <= known.revision:
            return
        if last == known.revision:
            known.value, known.revision = value, seq
        else:
            self.gaps += 1
            del self._known[key]

    async def get(self, key: str) -> bytes | None:
        """The key's current value (None: absent or deleted)."""
        known = self._known.get(key)
        if (
            known is not None
            and time.monotonic() - known.read_at < self.max_age_s
            and known.epoch == self._epoch()
            and self.nc.is_connected
        ):
            self.hits += 1
            return known.value
        return await self._read(key)

    async def _direct(self, key: str) -> tuple[bytes | None, int]:
        self.reads += 1
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError as exc:  # never written (no entry), or deleted (its marker)
            entry = exc.entry
            return None, (entry.revision or 0) if entry is not None else 0
        return entry.value, entry.revision or 0

    async def _read(self, key: str) -> bytes | None:
        if self._sub is None or key in self._reading:  # no memory, or another read of it is under way
            value, _ = await self._direct(key)
            return value
        epoch, at = self._epoch(), time.monotonic()
        self._reading[key] = []
        try:
            value, revision = await self._direct(key)
        finally:
            fed = self._reading.pop(key)
        whole = True
        for seq, last, fed_value in sorted(fed, key=lambda f: f[0]):
            if seq <= revision:
                continue  # the read already returned it (or something newer)
            if last == revision:
                value, revision = fed_value, seq
            else:
                whole, value = False, fed_value  # a lost write between: answer the newest, remember nothing
        if whole and epoch == self._epoch():
            self._known[key] = _Known(value, revision, at, epoch)
            self._known.move_to_end(key)
            self._forget(at - self.max_age_s)
        return value

    def _forget(self, read_before: float) -> None:
        """Drop what is remembered from before ``read_before`` (it is read again anyway: the
        oldest reads come first), and the oldest beyond ``size``. What a process remembers is
        then the keys read in the last ``max_age_s`` (the tasks it is working on), not every key
        it ever read: a soak's finished tasks no longer grow each process's memory."""
        known = self._known
        while known and (len(known) > self.size or next(iter(known.values())).read_at < read_before):
            known.popitem(last=False)

    def __len__(self) -> int:
        """Keys remembered now."""
        return len(self._known)
