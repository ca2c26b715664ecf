"""RAG service: ingests a tenant's documents and answers retrievals from that tenant's index only.

- Ingest (``rag...ingest`` from a tenant's client): extract the text (markdown, text, HTML,
  PDF), chunk with overlap, embed with all-MiniLM-L6-v2 on the CPU, store the document in
  the durable index (``store.py``), answer ``ingest.completed``. Re-ingesting a changed
  document replaces all of its old chunks; an unchanged one is a no-op.
- Retrieval (``retrieval.requested`` from a worker): hybrid BM25 + vector search over the
  tenant's index with provenance on every hit, each hit scored by the injection detector.
  Answers are cached in Redis under the index version, so a new ingest (a new version) can
  never be answered with the hits of an older index.

Every replica loads a tenant's index from the bucket when it first needs it and reloads
whenever the manifest's version changes, so any replica answers any tenant.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh_contracts import sealing
from mesh_contracts.v1 import IngestCompleted, IngestRequested, RetrievalCompleted, RetrievalHit, RetrievalRequested
from mesh_durable import redis
from mesh_durable.redis import redis_client, redis_errors
from mesh_guardrails import metrics as guardrails_metrics
from mesh_guardrails.injection import score as injection_score
from mesh_host import Mesh
from mesh_host.deps import Dependency
from mesh_kit import Delivery
from mesh_rag import metrics as rag_metrics
from mesh_rag.embed import Embedder
from mesh_rag.extract import SUPPORTED, ExtractError, extract, media_type_for
from mesh_rag.index import Chunk, TenantIndex, build_document, document_version
from mesh_rag.settings import RagSettings
from mesh_rag.store import IndexFull, IndexQuota, Manifest, Store
from mesh_tenancy import tenancy

log = logging.getLogger("mesh.rag")
SAMPLE_DOCS = Path(__file__).parent / "sample_docs"
CACHE_TTL_S = 3600


class Loaded:
    """One tenant's index as this replica holds it, and the manifest version it reflects."""

    def __init__(self) -> None:
        self.index = TenantIndex()
        self.version = "empty"
        self.lock = asyncio.Lock()


