"""Appending to a tenant's audit chain (``mesh_contracts.v1.audit``): compare-and-set on the
tenant's last record, so the chain stays one line however many writers and replicas append.

``append`` builds record ``n + 1`` naming the SHA-256 of record ``n``'s stored body and publishes
it with ``Nats-Expected-Last-Subject-Sequence`` (for the subject filter ``audit.v1.<tenant>.>``,
nats-server 2.11 or later): if anyone appended meanwhile the server refuses it (10071), the head
is read again and the record rebuilt. The message id comes from the caller's ``key`` (what the
record is about), so a retry of the same decision, by this replica or another, is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nats.aio.client import Client as NATS
from nats.js.errors import BadRequestError
from opentelemetry import propagate, trace

from mesh_contracts import ContractError
from mesh_contracts import topology as topo
from mesh_contracts.v1.audit import ANCHOR, GENESIS, MESH_WIDE, AuditRecorded, kind_allowed
from mesh_durable import sealing
from mesh_durable.errors import DurableError
from mesh_durable.tail import Stored
from mesh_identity import IdentityError, Signer, Verifier
from mesh_kit import envelope as env

if TYPE_CHECKING:
    from mesh_host.mesh import Mesh

log = logging.getLogger("mesh.chain")

WRONG_LAST_SEQUENCE = 10071
STREAM = topo.STREAMS["audit"]
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
ATTEMPTS = 50


def parse(data: bytes, *, strict: bool = False) -> AuditRecorded:
    rec = AuditRecorded.parse(data, strict=strict)
    assert isinstance(rec, AuditRecorded)
    return rec


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def chain_filter(tenant: str) -> str:
    return f"{AuditRecorded.spec.domain}.v{AuditRecorded.spec.major}.{tenant}.>"


def link(
    signer: Signer, tenant: str, task_id: str, n: int, prev: str, kind: str, key: str, *, actor: str = "",
    source: str = "", detail: dict[str, Any] | None = None, at: float | None = None,
) -> tuple[AuditRecorded, bytes, dict[str, str]]:  # fmt: skip
    """Record ``n`` of ``tenant``'s chain, following the record whose digest is ``prev``: the
    model, its body and its signed headers (message id from ``key``)."""
    model = AuditRecorded(
        tenant=tenant, task_id=task_id, n=n, prev=prev, kind=kind, actor=actor,
        at=time.time() if at is None else at, source=source, detail=detail or {},
    )  # fmt: skip
    body = model.to_bytes()
    msg_id = env.message_id(model.type, tenant, task_id, key)
    return model, body, env.headers_for(signer, model, body, msg_id, env.CAUSE.get() or None)


@dataclass(frozen=True)
class Head:
    seq: int  # stream sequence of the tenant's last record (0: none yet)
    n: int
    hash: str


class ChainError(RuntimeError, DurableError):
    """The chain could not be appended to (contention beyond ``ATTEMPTS``, a record that does
    not parse where the head should be)."""


class Appender(Protocol):
    """What a service appends through: an ``AuditChain``, or a test's stand-in (``install``)."""

    async def append(
        self, tenant: str, task_id: str, kind: str, key: str, *, actor: str = "", source: str = "",
        detail: dict[str, Any] | None = None,
    ) -> int: ...  # fmt: skip

    async def head(self, tenant: str) -> Head: ...


_CHAINS: weakref.WeakKeyDictionary[Any, Appender] = weakref.WeakKeyDictionary()


def of(mesh: Mesh) -> Appender:
    """This service's appender to the tenants' audit chains: one per mesh connection (it keeps each
    chain's head), signing with the service's key of the moment; made on first use."""
    appender = _CHAINS.get(mesh)
    if appender is None:
        appender = _CHAINS[mesh] = AuditChain(
            lambda: mesh.nc,
            lambda: mesh.signer,
            lambda: mesh.tracer,
            keys=lambda t: mesh.verifier.bundle.auditors.get(t),
        )
    return appender


