"""The durable per-tenant index in the ``rag`` KV bucket, which every rag replica loads from.

Layout, per tenant:

- ``<tenant>.manifest``: which documents (and which version of each) make up the index, and
  the index version, a digest of those (doc, version) pairs. Updated by compare-and-set, so
  two replicas ingesting at once never lose each other's document.
- ``<tenant>.doc.<doc hash>.<version>.<part>``: one document version's chunks and vectors
  (``Document.to_bytes``), split into parts below the broker's payload limit.

An ingest writes the new version's parts first, then switches the manifest, then deletes the
old version's parts: a reader always finds every part the manifest it read names (or, racing
a deletion, reloads the newer manifest). Keys carry the tenant as their first token, and
nothing here takes a tenant from anywhere but the caller's verified message.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel

from mesh_contracts import sealing
from mesh_contracts.stored import RAG_MANIFEST, Sealable
from mesh_kit import state as st
from mesh_rag.errors import RagError
from mesh_rag.index import Document

MIB = 1024 * 1024
PART_BYTES = 4 * MIB
ESTIMATED_CHUNK_BYTES = 2048
"""A chunk's text and its float16 embedding, about: what an entry of an older release (which did
not record its size) is taken to hold."""


class IndexFull(ValueError, RagError):
    """The tenant's index would hold more than its quota (``MESH_RAG_INDEX_*``): the ingest is
    refused with the reason, and the index is left as it was."""


@dataclass(frozen=True)
class IndexQuota:
    """How much one tenant's index may hold in KV ``rag`` (0: no limit)."""

    bytes: int = 0
    docs: int = 0


class DocEntry(BaseModel):
    version: str
    key: str
    """Key prefix of the parts: ``<tenant>.doc.<doc hash>.<version>``."""
    parts: int
    chunks: int
    title: str = ""
    media_type: str = ""
    ingested_at: float = 0.0
    bytes: int = 0
    """What its parts hold (0 in entries written before it was recorded: ``size`` estimates)."""

    def size(self) -> int:
        """Bytes this version holds in the bucket (estimated from its chunks for an old entry)."""
        return self.bytes or self.chunks * ESTIMATED_CHUNK_BYTES


class Manifest(Sealable):
    sealed: ClassVar[tuple[str, ...]] = ("docs",)
    """The documents' names and titles are the tenant's content (``mesh_contracts.sealing``)."""
    seal_name: ClassVar[str] = RAG_MANIFEST

    tenant: str
    docs: dict[str, DocEntry] = {}
    version: str = "empty"
    updated_at: float = 0.0

    def with_doc(self, doc_id: str, entry: DocEntry | None) -> Manifest:
        docs = dict(self.docs)
        if entry is None:
            docs.pop(doc_id, None)
        else:
            docs[doc_id] = entry
        return Manifest(tenant=self.tenant, docs=docs, version=index_version(docs), updated_at=time.time())


def index_version(docs: dict[str, DocEntry]) -> str:
    if not docs:
        return "empty"
    pairs = "\n".join(f"{d}\t{e.version}" for d, e in sorted(docs.items()))
    return hashlib.sha256(pairs.encode()).hexdigest()[:16]


def doc_key(tenant: str, doc_id: str, version: str) -> str:
    return f"{tenant}.doc.{hashlib.sha256(doc_id.encode()).hexdigest()[:16]}.{version}"


class Store:
    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def manifest(self, tenant: str) -> tuple[Manifest, int]:
        """The tenant's manifest and its revision (0 and an empty manifest when none)."""
        m, rev = await st.load(self.kv, f"{tenant}.manifest", Manifest)
        return (m or Manifest(tenant=tenant)), rev

    async def put_document(self, tenant: str, doc: Document) -> DocEntry:
        key = doc_key(tenant, doc.doc_id, doc.version)
        clear = doc.to_bytes(vector_dtype="float16")  # halves the index; cosine changes by < 1e-3
        data = sealing.seal_blob(tenant, f"rag.doc|{key}", clear)  # the tenant's document, sealed at rest
        parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
        for i, part in enumerate(parts):
            await self.kv.put(f"{key}.{i}", part)
        return DocEntry(
            version=doc.version,
            key=key,
            parts=len(parts),
            chunks=len(doc.chunks),
            title=doc.title,
            media_type=doc.media_type,
            ingested_at=time.time(),
            bytes=len(clear),
        )

    async def load_document(self, entry: DocEntry) -> Document:
        blobs = []
        for i in range(entry.parts):
            got = await self.kv.get(f"{entry.key}.{i}")
            blobs.append(got.value or b"")
        return Document.from_bytes(sealing.open_blob(entry.key.split(".")[0], f"rag.doc|{entry.key}", b"".join(blobs)))

    async def switch(
        self, tenant: str, doc_id: str, entry: DocEntry | None, quota: IndexQuota | None = None
    ) -> tuple[Manifest, DocEntry | None]:
        """Point the manifest at ``entry`` for ``doc_id`` (None removes it); returns the new
        manifest and the entry it replaced. ``IndexFull`` if the index would then hold more than
        ``quota`` (decided on the manifest as stored, in the compare-and-set: two ingests racing
        cannot both pass on the same room)."""
        replaced: list[DocEntry | None] = [None]

        def apply(cur: Manifest | None) -> Manifest | None:
            cur = cur or Manifest(tenant=tenant)
            old = cur.docs.get(doc_id)
            replaced[0] = old
            if (old is None and entry is None) or (
                old is not None and entry is not None and old.version == entry.version
            ):
                return None
            if entry is not None and quota is not None:
                others = [e for d, e in cur.docs.items() if d != doc_id]
                held = sum(e.size() for e in others)
                if quota.docs and len(others) + 1 > quota.docs:
                    raise IndexFull(
                        f"quota: the tenant's index holds {len(others)} documents, its limit of {quota.docs}"
                    )
                if quota.bytes and held + entry.size() > quota.bytes:
                    raise IndexFull(
                        f"quota: the tenant's index holds {held / MIB:.1f} MiB; this document's "
                        f"{entry.size() / MIB:.1f} MiB would pass its limit of {quota.bytes / MIB:.1f} MiB"
                    )
            return cur.with_doc(doc_id, entry)

        new, _ = await st.update(self.kv, f"{tenant}.manifest", Manifest, apply)
        return (new or Manifest(tenant=tenant)), replaced[0]

    async def delete_parts(self, entry: DocEntry) -> None:
        for i in range(entry.parts):
            await self.kv.purge(f"{entry.key}.{i}")
