"""State lives in JetStream KV, updated with compare-and-set on the revision.

The task record is the only truth about a task's progress: any replica of the planner can pick
up any task. Records other services read are contracts (``mesh_contracts.v1.records``), read
through one accessor each (``mesh_durable.records``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from mesh_contracts.stored import Sealable
from mesh_kit.errors import KitError

log = logging.getLogger("mesh.state")


class Entry(Protocol):
    """A key's value as read: its bytes (None for a deletion marker) and revision."""

    @property
    def value(self) -> bytes | None: ...
    @property
    def revision(self) -> int | None: ...


class KV(Protocol):
    """A key-value bucket as the mesh uses it: nats-py's ``KeyValue`` bound by ``bind``, or a test's
    ``mesh_testing.memkv.MemoryKV``. ``get`` of a missing key raises ``KeyNotFoundError``;
    ``create`` of a present one and ``update`` at another revision ``KeyWrongLastSequenceError``."""

    async def get(self, key: str) -> Entry: ...
    async def put(self, key: str, value: bytes) -> int: ...
    async def create(self, key: str, value: bytes) -> int: ...
    async def update(self, key: str, value: bytes, last: int | None = None) -> int: ...
    async def delete(self, key: str, last: int | None = None) -> bool: ...
    async def purge(self, key: str) -> bool: ...


def bind(nc: Any, bucket: str) -> KeyValue:
    """A provisioned bucket (provisioning makes every bucket allow direct gets), bound without
    asking the server for its stream's info: ``$JS.API.STREAM.INFO`` with a subjects filter
    lists every key of a bucket, so no service holds it on a bucket where it may only read
    some keys (the per-service ``ledger``). A missing bucket fails on first use instead."""
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=nc.jetstream(), direct=True)


M = TypeVar("M", bound=BaseModel)


async def _raw(kv: KV, key: str) -> tuple[bytes | None, int]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, 0
    if entry.value is None:  # deleted or purged
        return None, 0
    return entry.value, entry.revision or 0


async def load(kv: KV, key: str, model: type[M], *, remember: bool = False) -> tuple[M | None, int]:
    """The key's value and revision (None, 0 when there is none). ``remember``: the next ``update``
    of the key by this process starts from what was read here instead of reading it again (its
    compare-and-set still proves it current; a key found missing is then created outright)."""
    raw, rev = await _raw(kv, key)
    if remember:
        _remember(_remembered(kv), key, raw, rev)
    return (_read(model, raw, key), rev) if raw is not None else (None, 0)


def _read(model: type[M], raw: bytes, key: str) -> M:
    """``raw`` as ``model``; a record's sealed fields opened (bound to ``key``)."""
    if issubclass(model, Sealable):
        return model.from_bytes(raw, key)
    return model.model_validate_json(raw)


class Conflict(KitError):
    """Too many concurrent writers on one key; the message will be retried."""


_LAST_WRITES = 512
"""Keys per bucket whose last write (value and revision) this process remembers."""
_last: weakref.WeakKeyDictionary[Any, OrderedDict[str, tuple[bytes | None, int]]] = weakref.WeakKeyDictionary()


def _remembered(kv: KV) -> OrderedDict[str, tuple[bytes | None, int]]:
    try:
        return _last.setdefault(kv, OrderedDict())
    except TypeError:  # not weakly referenceable (a test double): remember nothing
        return OrderedDict()


def _remember(remembered: OrderedDict[str, tuple[bytes | None, int]], key: str, raw: bytes | None, rev: int) -> None:
    remembered[key] = (raw, rev)
    remembered.move_to_end(key)
    while len(remembered) > _LAST_WRITES:
        remembered.popitem(last=False)


def written(kv: KV, key: str) -> int:
    """The revision of ``key`` that ``update`` remembers: this process's last write of it, or a read
    it was told to remember (0: none)."""
    known = _remembered(kv).get(key)
    return known[1] if known is not None else 0