def install(mesh: Any, appender: Appender) -> None:
    """Make ``appender`` the one ``of(mesh)`` answers (a test's mesh records what is appended)."""
    _CHAINS[mesh] = appender


class AuditChain:
    """An appender to the tenants' audit chains. ``append`` names each decision by ``key``, so a
    retry of it is stored once."""

    def __init__(
        self, nc: Callable[[], NATS], signer: Callable[[], Signer], tracer: Callable[[], Any] | None = None,
        *, keys: sealing.Keys | None = None,
    ) -> None:  # fmt: skip
        self._nc, self._signer = nc, signer  # getters: the connection and key of the moment
        self._keys = keys
        """The tenants' auditor keys of the moment (the trust bundle's): the content fields of a
        link are sealed to its tenant's (``mesh_durable.sealing``). None: stored in clear (a test's
        chain, or a tool that seals before it appends)."""
        self._tracer = tracer
        """Each record is published by a span of its own, as every other stored message is."""
        self._heads: dict[str, Head] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.conflicts = 0

    def _publishing(self, subject: str) -> Any:
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer().start_as_current_span(
            f"{subject} publish", kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        )  # fmt: skip

    async def head(self, tenant: str) -> Head:
        """The tenant's last record, by a subject-form direct get (the last message matching the
        chain's filter): the one read a writer's rights allow, no reads by sequence."""
        filt = chain_filter(tenant)
        msg = await self._nc().request(f"$JS.API.DIRECT.GET.{STREAM}.{filt}", b"", timeout=5.0)
        headers = dict(msg.headers or {})
        status = headers.get("Status")
        if status == "404":
            return Head(0, 0, GENESIS)
        if status is not None:
            raise ChainError(f"reading the head of {tenant}'s audit chain: {status} {headers.get('Description', '')}")
        try:
            rec = parse(msg.data)
        except ContractError as exc:  # not ours to judge here: verify names it
            raise ChainError(f"the last record of {tenant}'s audit chain does not parse: {exc}") from None
        return Head(int(headers.get("Nats-Sequence", "0")), rec.n, digest(msg.data))

    async def append(
        self, tenant: str, task_id: str, kind: str, key: str, *, actor: str = "", source: str = "",
        detail: dict[str, Any] | None = None,
    ) -> int:  # fmt: skip
        """Append one record; returns its position ``n`` (0 if it was already there: a retry)."""
        if detail and self._keys is not None and tenant != MESH_WIDE:  # mesh-wide actions hold no tenant's content
            detail = sealing.seal_detail(detail, self._keys(tenant))
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            js = self._nc().jetstream()
            head = self._heads.get(tenant)
            for attempt in range(ATTEMPTS):
                if head is None:
                    head = await self.head(tenant)
                model, body, headers = link(
                    self._signer(), tenant, task_id, head.n + 1, head.hash, kind, key, actor=actor, source=source,
                    detail=detail,
                )  # fmt: skip
                headers[EXPECTED_LAST_SUBJECT_SEQ] = str(head.seq)
                headers[EXPECTED_LAST_SUBJECT] = chain_filter(tenant)
                try:
                    with self._publishing(model.subject()):
                        propagate.inject(headers)  # the record joins the trace of what it records
                        ack = await js.publish(model.subject(), body, headers=headers, stream=STREAM, timeout=5.0)
                except BadRequestError as exc:
                    if exc.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    self.conflicts += 1
                    self._heads.pop(tenant, None)
                    head = None
                    await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
                    continue
                if ack.duplicate:  # appended before (a retry): where the head is now, we do not know
                    self._heads.pop(tenant, None)
                    return 0
                self._heads[tenant] = Head(ack.seq, model.n, digest(body))
                return model.n
            raise ChainError(f"{tenant}'s audit chain: {ATTEMPTS} appends in a row lost the race")


# --- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A stored anchor statement (KV ``anchors``) and when it was stored."""

    statement: str
    stored_at: float


