"""Per-tenant quotas on what a tenant makes the mesh store in a shared stream.

NATS bounds a stream as a whole (``max_bytes``, ``max_msgs``), one exact subject
(``max_msgs_per_subject``) or one account; nothing it offers bounds one tenant's share of a
stream every tenant writes to. Without a share, one tenant filled TASK and the DLQ in six
seconds and every tenant's intake stopped for a week (issue 36). So the mesh keeps the share:
whatever stores a tenant's message charges it here first, and a tenant over its quota is
refused while the others are untouched.

A quota is three limits per (tenant, stream):

- **bytes and messages held**: what the tenant wrote that the stream may still hold, that is,
  what it wrote within the stream's ``max_age`` (the window). Charges are summed per time
  slot (a 64th of the window, at least a minute); a slot is forgotten once everything charged
  in it has aged out of the stream, so the sum never under-counts what is held;
- **bytes per minute**: a token bucket (a message bigger than a minute's allowance passes only
  when the bucket is full, and leaves it in debt).

The state is one record per (service, tenant, stream) in KV ``quotas``
(``QuotaRecord``, compare-and-set, so a service's replicas share it); each service writes only
its own keys. ``charge`` is exact: one write per stored message, made before the message is
stored, and given back (``refund``) when the store did not keep it (a duplicate, a full stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh_contracts import SERVICES
from mesh_contracts import topology as topo
from mesh_contracts.v1.records import QuotaRecord
from mesh_kit import state as st

log = logging.getLogger("mesh.quota")

MIB = 1 << 20
SLOTS = 64
"""Slots per window: a charge is held at most a 64th of the window longer than the stream holds it."""
MIN_SLOT_S = 60.0
REFUSAL_CACHED_S = 5.0
"""How long a refusal is answered from memory (no read) while its ``retry_after`` has not passed."""
INFO_EVERY_S = 60.0
"""How often a stream's caps and max_age are read again."""
FLUSH_S = 5.0
"""How often what a service stored of its own accord is written for a tenant that sent nothing since."""
FOOTPRINT_EVERY_S = 5.0
"""How often a door reads what a tenant made every service store (``Quotas.footprint``)."""


@dataclass(frozen=True)
class Limit:
    """One tenant's quota in one stream (0: no limit)."""

    bytes: int = 0
    msgs: int = 0
    bytes_per_min: int = 0

    def __bool__(self) -> bool:
        return bool(self.bytes or self.msgs or self.bytes_per_min)


@dataclass(frozen=True)
class Refusal:
    """Why something a tenant asked for is refused: a machine-readable ``code`` (here
    ``quota_exceeded``, held bytes or messages, or ``rate_limited``, bytes per minute; the
    planner's admission has its own), one line, and when it is worth asking again."""

    code: str
    reason: str
    retry_after_s: float


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB / 10 else f"{n / 1024:.1f} KiB"


def _days(s: float) -> str:
    return f"{s / 86400:g} days" if s >= 86400 else f"{s / 3600:g} h" if s >= 3600 else f"{s:g} s"


def slot_width(window_s: float) -> float:
    return max(MIN_SLOT_S, window_s / SLOTS)


