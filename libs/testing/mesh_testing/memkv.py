"""An in-memory stand-in for a JetStream KV bucket, for handler tests on the in-memory broker.

It keeps the semantics handlers rely on: revisions, compare-and-set (``create`` fails if the key
exists, ``update`` fails unless ``last`` is the current revision) and the same exceptions as
nats-py, so code written against a real bucket runs unchanged.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError


@dataclass
class Entry:
    key: str
    value: bytes | None
    revision: int


class MemoryKV:
    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.seq = 0

    def _store(self, key: str, value: bytes | None) -> int:
        self.seq += 1
        self.data[key] = Entry(key, value, self.seq)
        return self.seq

    async def get(self, key: str) -> Entry:
        e = self.data.get(key)
        if e is None or e.value is None:
            raise KeyNotFoundError
        return e

    async def put(self, key: str, value: bytes) -> int:
        return self._store(key, value)

    async def create(self, key: str, value: bytes) -> int:
        e = self.data.get(key)
        if e is not None and e.value is not None:
            raise KeyWrongLastSequenceError
        return self._store(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        e = self.data.get(key)
        if e is None or e.revision != last:
            raise KeyWrongLastSequenceError
        return self._store(key, value)

    async def delete(self, key: str, last: int | None = None) -> bool:
        e = self.data.get(key)
        if last is not None and (e is None or e.revision != last):
            raise KeyWrongLastSequenceError
        self._store(key, None)
        return True

    async def purge(self, key: str) -> bool:
        self.data.pop(key, None)
        return True

    async def keys(self, filters: list[str] | None = None) -> list[str]:
        live = [k for k, e in self.data.items() if e.value is not None]
        if filters:
            live = [k for k in live if any(fnmatch.fnmatchcase(k, f.replace(">", "*")) for f in filters)]
        if not live:
            raise NoKeysError
        return live
