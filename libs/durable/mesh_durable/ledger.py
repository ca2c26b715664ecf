"""Idempotency ledger: every side effect and every paid call is keyed, claimed, performed,
recorded, and only then acknowledged.

A redelivered request finds the recorded result and returns it without performing again:
a resumed step does not pay twice for a model call that completed, and a tool does not
run twice. Keys live in the ``ledger`` KV bucket for 30 days, far beyond the streams'
deduplication window, so a very late redelivery is still caught.

What the ledger cannot do alone: if a process dies after performing an effect but before
recording it, the next attempt performs again. That window is closed by passing the same
key to the effect itself (an idempotency key the sink deduplicates on), which is why
``run`` hands ``key`` to ``perform``.

A paid call that leaves nothing outside the mesh (a model call) may be recorded without a claim
(``run(..., claim=False)``): one stored write per call instead of two. The claim only makes a
*different* message wait while the call runs; for a model call the price of that race is paying
twice, never a second effect, and the record still answers every later attempt. A step's calls
go without (their only duplicates are their own redeliveries, which take a claim over anyway);
planning keeps it (copies of one submission under other ids arrive together).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from mesh_contracts import sealing, topology
from mesh_contracts.base import field_decoder
from mesh_contracts.stored import LEDGER
from mesh_durable.errors import DurableError
from mesh_kit.delivery import Retry
from mesh_kit.state import KV

if TYPE_CHECKING:
    from mesh_host.mesh import Mesh

BUCKET = "ledger"
CALLS = topology.CALLS_BUCKET
"""Where model calls are recorded (``run(..., claim=False)``): not synced per write (a lost record
costs a second payment, never a second effect), so a call costs no synced write at all."""
CLAIM_LEASE_S = 600.0
"""A claim held by a *different* message is respected this long; after it, the claimant is
presumed dead and its claim is taken over."""


class Busy(Retry, DurableError):
    """Another message is performing this key right now; try again later (not a failure)."""

    delay_s = 0.5


@dataclass(frozen=True, slots=True)
class _Done:
    result: Any


class Ledger:
    """``earlier``: a bucket that held these keys before (read when ``kv`` has no record of one)."""

    def __init__(self, kv: KV, service: str, *, earlier: KV | None = None) -> None:
        self.kv = kv
        self.service = service
        self.earlier = earlier

    def key(self, *parts: str) -> str:
        """``<service>.<parts...>``: the service's own prefix is the only one it may write."""
        return ".".join((self.service, *parts))

    async def recorded(self, key: str) -> Any | None:
        """The recorded result of ``key`` (here, else in ``earlier``), or None."""
        done = await _done(self.kv, key)
        if done is None and self.earlier is not None:
            done = await _done(self.earlier, key)
        return done.result if done is not None else None

    async def run(self, key: str, perform: Callable[[str], Awaitable[Any]], *, owner: str = "",
                  attempt: int = 1, claim: bool = True) -> Any:  # fmt: skip
        """Return the recorded result for ``key``, or perform once and record it.

        ``owner`` identifies the message being handled (stream and sequence) and ``attempt`` its
        delivery count. A redelivery of the same message takes over its own earlier claim (that
        delivery is gone: JetStream redelivers only after ack_wait or a NAK); a different message
        meeting a live claim gets ``Busy``. ``perform`` receives ``key`` to pass on as the effect's
        own idempotency key. The result must be JSON-serialisable.

        ``claim=False``: read the record, perform if there is none, record (a create: the first
        record wins and answers every caller). For calls whose repetition costs money, not an
        effect: no claim write, so one stored write instead of two.
        """
        if not claim:
            return await self._record_only(key, perform)
        claimed = await self._claim(key, owner, attempt)  # a new key: one write, no read first
        if isinstance(claimed, _Done):
            return claimed.result
        claim_rev = claimed
        result = await perform(key)
        record = _record(key, result)
        try:
            await self.kv.update(key, record, last=claim_rev)
        except KeyWrongLastSequenceError:
            # Another attempt (a redelivery racing a slow one) recorded first: its result wins, so
            # every caller reports the same outcome.
            winner = await _done(self.kv, key)
            if winner is not None:
                return winner.result
            await self.kv.put(key, record)
        return result

    async def abandon(self, key: str) -> bool:
        """Take back a claim whose call certainly did not run (the tool's server refused the
        credentials before running anything), so the call can be made afresh later (after the task
        is resumed) instead of waiting out the claim's lease. A recorded result is never removed."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return False
        if json.loads(entry.value or b"{}").get("status") != "claimed":
            return False
        try:
            await self.kv.delete(key, last=entry.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _record_only(self, key: str, perform: Callable[[str], Awaitable[Any]]) -> Any:
        # (this bucket only: a call in flight across an upgrade may be paid twice, never an effect)
        was = await _done(self.kv, key)
        if was is not None:
            return was.result
        result = await perform(key)
        record = _record(key, result)
        try:
            await self.kv.create(key, record)
        except KeyWrongLastSequenceError:
            winner = await _done(self.kv, key)  # recorded meanwhile: the first record answers everyone
            if winner is not None:
                return winner.result
            await self.kv.put(key, record)  # a claim of a claiming caller that died: ours is the record
        return result

    async def _claim(self, key: str, owner: str, attempt: int) -> int | _Done:
        """The claim's revision, or the recorded result when the key was done already."""
        claim = json.dumps({"status": "claimed", "owner": owner, "attempt": attempt, "at": time.time()}).encode()
        try:
            return int(await self.kv.create(key, claim))
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
        held = json.loads(entry.value or b"{}")
        if held.get("status") == "done":
            return _Done(_opened(key, held)["result"])
        # ``>=``: the same delivery re-running in place (after the broker was unavailable) takes
        # back its own claim; a frozen older delivery (lower attempt) never does.
        same_message = owner and held.get("owner") == owner and attempt >= int(held.get("attempt", 0))
        expired = time.time() - float(held.get("at", 0)) > CLAIM_LEASE_S
        if not (same_message or expired):
            raise Busy(f"{key} is being performed by {held.get('owner') or 'another attempt'}")
        # The claimant is gone without recording. Take over; the effect's own idempotency key
        # keeps the effect single if it had got that far.
        try:
            return int(await self.kv.update(key, claim, last=entry.revision))
        except KeyWrongLastSequenceError:
            raise Busy(f"{key}: another attempt took the claim first") from None


