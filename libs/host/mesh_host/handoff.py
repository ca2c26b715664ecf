"""A dead process's messages handed back at once by its successor (``MESH_HANDOFF_FILE``).

A process that dies (kill -9, the OOM killer) holds messages: fetched, waiting in its fair queue
or being handled, kept alive by its in-progress acks. JetStream gives them to another replica
only when their ``ack_wait`` runs out after the last beat, seconds in which those tasks stand
still. But the process that replaces it (the local supervisor's restart, a container restarted
in its pod) can tell the server at once that they are free: each process lists what it holds in
a small file of its own, and its successor reads the list and NAKs each message (a NAK is a
publish to the message's reply subject, which the service sends anyway to ack: no new right),
so the messages are redelivered now, to whichever replica asks first.

The file is a journal of lines, each appended with one ``write`` (no fsync: the page cache
survives a kill -9 of the process; a lost machine loses the file and falls back to ack_wait):

    + <stream> <durable> <seq> <reply subject>   fetched (or a newer delivery of it)
    - <stream> <durable> <seq>                   acked, NAKed or terminated
    @ <unix time>                                alive (at most every ack_wait / 8)

Safety. The server honours a NAK of an older delivery (measured: it redelivers the message even
while a newer delivery of it is handled elsewhere). So a successor hands back only if its
predecessor was alive less than ``ack_wait / 2`` ago: every message it held was beaten less than
``ack_wait / 4`` before that (``mesh_kit.fair``), so none can have been redelivered yet. Later
than that, ``ack_wait`` does the job, as without the file. And fencing keeps effects single
either way: a wrong hand-back costs a second handling that finds its effects done.

One file, one process: the owner holds an exclusive ``flock`` on it for its life (the kernel
drops it at any exit, kill -9 included). A process that finds the file locked (two replicas
given the same path) takes nothing over and keeps no journal, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mesh.handoff")

COMPACT_BYTES = 256 * 1024
"""A journal grown past this is rewritten as what it holds now (one write)."""


@dataclass(frozen=True)
class Predecessor:
    """What the file said its last writer held."""

    held: list[str]
    """The reply subjects of the messages it held at its end."""
    alive_s: float | None
    """How long ago it was last known alive (None: it never said)."""


def read(path: str, now: float | None = None) -> Predecessor:
    """The journal at ``path`` as its writer left it (a missing file: nothing held). Lines that
    do not parse, and a last one without its newline (a write cut short), are skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Predecessor([], None)
    held: dict[str, str] = {}
    last = 0.0
    for line in data.decode(errors="replace").split("\n")[:-1]:  # the last: '' or a write cut short
        parts = line.split(" ")
        with contextlib.suppress(ValueError, IndexError):
            if parts[0] == "+" and len(parts) == 5:
                held[" ".join(parts[1:4])] = parts[4]
            elif parts[0] == "-" and len(parts) == 4:
                held.pop(" ".join(parts[1:4]), None)
            elif parts[0] == "@" and len(parts) == 2:
                last = max(last, float(parts[1]))
    now = time.time() if now is None else now
    return Predecessor(list(held.values()), max(0.0, now - last) if last else None)


def due(pred: Predecessor, ack_wait_s: float) -> list[str]:
    """The messages to hand back: all it held if it was alive less than ``ack_wait / 2`` ago,
    else none (``ack_wait`` may have given them to another replica already)."""
    if not pred.held or pred.alive_s is None or pred.alive_s >= ack_wait_s / 2:
        return []
    return pred.held