@dataclass
class Verdict:
    """What ``verify`` found: the chain whole (``broken_at`` None) or where it first breaks."""

    tenant: str
    records: int = 0
    first: int = 0
    head: Head | None = None
    anchors: int = 0
    """Anchors held against the chain (those of records no longer retained are skipped)."""
    broken_at: int | None = None
    """The position (``n``) of the first record that is missing, altered, out of place or not
    vouched for; for a record that does not even parse, its stream sequence."""
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.broken_at is None

    def fail(self, at: int, reason: str) -> Verdict:
        self.broken_at, self.reason = at, reason
        return self


CLOCK_SKEW_S = 5.0
"""How far a writer's clock may run behind the server's before a record looks older than its stream."""


def verify(
    tenant: str, stored: list[Stored], verifier: Verifier, anchors: Sequence[Anchor] = (), *,
    stream_first_seq: int | None = None, pinned: tuple[int, str] | None = None, stream_created: float | None = None,
) -> Verdict:  # fmt: skip
    """Check a tenant's chain as read from the stream, in stored order: every record parses, is
    signed by a principal allowed to write its kind, is the next position and names the hash of
    the record before it; then every anchor the budget signed is reached and matched. The first
    failure is the verdict (what follows a break cannot be trusted to say more).

    ``stream_first_seq``: the stream's first sequence. A chain that does not start at record 1 is
    whole only if the stream has lost messages to age (its first sequence is past 1): otherwise
    its beginning was removed (the stream re-created without it). ``pinned``: ``(n, sha256)`` of a
    head kept outside the mesh, held like an anchor. ``stream_created``: when the stream was
    created; a record written before it was carried over into a re-created stream (records may
    be re-published within their tokens' lifetime, so the signature alone cannot show it)."""
    v = Verdict(tenant)
    by_n: dict[int, str] = {}  # n -> digest of every record read
    broken = (
        _break_in_records(v, stored, verifier, by_n, stream_first_seq, stream_created)
        or _break_in_anchors(v, anchors, verifier, by_n)
        or _break_at_pin(v, pinned, by_n)
    )
    return v.fail(*broken) if broken else v


Break = tuple[int, str]
"""Where a chain first breaks (``Verdict.broken_at``) and why."""


def _break_in_records(
    v: Verdict, stored: list[Stored], verifier: Verifier, by_n: dict[int, str], stream_first_seq: int | None,
    stream_created: float | None,
) -> Break | None:  # fmt: skip
    """Walk the records in stored order, counting each good one into ``v`` and ``by_n``."""
    prev: tuple[int, str] | None = None  # (n, digest) of the last good record
    for s in stored:
        try:
            rec = parse(s.data, strict=True)
        except ContractError as exc:
            return s.seq, f"the record stored at sequence {s.seq} is not an audit record: {exc}"
        broken = _break_in_record(v.tenant, s, rec, verifier, stream_created) or (
            _break_at_start(v, rec, stream_first_seq) if prev is None else _break_in_line(rec, prev)
        )
        if broken:
            return broken
        h = digest(s.data)
        prev = (rec.n, h)
        by_n[rec.n] = h
        v.records += 1
        v.kinds[rec.kind] = v.kinds.get(rec.kind, 0) + 1
        v.head = Head(s.seq, rec.n, h)
    return None


def _break_in_record(
    tenant: str, s: Stored, rec: AuditRecorded, verifier: Verifier, stream_created: float | None
) -> Break | None:
    """One record on its own: stored where its tenant's are, signed by someone who may write its
    kind, and not older than its stream."""
    if rec.tenant != tenant or s.subject != rec.subject():
        return rec.n, f"record {rec.n} is stored as {s.subject!r}, it names tenant {rec.tenant!r}"
    try:
        who = verifier.verify(s.headers.get(env.IDENTITY), s.data, rec, at=s.time, msg_id=s.headers.get(env.MSG_ID, ""))
    except IdentityError as exc:
        return rec.n, f"record {rec.n} ({rec.kind}): {exc}"
    if not kind_allowed(who.role, rec.kind):
        return rec.n, f"record {rec.n} is a {rec.kind} record signed by {who.name}, who may not write one"
    if stream_created is not None and rec.at < stream_created - CLOCK_SKEW_S:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stream_created))
        return rec.n, (f"record {rec.n} was written {stream_created - rec.at:.0f} s before its stream was "
                       f"created ({when} UTC): the stream was re-created and the record put back")  # fmt: skip
    return None