async def _done(kv: KV, key: str) -> _Done | None:
    """The key's recorded result in ``kv``, or None (no record, or only a claim)."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    record = json.loads(entry.value or b"{}")
    if record.get("status") != "done":
        return None
    return _Done(_opened(key, record)["result"])


def _opened(key: str, record: dict[str, Any]) -> dict[str, Any]:
    """A done record with its result opened (the tenant's content, sealed with its data key)."""
    opened: dict[str, Any] = sealing.open_fields(record, _tenant(key), f"{LEDGER}|{key}", field_decoder())
    return opened


def _tenant(key: str) -> str:
    """``<service>.<tenant>.<...>``: whose result a key records."""
    return key.split(".")[1] if key.count(".") >= 1 else ""


def _record(key: str, result: Any) -> bytes:
    """A done record; its result (a model's answer, a tool's output) sealed with the tenant's data
    key when a keyring is installed (``mesh_contracts.sealing``), bound to the key."""
    value = {"status": "done", "result": result, "at": time.time()}
    return sealing.dumps(sealing.seal_fields(value, ("result",), _tenant(key), f"{LEDGER}|{key}"))


async def calls(mesh: Mesh) -> Ledger:
    """A service's record of its model calls (KV ``calls``), answering replays of tasks recorded
    before it from the ``ledger`` bucket where they were kept then."""
    return Ledger(await mesh.kv(CALLS), mesh.service, earlier=await mesh.kv(BUCKET))