class Journal:
    """This process's list of the messages it holds (module docstring)."""

    def __init__(self, path: str, ack_wait_s: float) -> None:
        self.path, self.ack_wait_s = path, ack_wait_s
        self._fd: int | None = None
        self._held: dict[str, str] = {}
        self._stamped = 0.0
        self._size = 0

    @property
    def open(self) -> bool:
        return self._fd is not None

    def take_over(self) -> list[str]:
        """Lock the file, read what the predecessor held, start this process's journal: the reply
        subjects to NAK now (``due``). A file another live process holds: nothing, no journal."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            log.warning("%s is held by another live process (MESH_HANDOFF_FILE must be one per process): "
                        "no hand-off for this one", self.path)  # fmt: skip
            return []
        pred = read(self.path)
        handed = due(pred, self.ack_wait_s)
        if pred.held and not handed:
            log.info("its predecessor held %d message(s) but was last alive %s ago: ack_wait hands them on",
                     len(pred.held), "long" if pred.alive_s is None else f"{pred.alive_s:.1f} s")  # fmt: skip
        self._fd = fd
        self._rewrite()
        return handed

    def hold(self, stream: str, durable: str, seq: int, reply: str) -> None:
        if self._fd is None or not seq or not reply or " " in reply:
            return
        key = f"{stream} {durable} {seq}"
        self._held[key] = reply
        self._write(f"+ {key} {reply}\n")

    def release(self, stream: str, durable: str, seq: int) -> None:
        key = f"{stream} {durable} {seq}"
        if self._fd is None or self._held.pop(key, None) is None:
            return
        if not self._held or self._size > COMPACT_BYTES:
            self._rewrite()
        else:
            self._write(f"- {key}\n")

    def alive(self) -> None:
        """Called by each keepalive round that reached the broker: a stamp, at most every ack_wait / 8."""
        now = time.time()
        if self._fd is None or now - self._stamped < self.ack_wait_s / 8:
            return
        if not self._held or self._size > COMPACT_BYTES:
            self._rewrite()  # an idle process's file is one stamp, not a day of them
        else:
            self._stamped = now
            self._write(f"@ {now:.3f}\n")

    def watch(self, psub: Any, arrived: Callable[[Any], None]) -> bool:
        """Call ``arrived`` with each message of ``psub`` as the client reads it off the socket,
        not when ``fetch`` returns it: a busy pull keeps what came until its batch fills (up to
        ``BUSY_FETCH_S``), and a pull request that outlived its ``fetch`` delivers with no
        ``fetch`` waiting; a process killed meanwhile held those messages unlisted, and they
        waited out ``ack_wait``. False: this nats-py keeps its queue elsewhere (the fair consumer
        then lists them when fetched)."""
        sub = getattr(psub, "_sub", None)
        queue = getattr(sub, "_pending_queue", None)
        if not isinstance(queue, asyncio.Queue):
            log.warning("nats-py's pull subscription changed shape: messages are listed when fetched")
            return False
        ours = _Arrivals(queue.maxsize, arrived)
        while not queue.empty():
            ours.put_nowait(queue.get_nowait())
        sub._pending_queue = ours  # type: ignore[union-attr]
        return True

    def close(self) -> None:
        """A clean end: nothing is held (the consumers handed it back), the file says so."""
        if self._fd is None:
            return
        self._held.clear()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def _rewrite(self) -> None:
        """The journal as one write of what is held now, and a stamp."""
        assert self._fd is not None
        now = time.time()
        self._stamped = now
        body = "".join(f"+ {k} {r}\n" for k, r in self._held.items()) + f"@ {now:.3f}\n"
        try:
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            self._broken(exc)
            return
        self._size = 0
        self._write(body)

    def _write(self, text: str) -> None:
        if self._fd is None:
            return
        data = text.encode()
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self._broken(exc)
            return
        self._size += len(data)

    def _broken(self, exc: OSError) -> None:
        log.warning("the hand-off journal %s failed (%s): no hand-off for this process", self.path, exc)
        with contextlib.suppress(OSError):
            if self._fd is not None:
                os.close(self._fd)
        self._fd = None


class _Arrivals(asyncio.Queue):  # type: ignore[type-arg]
    """nats-py's queue of what a pull subscription was sent, telling ``arrived`` of each message
    the moment the client reads it off the socket."""

    def __init__(self, maxsize: int, arrived: Callable[[Any], None]) -> None:
        super().__init__(maxsize)
        self._arrived = arrived

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        try:
            self._arrived(item)
        except Exception:  # the client's read loop must never fail on our account
            log.exception("listing an arrived message failed")