def _break_at_start(v: Verdict, rec: AuditRecorded, stream_first_seq: int | None) -> Break | None:
    """The first record read: record 1 from the genesis, or a later one whose predecessors the
    stream may have lost to age (noted in ``v``)."""
    if rec.n == 1 and rec.prev != GENESIS:
        return 1, "record 1 names a predecessor: the chain's beginning was replaced"
    if rec.n > 1 and stream_first_seq == 1:
        gone = "record 1" if rec.n == 2 else f"records 1 to {rec.n - 1}"
        return 1, (f"{gone} missing: the chain starts at record {rec.n}, and its stream has lost "
                   "nothing to age (it still holds its first message)")  # fmt: skip
    if rec.n > 1:
        v.notes.append(
            f"the chain starts at record {rec.n}: the records before it are gone (expired under the "
            "stream's retention, or removed by deleting the stream)"
        )
    v.first = rec.n
    return None


def _break_in_line(rec: AuditRecorded, prev: tuple[int, str]) -> Break | None:
    """A record after the first: the next position, naming the digest of the one before it."""
    n0, h0 = prev
    if rec.n > n0 + 1:
        missing = f"record {n0 + 1}" if rec.n == n0 + 2 else f"records {n0 + 1} to {rec.n - 1}"
        return n0 + 1, f"{missing} missing: record {rec.n} follows record {n0}"
    if rec.n <= n0:
        return rec.n, f"record {rec.n} appears again after record {n0} (replayed or inserted)"
    if rec.prev != h0:
        return n0, f"record {n0} is not the one record {rec.n} follows (altered or replaced)"
    return None


def _break_in_anchors(v: Verdict, anchors: Sequence[Anchor], verifier: Verifier, by_n: dict[int, str]) -> Break | None:
    """Every anchor the budget signed for this tenant is reached and matched (those of records no
    longer retained are skipped; the others are counted into ``v``)."""
    last_n = v.head.n if v.head else 0
    for a in anchors:
        try:
            _, claims = verifier.statement(
                a.statement, kind=ANCHOR, roles=("budget",), require=["ten", "n", "head"], at=a.stored_at
            )
        except IdentityError as exc:
            return last_n + 1, f"an anchor stored {_when(a.stored_at)} does not verify: {exc}"
        if claims["ten"] != v.tenant:
            return last_n + 1, f"an anchor stored {_when(a.stored_at)} is for tenant {claims['ten']!r}"
        n, head = int(claims["n"]), str(claims["head"])
        if n < v.first:
            continue  # vouches for records no longer retained
        v.anchors += 1
        if n > last_n:
            return (
                last_n + 1,
                f"the chain ends at record {last_n}, but the anchor of {_when(a.stored_at)} vouches for {n} records: "
                "its tail was cut",
            )
        if by_n.get(n) != head:
            return n, f"record {n} is not the one the anchor of {_when(a.stored_at)} vouched for"
    return None


def _break_at_pin(v: Verdict, pinned: tuple[int, str] | None, by_n: dict[int, str]) -> Break | None:
    """The head kept outside the mesh (``--anchor``), held like an anchor."""
    if pinned is None:
        return None
    last_n = v.head.n if v.head else 0
    n, head = pinned
    if n > last_n:
        return last_n + 1, f"the chain ends at record {last_n}, before record {n}, which --anchor vouches for"
    if by_n.get(n) != head:
        return n, f"record {n} is not the one --anchor vouches for"
    return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