def expire(rec: QuotaRecord, window_s: float, now: float) -> None:
    """Forget slots whose charges have all aged out of the stream; re-slot on a new window."""
    width = slot_width(window_s)
    if rec.slot_s != width:
        # The window changed (a provisioning with another retention): hold what was held as if it
        # were charged now, the cautious reading of slots of another width.
        b, m = rec.held_now()
        rec.held = {str(int(now // width)): [b, m]} if b or m else {}
        rec.slot_s = width
    for k in [k for k in rec.held if (int(k) + 1) * width + window_s <= now]:
        del rec.held[k]


def charge(rec: QuotaRecord, limit: Limit, window_s: float, nbytes: int, now: float) -> Refusal | None:
    """Charge ``nbytes`` (one message) to ``rec`` if the limits allow it (mutates ``rec``), or say why not.

    Pure: the clock is passed in, so the rules are unit-tested exactly."""
    expire(rec, window_s, now)
    rec.limit_bytes, rec.limit_msgs, rec.limit_bytes_per_min = limit.bytes, limit.msgs, limit.bytes_per_min
    rec.window_s = window_s
    held_b, held_m = rec.held_now()
    if (limit.bytes and held_b + nbytes > limit.bytes) or (limit.msgs and held_m + 1 > limit.msgs):
        if limit.bytes and nbytes > limit.bytes:
            return Refusal(
                "quota_exceeded",
                f"a message of {_mib(nbytes)} is larger than the tenant's whole quota ({_mib(limit.bytes)})",
                0.0,
            )
        return Refusal(
            "quota_exceeded",
            f"the tenant holds {_mib(held_b)} in {held_m} messages of its quota of "
            + (f"{_mib(limit.bytes)}" if limit.bytes else "")
            + (" and " if limit.bytes and limit.msgs else "")
            + (f"{limit.msgs} messages" if limit.msgs else "")
            + f" over the stream's {_days(window_s)}",
            _until_room(rec, limit, window_s, nbytes, now),
        )
    if limit.bytes_per_min:
        rate = limit.bytes_per_min / 60.0
        cap = float(limit.bytes_per_min)
        if rec.refilled_at:
            rec.tokens = min(cap, rec.tokens + max(0.0, now - rec.refilled_at) * rate)
        else:
            rec.tokens = cap
        rec.refilled_at = now
        need = min(float(nbytes), cap)
        if rec.tokens < need:
            return Refusal(
                "rate_limited",
                f"the tenant is over its {_mib(limit.bytes_per_min)} a minute",
                math.ceil(max(0.05, (need - rec.tokens) / rate) * 100) / 100,
            )
        rec.tokens -= nbytes
    slot = str(int(now // rec.slot_s))
    b, m = rec.held.get(slot, [0, 0])
    rec.held[slot] = [b + nbytes, m + 1]
    rec.charged += 1
    return None


def add(rec: QuotaRecord, window_s: float, nbytes: int, msgs: int, now: float) -> None:
    """Add what a service stored for the tenant of its own accord (``Quotas.induced``): never
    refused (work in hand must finish), it counts against the quota all the same."""
    expire(rec, window_s, now)
    rec.window_s = window_s
    slot = str(int(now // rec.slot_s))
    b, m = rec.held.get(slot, [0, 0])
    rec.held[slot] = [b + nbytes, m + msgs]


def _until_room(rec: QuotaRecord, limit: Limit, window_s: float, nbytes: int, now: float) -> float:
    """Seconds until enough of what is held ages out for one more message of ``nbytes``."""
    held_b, held_m = rec.held_now()
    for k in sorted(rec.held, key=int):
        b, m = rec.held[k]
        held_b, held_m = held_b - b, held_m - m
        if (not limit.bytes or held_b + nbytes <= limit.bytes) and (not limit.msgs or held_m + 1 <= limit.msgs):
            return float(math.ceil(max(1.0, (int(k) + 1) * rec.slot_s + window_s - now)))
    return float(math.ceil(window_s))


def refund(rec: QuotaRecord, nbytes: int, charged_at: float) -> bool:
    """Give back a charge the store did not keep (a duplicate, a full stream). False: nothing to
    give back (its slot was forgotten already)."""
    slot = str(int(charged_at // rec.slot_s)) if rec.slot_s else ""
    if slot not in rec.held:
        return False
    b, m = rec.held[slot]
    b, m = max(0, b - nbytes), max(0, m - 1)
    if b or m:
        rec.held[slot] = [b, m]
    else:
        del rec.held[slot]
    if rec.limit_bytes_per_min:
        rec.tokens = min(float(rec.limit_bytes_per_min), rec.tokens + nbytes)
    rec.charged = max(0, rec.charged - 1)
    return True


@dataclass(frozen=True)
class Shape:
    """What a stream allows, as provisioned: its caps and how long it keeps a message."""

    max_bytes: int
    max_msgs: int
    max_age_s: float


class Quotas:
    """One service's quota book: charges and refunds against its own keys of KV ``quotas``.

    ``limits(tenant, stream, shape)`` gives a tenant's limit in a stream of that shape (from the
    service's settings). A stream's shape is read (``STREAM.INFO``: caps and config, no message)
    when first needed and again every minute; a tenant's refusal is answered from memory for a
    few seconds, so a flood of refused messages costs no reads.

    What the service stores in a door's stream for a tenant of its own accord (the planner's
    ``task.rejected``, plans and outcomes in TASK; rag's answers in RAG) counts too: ``induced``
    adds it up in memory, and it is written with the tenant's next charge (the same write) or
    by ``flush`` (every few seconds). It is never refused, but a tenant whose messages and what
    they caused reach its quota is refused new ones."""

    def __init__(
        self, nc: Callable[[], Any], kv: st.KV, service: str, limits: Callable[[str, str, Shape], Limit]
    ) -> None:
        self._nc, self.kv, self.service, self.limits = nc, kv, service, limits
        self._shapes: dict[str, tuple[float, Shape]] = {}
        self._refused: dict[tuple[str, str], tuple[float, Refusal, Limit]] = {}
        self._pending: dict[tuple[str, str], Counter[str]] = {}
        """Refusals not yet in the record: the first of a run is written (``meshctl status`` shows
        the tenant refused), the rest are added with the tenant's next write."""
        self._footprints: dict[str, tuple[float, Refusal | None]] = {}
        """Per tenant: when its footprint across the book was last read, and the verdict."""
        self._induced: dict[tuple[str, str], list[int]] = {}
        """(tenant, stream) -> [bytes, messages] this service stored of its own accord, not yet written."""
        self._lock = asyncio.Lock()

    def induced(self, tenant: str, stream: str, nbytes: int) -> None:
        """Count a message this service stored for ``tenant`` in ``stream`` (written later)."""
        held = self._induced.setdefault((tenant, stream), [0, 0])
        held[0] += nbytes
        held[1] += 1

    async def flush(self) -> None:
        """Write what was stored of the service's own accord, and the refusals counted, since the
        last write of each tenant."""
        for key in {*self._induced, *(k for k, v in self._pending.items() if v)}:
            folded = self._induced.pop(key, None) or [0, 0]
            refused = self._pending.pop(key, Counter())
            tenant, stream = key
            try:
                shape = await self.shape(stream)
                limit = self.limits(tenant, stream, shape)
                if not limit:
                    continue  # no quota: nothing to count against

                def mutate(
                    rec: QuotaRecord | None, f: list[int] = folded, w: float = _window(shape), r: Counter[str] = refused,
                    lim: Limit = limit,
                ) -> QuotaRecord:  # fmt: skip
                    rec = rec or QuotaRecord()
                    rec.limit_bytes, rec.limit_msgs, rec.limit_bytes_per_min = lim.bytes, lim.msgs, lim.bytes_per_min
                    if f[1]:
                        add(rec, w, f[0], f[1], time.time())
                    for code, n in r.items():
                        rec.refused[code] = rec.refused.get(code, 0) + n
                    return rec

                await st.update(self.kv, QuotaRecord.key(self.service, tenant, stream), QuotaRecord, mutate)
            except Exception as exc:  # noqa: BLE001 - the broker is away: kept for the next round
                self._unfold(key, folded)
                self._pending.setdefault(key, Counter()).update(refused)
                log.debug("quota of %s in %s not written: %s", tenant, stream, exc)

    async def run(self, every_s: float = FLUSH_S) -> None:
        """``flush`` every ``every_s`` (a task of the service's, from start to stop)."""
        while True:
            await asyncio.sleep(every_s)
            await self.flush()

    def _unfold(self, key: tuple[str, str], folded: list[int]) -> None:
        if not folded[1]:
            return
        held = self._induced.setdefault(key, [0, 0])
        held[0] += folded[0]
        held[1] += folded[1]

    async def shape(self, stream: str) -> Shape:
        known = self._shapes.get(stream)
        if known is not None and time.monotonic() - known[0] < INFO_EVERY_S:
            return known[1]
        async with self._lock:
            known = self._shapes.get(stream)
            if known is not None and time.monotonic() - known[0] < INFO_EVERY_S:
                return known[1]
            try:
                info = await self._nc().jetstream().stream_info(stream)
            except Exception:
                if known is not None:  # the broker is away for a moment: keep what was read
                    return known[1]
                raise
            cfg = info.config
            shape = Shape(
                max_bytes=max(0, cfg.max_bytes or 0),
                max_msgs=max(0, cfg.max_msgs or 0),
                max_age_s=float(cfg.max_age or 0.0),
            )
            self._shapes[stream] = (time.monotonic(), shape)
            return shape

    async def footprint(self, tenant: str) -> Refusal | None:
        """Whether what ``tenant``'s tasks made the services store in a stream it does not write to
        itself (STEP, TOOL, CHECK, EVENTS, USAGE, APPROVAL) is over its share of that stream: the
        doors refuse its new work then (not its control messages: a halt or cancel only stops work).
        Bounded only through TASK, a tenant whose tasks store a lot each (tool results, check
        requests of megabytes) could still fill those. Read from the whole quota book (every
        service's records of the tenant, one batched read) at most every ``FOOTPRINT_EVERY_S``;
        the streams a tenant writes to, and the DLQ, are bounded message by message by ``charge``."""
        now = time.time()
        cached = self._footprints.get(tenant)
        if cached is not None and now - cached[0] < FOOTPRINT_EVERY_S:
            return cached[1]
        from mesh_durable.tail import Reader

        reader = Reader(self._nc(), "KV_quotas")
        try:
            entries = await reader.current(QuotaRecord.bucket, f"*.{tenant}.*")
        finally:
            await reader.close()
        held: dict[str, QuotaRecord] = {}
        for key, e in entries.items():
            stream = key.rsplit(".", 1)[-1]
            try:
                rec = QuotaRecord.model_validate_json(e.data)
            except ValueError:
                continue
            total = held.setdefault(stream, QuotaRecord(slot_s=rec.slot_s, window_s=rec.window_s))
            if rec.window_s:
                expire(rec, rec.window_s, now)
            for slot, (b, m) in rec.held.items():
                tb, tm = total.held.get(slot, [0, 0])
                total.held[slot] = [tb + b, tm + m]
        refusal = None
        charged = {*topo.door_streams(), topo.DLQ_STREAM}  # bounded by their own charges, message by message
        for stream, total in sorted(held.items()):
            if stream in charged:
                continue
            shape = await self.shape(stream)
            limit = self.limits(tenant, stream, shape)
            b, m = total.held_now()
            if (limit.bytes and b > limit.bytes) or (limit.msgs and m > limit.msgs):
                window = _window(shape)
                total.slot_s = slot_width(window)
                refusal = Refusal(
                    "quota_exceeded",
                    f"what its tasks stored in {stream} ({_mib(b)} in {m} messages) is over its quota there "
                    f"({_mib(limit.bytes) if limit.bytes else f'{limit.msgs} messages'} over {_days(window)})",
                    _until_room(total, limit, window, 0, now),
                )
                break
        self._footprints[tenant] = (now, refusal)
        if len(self._footprints) > 10_000:
            self._footprints.pop(next(iter(self._footprints)))
        return refusal

    async def charge(self, tenant: str, stream: str, nbytes: int) -> tuple[Refusal | None, float]:
        """Charge one message of ``nbytes`` that ``tenant`` is about to have stored in ``stream``.
        Returns (refusal or None, when it was charged: the ``refund`` handle)."""
        cached = self._refused.get((tenant, stream))
        now = time.time()
        shape = await self.shape(stream)
        limit = self.limits(tenant, stream, shape)
        if cached is not None:
            until, known, under = cached
            if now < until and under == limit:  # (an operator changed the tenant's quota: judge afresh)
                self._pending.setdefault((tenant, stream), Counter())[known.code] += 1
                return known, now
            del self._refused[(tenant, stream)]
        if not limit:
            return None, now
        window = _window(shape)
        refusal: Refusal | None = None
        pending = self._pending.setdefault((tenant, stream), Counter())
        folded = self._induced.pop((tenant, stream), None)  # written with this charge

        def mutate(rec: QuotaRecord | None) -> QuotaRecord | None:
            nonlocal refusal
            rec = rec or QuotaRecord()
            if folded:
                add(rec, window, folded[0], folded[1], now)
            refusal = charge(rec, limit, window, nbytes, now)
            if refusal is not None and pending:
                return None  # refusals are counted here and written with the next write
            for code, n in (pending + Counter([refusal.code] if refusal else [])).items():
                rec.refused[code] = rec.refused.get(code, 0) + n
            return rec

        try:
            _, wrote = await st.update(self.kv, QuotaRecord.key(self.service, tenant, stream), QuotaRecord, mutate)
        except BaseException:
            if folded:
                self._unfold((tenant, stream), folded)
            raise
        if not wrote and folded:
            self._unfold((tenant, stream), folded)
        if wrote:
            pending.clear()
        elif refusal is not None:
            pending[refusal.code] += 1
        if refusal is not None and refusal.retry_after_s:  # (0: this message is too big, not the tenant over)
            self._refused[(tenant, stream)] = (now + min(REFUSAL_CACHED_S, refusal.retry_after_s), refusal, limit)
            if len(self._refused) > 10_000:
                self._refused.pop(next(iter(self._refused)))
        return refusal, now

    async def refund(self, tenant: str, stream: str, nbytes: int, charged_at: float) -> None:
        """Give back a charge whose message the stream did not keep."""

        def mutate(rec: QuotaRecord | None) -> QuotaRecord | None:
            return rec if rec is not None and refund(rec, nbytes, charged_at) else None

        with contextlib.suppress(Exception):  # a refund lost errs on the tenant's side of caution
            await st.update(self.kv, QuotaRecord.key(self.service, tenant, stream), QuotaRecord, mutate)


def _window(shape: Shape) -> float:
    """How long a charge is held: the stream's max_age (a week for a stream that keeps forever)."""
    return shape.max_age_s or 7 * 86400.0


def limits_from(share: float, per_min_mib: dict[str, float], tenants: dict[str, dict[str, dict[str, float]]],
                own: Callable[[str], dict[str, dict[str, float]]] | None = None
                ) -> Callable[[str, str, Shape], Limit]:  # fmt: skip
    """A tenant's limit in a stream, from the settings (``MESH_QUOTA_*``): its share of the stream's
    caps unless its own ``mib``/``msgs`` say otherwise, in the settings or, over them, in its
    registry record (``own``, read at each charge: a change applies at once). A tenant's dead
    letters are kept by every service that gives up on one of its messages, so each service holds
    a sixth of its DLQ quota."""

    def limit(tenant: str, stream: str, shape: Shape) -> Limit:
        over = tenants.get(tenant, {}).get(stream, {})
        if own is not None and (mine := own(tenant).get(stream)):
            over = {**over, **mine}
        parts = len(SERVICES) if stream == topo.DLQ_STREAM else 1
        held_b = over["mib"] * MIB if "mib" in over else shape.max_bytes * share
        held_m = over["msgs"] if "msgs" in over else shape.max_msgs * share
        rate = over.get("mib_per_min", per_min_mib.get(stream, 0.0)) * MIB
        return Limit(int(held_b / parts), int(held_m / parts), int(rate / parts))

    return limit
