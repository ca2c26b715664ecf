"""RAG service: answers retrieval requests from the requesting tenant's own index only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mesh_contracts.v1 import RetrievalCompleted, RetrievalHit, RetrievalRequested
from mesh_kit import Delivery, Mesh
from mesh_rag.index import TenantIndex, load_directory

log = logging.getLogger("mesh.rag")
SAMPLE_DOCS = Path(__file__).parent / "sample_docs"


class Rag:
    def __init__(self, mesh: Mesh, tenants: list[str], docs: Path) -> None:
        self.mesh = mesh
        self.indexes: dict[str, TenantIndex] = {}
        for tenant in tenants:
            idx = TenantIndex()
            n = load_directory(idx, docs)
            self.indexes[tenant] = idx
            log.info("tenant %s: ingested %d chunks from %s (index %s)", tenant, n, docs.name, idx.version)

    def register(self) -> None:
        self.mesh.consume(RetrievalRequested, self.on_request)

    async def on_request(self, m: RetrievalRequested, d: Delivery) -> None:
        idx = self.indexes.get(m.tenant) or TenantIndex()  # a tenant never sees another tenant's chunks
        hits = [
            RetrievalHit(
                doc_id=c.doc_id,
                version=c.version,
                chunk_id=c.chunk_id,
                chunk_hash=c.chunk_hash,
                score=score,
                text=c.text,
            )
            for c, score in idx.search(m.query, m.top_k)
        ]
        await self.mesh.publish(
            RetrievalCompleted(
                tenant=m.tenant,
                task_id=m.task_id,
                step_id=m.step_id,
                call_id=m.call_id,
                hits=tuple(hits),
                index_version=idx.version,
            ),
            key=m.call_id,
            causation=d.msg_id,
        )
        await self.mesh.progress(
            m.tenant,
            m.task_id,
            "retrieval.completed",
            f"{len(hits)} passage(s): " + ", ".join(f"{h.doc_id}#{h.chunk_id}" for h in hits),
            step_id=m.step_id,
            key=m.call_id,
        )


async def build(mesh: Mesh) -> Rag:
    tenants = [t for t in os.environ.get("MESH_TENANTS", "demo").split(",") if t]
    docs = mesh.settings.data_dir or SAMPLE_DOCS
    rag = Rag(mesh, tenants, Path(docs))
    rag.register()
    return rag