_writers: weakref.WeakKeyDictionary[Any, dict[str, list[Any]]] = weakref.WeakKeyDictionary()
"""Per bucket and key: [lock, how many updates hold or wait for it] (the entry goes with the last)."""


def _key_lock(kv: KV, key: str) -> list[Any] | None:
    try:
        per_key = _writers.setdefault(kv, {})
    except TypeError:  # not weakly referenceable (a test double): no local ordering
        return None
    entry = per_key.get(key)
    if entry is None:
        entry = per_key[key] = [asyncio.Lock(), 0]
    entry[1] += 1
    return entry


def _release(kv: KV, key: str, entry: list[Any]) -> None:
    entry[1] -= 1
    if entry[1] == 0:
        per_key = _writers.get(kv)
        if per_key is not None and per_key.get(key) is entry:
            del per_key[key]


async def update(
    kv: KV, key: str, model: type[M], mutate: Callable[[M | None], M | None], retries: int = 12
) -> tuple[M | None, bool]:
    """Read-modify-write with compare-and-set. ``mutate`` returns the new value, or None for
    "no change". Returns (value, changed).

    The read is skipped when this process made the key's last write it knows of (or read it with
    ``load(remember=True)``): ``mutate`` runs on that value and the compare-and-set proves it current (a write by anyone else since
    makes it fail, and then the key is read). A "no change", or an exception from ``mutate``, is
    only ever taken from a value just read, never from a remembered one.

    Updates of one key in one process take turns (a lock per key): two handlers of the same
    process racing on a hot key (a tenant's day of spend, a task record) would otherwise both
    start from the same remembered value, and the loser pay a failed write, a read and a retry.
    Taking turns, each starts from the value the one before it wrote. Other processes are kept
    out by the compare-and-set, as before."""
    entry = _key_lock(kv, key)
    if entry is None:
        return await _update(kv, key, model, mutate, retries)
    try:
        async with entry[0]:
            return await _update(kv, key, model, mutate, retries)
    finally:
        _release(kv, key, entry)


async def _update(
    kv: KV, key: str, model: type[M], mutate: Callable[[M | None], M | None], retries: int
) -> tuple[M | None, bool]:
    remembered = _remembered(kv)
    known = remembered.get(key)
    raw, rev = known if known is not None else await _raw(kv, key)
    fresh = known is None
    for attempt in range(retries):
        # ``mutate`` may change what it is given; "no change" returns the stored value untouched.
        # Parsing the bytes again is several times cheaper than a deep copy of the model.
        try:
            new = mutate(_read(model, raw, key) if raw is not None else None)
        except Exception:
            if fresh:
                raise
            new = None  # a remembered value surprised it: judge what is stored now
        if new is None:
            if not fresh:  # decide on what is stored now, and forget what this process assumed
                remembered.pop(key, None)
                raw, rev = await _raw(kv, key)
                fresh = True
                continue
            return (_read(model, raw, key) if raw is not None else None), False
        data = new.to_bytes(key) if isinstance(new, Sealable) else new.model_dump_json().encode()
        try:
            if rev == 0:
                written = await kv.create(key, data)
            else:
                written = await kv.update(key, data, last=rev)
        except KeyWrongLastSequenceError:
            remembered.pop(key, None)
            if fresh:
                await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # jittered: writers collided
            raw, rev = await _raw(kv, key)
            fresh = True
            continue
        if isinstance(written, int) and written > 0:
            _remember(remembered, key, data, written)
        return new, True
    raise Conflict(f"compare-and-set on {key} lost {retries} times")


async def from_leader(nc: Any, bucket: str, key: str, model: type[M]) -> M | None:
    """The key's value as the bucket's stream leader has it (``$JS.API.STREAM.MSG.GET``, last by
    subject): every write acknowledged so far. A direct get (``load``) may be answered by any
    replica, one still catching up included. Needs the bucket's ``leader_readers`` right."""
    try:
        stored = await nc.jetstream(timeout=5.0).get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{key}")
    except NotFoundError:
        return None
    if not stored.data or (stored.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
        return None
    return _read(model, stored.data, key)