class Rag:
    def __init__(self, mesh: Mesh, embedder: Embedder | None = None, seed_tenants: list[str] | None = None,
                 seed_docs: Path | None = None, model_dir: Path | None = None,
                 index_quota: Callable[[str], IndexQuota] | None = None) -> None:  # fmt: skip
        self.mesh = mesh
        self.index_quota = index_quota
        """How much a tenant's index may hold (``RagSettings.index_quota``); None: no limit."""
        self.embedder = embedder
        self.model_dir = model_dir
        """Where the embedder's files are when none is given (default: the installed model)."""
        self.seed_tenants = seed_tenants or []
        self._seeding: dict[str, asyncio.Future[None]] = {}
        self.seed_docs = seed_docs or SAMPLE_DOCS
        self.store: Store | None = None
        self.loaded: dict[str, Loaded] = {}
        self._redis: Any = None
        self.cache: Dependency | None = None
        """Redis behind the retrieval cache: optional; while it is down every retrieval is a miss."""
        self._query_vectors: dict[str, Any] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.embedder is None:
            self.embedder = await asyncio.to_thread(Embedder.load, self.model_dir)
        self.store = Store(await self.mesh.kv("rag"))
        url = self.mesh.settings.redis_url if self.mesh.settings else ""
        if url:
            self._redis = redis_client(url)
            self.cache = self.mesh.depend(
                redis.dependency(self._redis, required=False, purpose="retrieval cache (every retrieval a miss)")
            )
        # Off the readiness path: the seed tenants' sample documents are embedded in the background,
        # and a request of a seed tenant waits for its own seeding only (``_seeded``).
        for tenant in self.seed_tenants:
            self._seeding[tenant] = asyncio.ensure_future(self._seed(tenant))

    async def stop(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def register(self) -> None:
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop)
        self.mesh.consume(RetrievalRequested, self.on_request)
        self.mesh.consume(IngestRequested, self.on_ingest)

    async def _seeded(self, tenant: str) -> None:
        """Wait for ``tenant``'s sample documents if it is a seed tenant being seeded (a failed
        seeding is logged, and the request goes on with the index as it is)."""
        seeding = self._seeding.get(tenant)
        if seeding is not None and not seeding.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(seeding)

    async def _seed(self, tenant: str) -> None:
        """A tenant listed in MESH_RAG_SEED_TENANTS starts with the sample documents if its index
        has never been written (the demo's documentation); an existing index is left alone."""
        assert self.store is not None
        try:
            _, rev = await self.store.manifest(tenant)
            if rev:
                return
            files = sorted(p for p in self.seed_docs.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
            for path in files:
                data = path.read_bytes()
                await self.ingest(tenant, path.relative_to(self.seed_docs).as_posix(), data, media_type_for(path.name))
        except Exception:
            log.exception("tenant %s: seeding the sample documents failed", tenant)
            raise
        log.info("tenant %s: seeded with %d sample document(s)", tenant, len(files))

    # --- ingest ---------------------------------------------------------------------------------

    async def ingest(self, tenant: str, doc_id: str, data: bytes, media_type: str, title: str = "") -> dict[str, Any]:
        """Extract, chunk, embed, store, switch the manifest; the fields of ``ingest.completed``."""
        assert self.store is not None and self.embedder is not None
        started = time.perf_counter()
        text = extract(data, media_type)  # ExtractError: refused with the reason
        version = document_version(text)
        manifest, _ = await self.store.manifest(tenant)
        old = manifest.docs.get(doc_id)
        if old is not None and old.version == version:
            return {"ok": True, "version": version, "chunks": old.chunks, "replaced": version,
                    "index_version": manifest.version, "seconds": 0.0}  # fmt: skip
        doc = await asyncio.to_thread(
            build_document, doc_id, text, self.embedder, media_type=media_type, title=title or _title(text, doc_id)
        )
        entry = await self.store.put_document(tenant, doc)
        try:
            manifest, replaced = await self.store.switch(
                tenant, doc_id, entry, self.index_quota(tenant) if self.index_quota else None
            )
        except IndexFull:
            await self.store.delete_parts(entry)  # written for nothing: the manifest never named them
            raise
        if replaced is not None and replaced.key != entry.key:
            await self.store.delete_parts(replaced)
        return {
            "ok": True,
            "version": doc.version,
            "chunks": len(doc.chunks),
            "replaced": replaced.version if replaced else "",
            "index_version": manifest.version,
            "seconds": round(time.perf_counter() - started, 3),
        }

    async def on_ingest(self, m: IngestRequested, d: Delivery) -> None:
        try:
            data = base64.b64decode(m.content_b64, validate=True)
        except (binascii.Error, ValueError):
            outcome: dict[str, Any] = {"ok": False, "error": "content_b64 is not valid base64"}
        else:
            await self._seeded(m.tenant)
            try:
                async with d.keepalive():
                    outcome = await self.ingest(m.tenant, m.doc_id, data, m.media_type, m.title)
            except (ExtractError, IndexFull) as exc:
                outcome = {"ok": False, "error": str(exc)}
        await self.mesh.publish(
            IngestCompleted(tenant=m.tenant, task_id=m.task_id, doc_id=m.doc_id, **outcome),
            # One answer per request (a redelivery of it is deduplicated): keyed by the request's
            # own id, not its content, or a second request with the same bytes in the same task
            # would have its answer dropped as a duplicate of the first's.
            key=hashlib.sha256(d.msg_id.encode()).hexdigest()[:16],
            causation=d.msg_id,
        )
        log.info("tenant %s: ingest %s -> %s", m.tenant, m.doc_id, {k: v for k, v in outcome.items() if k != "error"}
                 if outcome["ok"] else outcome["error"])  # fmt: skip

    # --- retrieval ------------------------------------------------------------------------------

    async def _index(self, tenant: str, manifest: Manifest) -> TenantIndex:
        """The tenant's index at ``manifest``'s version, loading only documents that changed."""
        assert self.store is not None
        loaded = self.loaded.setdefault(tenant, Loaded())
        if loaded.version == manifest.version:
            return loaded.index
        async with loaded.lock:
            if loaded.version != manifest.version:
                have = loaded.index.documents()
                for doc_id in [d for d in have if d not in manifest.docs]:
                    loaded.index.remove(doc_id)
                for doc_id, entry in manifest.docs.items():
                    if have.get(doc_id) != entry.version:
                        loaded.index.put(await self.store.load_document(entry))
                loaded.version = manifest.version
        return loaded.index

    def _cache_key(self, tenant: str, version: str, m: RetrievalRequested) -> str:
        q = hashlib.sha256(f"{m.method}\x00{m.top_k}\x00{m.query}\x00{'|'.join(m.scope)}".encode()).hexdigest()[:24]
        return f"rag:cache:{tenant}:{version}:{q}"

    async def search(
        self, tenant: str, query: str, top_k: int, method: str = "hybrid"
    ) -> tuple[list[RetrievalHit], str, bool]:
        """(hits, index version, cached) for one tenant's query; used by the handler and the benchmark."""
        m = RetrievalRequested(tenant=tenant, task_id="q", step_id="q", call_id="q", query=query, top_k=top_k,
                               method=method)  # type: ignore[arg-type]  # fmt: skip
        return await self._search(m)

    async def _search(self, m: RetrievalRequested) -> tuple[list[RetrievalHit], str, bool]:
        assert self.store is not None and self.embedder is not None
        await self._seeded(m.tenant)
        manifest, _ = await self.store.manifest(m.tenant)  # a tenant only ever reads its own
        key = self._cache_key(m.tenant, manifest.version, m)
        cached = await self._cache_get(key)
        if cached is not None:
            try:  # the passages are the tenant's content: sealed in the cache (``mesh_contracts.sealing``)
                hits = [RetrievalHit.model_validate(h) for h in json.loads(sealing.open_blob(m.tenant, key, cached))]
            except (sealing.SealError, ValueError):
                hits = None  # sealed with a key gone (the tenant erased): a miss
            if hits is not None:
                self.mesh.count(rag_metrics.M_RETRIEVAL_CACHE_HITS)
                return hits, manifest.version, True
        if self._redis is not None:
            self.mesh.count(rag_metrics.M_RETRIEVAL_CACHE_MISSES)
        index = await self._index(m.tenant, manifest)
        qv = None
        if m.method != "bm25":
            qv = self._query_vectors.get(m.query)
            if qv is None:
                qv = (await asyncio.to_thread(self.embedder.embed, [m.query]))[0]
                if len(self._query_vectors) > 4096:
                    self._query_vectors.clear()
                self._query_vectors[m.query] = qv
        found = index.search(m.query, m.top_k, method=m.method, query_vector=qv, scope=m.scope)
        hits = [_hit(c, s, manifest) for c, s in found]
        if self._caching():
            plain = json.dumps([h.model_dump(mode="json") for h in hits]).encode()
            await self._cache_set(key, sealing.seal_blob(m.tenant, key, plain))
        return hits, manifest.version, False

    # --- the cache: a miss, never a failure -------------------------------------------------

    def _caching(self) -> bool:
        """Whether to use the cache now: configured, and not known to be down (while it is down
        its probe decides when to try again, so no retrieval waits for a connect timeout)."""
        return self._redis is not None and (self.cache is None or self.cache.up)

    async def _cache_get(self, key: str) -> bytes | None:
        if not self._caching():
            return None
        try:
            value: bytes | None = await self._redis.get(key)
        except redis_errors() as exc:
            self._cache_failed(exc)
            return None
        return value

    async def _cache_set(self, key: str, payload: bytes) -> None:
        try:
            await self._redis.set(key, payload, ex=CACHE_TTL_S)
        except redis_errors() as exc:
            self._cache_failed(exc)

    def _cache_failed(self, exc: BaseException) -> None:
        self.mesh.count(rag_metrics.M_RETRIEVAL_CACHE_ERRORS)
        if self.cache is not None:
            self.cache.down(exc)

    async def on_request(self, m: RetrievalRequested, d: Delivery) -> None:
        hits, version, cached = await self._search(m)
        flagged = sum(1 for h in hits if h.injection_score >= 0.5)
        if flagged:
            self.mesh.count(guardrails_metrics.M_INJECTION_FLAGGED)
        await self.mesh.publish(
            RetrievalCompleted(
                tenant=m.tenant,
                task_id=m.task_id,
                step_id=m.step_id,
                call_id=m.call_id,
                hits=tuple(hits),
                index_version=version,
                cached=cached,
            ),
            key=m.call_id,
            causation=d.msg_id,
        )
        note = f" ({flagged} flagged as possible injection)" if flagged else ""
        await self.mesh.progress(
            m.tenant,
            m.task_id,
            "retrieval.completed",
            f"{len(hits)} passage(s): " + ", ".join(f"{h.doc_id}#{h.chunk_id}" for h in hits) + note,
            step_id=m.step_id,
            key=m.call_id,
        )


def _hit(c: Chunk, score: float, manifest: Manifest) -> RetrievalHit:
    scored = injection_score(c.text)
    entry = manifest.docs.get(c.doc_id)
    return RetrievalHit(
        doc_id=c.doc_id,
        version=c.version,
        chunk_id=c.chunk_id,
        chunk_hash=c.chunk_hash,
        score=round(float(score), 6),
        text=c.text,
        injection_score=round(scored.score, 3),
        injection_signals=scored.signals,
        title=entry.title if entry else "",
    )


def _title(text: str, doc_id: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()[:300]
    return doc_id.rsplit("/", 1)[-1]


async def build(mesh: Mesh, settings: RagSettings) -> Rag:
    docs = settings.data_dir or SAMPLE_DOCS
    rag = Rag(mesh, seed_tenants=settings.seed_tenants, seed_docs=Path(docs), model_dir=settings.embed_model_dir,
              index_quota=settings.index_quota)  # fmt: skip
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    rag.register()
    return rag
